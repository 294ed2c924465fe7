"""Data layer: ImageFolder loading, MAE/eval transforms, loaders, and a synthetic demo dataset.

The demo dataset exists because the benchmark must run end to end on machines that cannot
download ImageNet; everything else here works on any ImageFolder tree (train/ and val/).
"""
