"""Frozen-encoder inference: the precision policy and the cls-token features every protocol uses."""

from collections.abc import Iterable

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


@torch.inference_mode()
def extract_features(
    encoder: VisionTransformer,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Cls-token features and labels of every batch in `loader`, as float32 / int64 CPU tensors.

    The encoder is moved to `device` and run in eval mode; its previous train/eval mode is
    restored afterwards. Features come back on the CPU so that a whole data set fits whatever the
    GPU memory.
    """
    was_training = encoder.training
    encoder.to(device).eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            features.append(cls_features(encoder, images, device).cpu())
            labels.append(targets.long().cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)
