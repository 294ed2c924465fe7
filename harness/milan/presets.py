"""Named encoder/decoder shapes.

The MAE/MILAN decoder for ViT-S/B/L/H is 512 wide, 8 blocks, 16 heads. The patch-4 presets are
for 32x32 images (an 8x8 patch grid) and keep the same structure at CPU sizes: ``micro`` for unit
tests (seconds, learns little), ``mini`` for the smoke and demo cells (an epoch of the demo data
in about 17 s on two cores), ``tiny`` (DeiT-Ti width, half its depth) for longer CPU runs.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class VitShape:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


PRESETS: dict[str, VitShape] = {
    # CPU sizes (32x32 images, 8x8 patch grid)
    "vit_micro_patch4": VitShape(4, 64, 2, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "vit_mini_patch4": VitShape(4, 128, 4, 4, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3),
    "vit_tiny_patch4": VitShape(4, 192, 6, 3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # the paper's sizes
    "vit_small_patch16": VitShape(16, 384, 12, 6),
    "vit_base_patch16": VitShape(16, 768, 12, 12),
    "vit_large_patch16": VitShape(16, 1024, 24, 16),
    "vit_huge_patch14": VitShape(14, 1280, 32, 16),
}
