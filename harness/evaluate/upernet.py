"""UperNet on a plain ViT, as BEiT and MAE build it for ADE20K (and MILAN after them).

- Backbone: the pretrained ViT at the crop size (position embedding resampled), stochastic depth;
  the outputs of four blocks (for ViT-B's 12: blocks 4, 6, 8 and 12, BEiT's ``out_indices`` [3, 5,
  7, 11]), without the final norm, as maps at 1/16 of the input.
- Neck (BEiT's ``fpn1``..``fpn4``, mmseg's ``Feature2Pyramid``): the maps rescaled to 1/4, 1/8,
  1/16 and 1/32 (two transposed convolutions with BatchNorm and GELU between, one transposed
  convolution, identity, 2x2 max-pooling).
- Decode head: UperNet's pyramid pooling and FPN fusion (``segmentation_models_pytorch``'s
  ``UPerNetDecoder``, which is mmseg's ``UPerHead`` plus a LayerNorm per input that BEiT's head does
  not have: removed here), ``channels`` wide, then dropout 0.1 and a 1x1 classifier.
- Auxiliary head (training only, loss weight 0.4): mmseg's ``FCNHead`` on the third map (one 3x3
  convolution of 256 channels with BatchNorm and ReLU, dropout 0.1, a 1x1 classifier).
"""

from typing import Any

import torch
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from harness.evaluate.backbone import vit_like

AUX_CHANNELS = 256
DROPOUT = 0.1


def feature_blocks(depth: int) -> list[int]:
    """The four blocks whose outputs feed the neck: BEiT's [3, 5, 7, 11] for 12 blocks, the same
    fractions (1/3, 1/2, 2/3 and the last) for another depth (a block may feed two maps of a
    shallow ViT)."""
    return [max(0, round(depth * share) - 1) for share in (1 / 3, 1 / 2, 2 / 3)] + [depth - 1]


def _up(channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)


class ViTUperNet(nn.Module):
    """``forward(images)`` -> (logits at 4x the patch grid, auxiliary logits at the patch grid: 1/4 and
    1/16 of the input for 16-pixel patches), training or not."""

    def __init__(self, encoder: VisionTransformer, *, num_classes: int, crop_size: int, drop_path: float,
                 channels: int) -> None:
        super().__init__()
        self.backbone = vit_like(encoder, drop_path=drop_path, img_size=crop_size, num_classes=0)
        self.blocks = feature_blocks(len(self.backbone.blocks))
        # the final norm and the head take no part (every parameter must, for DDP)
        self.backbone.prune_intermediate_layers(sorted(set(self.blocks)), prune_norm=True, prune_head=True)
        width = self.backbone.embed_dim
        self.neck = nn.ModuleList([
            nn.Sequential(_up(width), nn.BatchNorm2d(width), nn.GELU(), _up(width)),
            _up(width),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ])
        # the decoder skips its first two inputs (the 1/1 and 1/2 maps of a CNN encoder)
        self.decoder = UPerNetDecoder(encoder_channels=[0, 0] + [width] * 4, encoder_depth=5,
                                      decoder_channels=channels)
        self.decoder.feature_norms = nn.ModuleList([nn.Identity() for _ in self.decoder.feature_norms])
        self.classifier = nn.Sequential(nn.Dropout2d(DROPOUT), nn.Conv2d(channels, num_classes, kernel_size=1))
        self.aux = nn.Sequential(
            nn.Conv2d(width, AUX_CHANNELS, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(AUX_CHANNELS),
            nn.ReLU(inplace=True), nn.Dropout2d(DROPOUT), nn.Conv2d(AUX_CHANNELS, num_classes, kernel_size=1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        distinct = sorted(set(self.blocks))
        maps = dict(zip(distinct, self.backbone.forward_intermediates(images, indices=distinct, norm=False,
                                                                      output_fmt="NCHW", intermediates_only=True)))
        pyramid = [scale(maps[block]) for scale, block in zip(self.neck, self.blocks)]
        logits = self.classifier(self.decoder([torch.empty(0), torch.empty(0), *pyramid]))
        return logits, self.aux(pyramid[2])

    # --- timm's optimizer factory reads these for layer-wise lr decay ---------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's layers as timm's ViT numbers them (stem 0, block i at i + 1); the neck and
        heads fall after the last, at the full lr (BEiT's layer-decay constructor does the same)."""
        return {"stem": r"^backbone\.(?:cls_token|pos_embed|patch_embed|reg_token)",
                "blocks": [(r"^backbone\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
