"""Named encoder/decoder shapes.

The MAE/MILAN decoder for ViT-S/B/L/H is 512 wide, 8 blocks, 16 heads. The two patch-4 presets
are for 32x32 demo images and unit tests: they keep the same structure at a size that trains on
a laptop CPU in seconds.
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
    # test sizes (32x32 images, 8x8 patch grid)
    "vit_micro_patch4": VitShape(4, 64, 2, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "vit_tiny_patch4": VitShape(4, 192, 6, 3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # the paper's sizes
    "vit_small_patch16": VitShape(16, 384, 12, 6),
    "vit_base_patch16": VitShape(16, 768, 12, 12),
    "vit_large_patch16": VitShape(16, 1024, 24, 16),
    "vit_huge_patch14": VitShape(14, 1280, 32, 16),
}
