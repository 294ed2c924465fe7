"""Frozen-encoder inference: the precision policy, the cls-token features of the classification
protocols and the patch-token maps of the segmentation probe."""

from collections.abc import Callable, Iterable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, plain fp32 elsewhere.

    bf16 matmuls are about half as fast as fp32 on the CPUs this project is tested on, so autocast
    only pays off on a GPU.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cls_features(encoder: VisionTransformer, images: Tensor, device: torch.device) -> Tensor:
    """The cls token after the encoder's final norm (MAE's linear-probe feature), as float32.

    Runs in whatever grad mode and train/eval mode the caller has set.
    """
    if encoder.cls_token is None:
        raise ValueError("the encoder has no cls token; the protocols read features from it")
    with autocast(device):
        tokens = encoder.forward_features(images.to(device, non_blocking=True))
    return tokens[:, 0].float()


def patch_features(encoder: VisionTransformer, images: Tensor, device: torch.device) -> Tensor:
    """The patch tokens after the encoder's final norm as a map [B, D, h, w], in float16 (a
    segmentation split's maps are large: 6 GB for ADE20K's 20k training images at 224 px)."""
    with autocast(device):
        tokens = encoder.forward_features(images.to(device, non_blocking=True))
    grid = encoder.patch_embed.dynamic_feat_size(images.shape[-2:])
    patches = tokens[:, encoder.num_prefix_tokens:]
    return patches.transpose(1, 2).reshape(len(images), -1, *grid).half()


@torch.inference_mode()
def extract_features(
    encoder: VisionTransformer,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    feature: Callable[[VisionTransformer, Tensor, torch.device], Tensor] = cls_features,
    label_dtype: torch.dtype = torch.long,
) -> tuple[Tensor, Tensor]:
    """``feature(encoder, images, device)`` of every batch in `loader` (by default the cls
    features, float32) and its labels as ``label_dtype``, as CPU tensors.

    The encoder is moved to `device` and run in eval mode; its previous train/eval mode is
    restored afterwards. Features come back on the CPU so that a whole data set fits whatever the
    GPU memory.
    """
    was_training = encoder.training
    encoder.to(device).eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            features.append(feature(encoder, images, device).cpu())
            labels.append(targets.to(label_dtype).cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)
