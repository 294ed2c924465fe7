"""The shared MILAN implementation: student, decoders, masks, CLIP teacher, losses.

Free of configuration files, launching and logging: plain arguments in, tensors out. The modules:
:mod:`.switches` (the three switches' names), :mod:`.model` (the student), :mod:`.prompting` (the
prompting decoder block), :mod:`.masking` (mask samplers), :mod:`.teacher` (the CLIP teacher),
:mod:`.losses`, :mod:`.pretrainer` (the objective), :mod:`.presets` (model shapes), :mod:`.weights`
(published checkpoints into timm's ViT), :mod:`.flops` (FLOP counts). Import them directly.
"""
