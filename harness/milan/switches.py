"""MILAN's three switches, the axes of its 2x2x2 ablation, named once: the config validates them,
the model builds from them, the mask sampler dispatches on them. Free of torch, so a config is
checked without importing the model."""

from typing import Literal

Target = Literal["pixel", "clip"]  # what the decoder reconstructs: pixels (MAE) or CLIP features (MILAN)
DecoderKind = Literal["standard", "prompting"]  # MAE's decoder, or MILAN's prompting decoder
Masking = Literal["random", "semantic"]  # uniform masks (MAE), or masks drawn from the teacher's attention


def needs_teacher(target: Target, masking: Masking) -> bool:
    """A CLIP teacher is built for CLIP targets, for semantic masks, or both."""
    return target == "clip" or masking == "semantic"
