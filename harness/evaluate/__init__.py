"""Downstream evaluation of a pretrained encoder given as a timm VisionTransformer.

The evaluation code (plain arguments in, a dict of metrics out, with no knowledge of pretraining,
configuration files, tracking or launching): :mod:`.features` (cls-token features and the
inference precision), :mod:`.shards` (extraction over ranks), :mod:`.knn`, :mod:`.linear_probe`,
:mod:`.finetune`. The protocols that wrap them for a run, and their registry: :mod:`.protocols`.
"""
