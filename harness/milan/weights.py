"""Published and local checkpoints: reading them, and moving the encoder into timm's ViT.

MAE and MILAN release pretraining checkpoints with the weights under the key ``model`` in the
reference naming (see ``model.py``); the harness writes its own the same way. Downstream
evaluation runs on timm's plain ``VisionTransformer``, whose ``vit_base_patch16_224`` naming
matches the MAE encoder key for key, so any of these checkpoints evaluates the same way.
"""

import argparse
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from harness.core.errors import ConfigError
from harness.milan.presets import PRESETS

DECODER_PREFIXES = ("decoder_", "mask_token")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint file: the ``model`` entry if present, else the whole dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: give the path of a pretraining checkpoint")
    try:
        # The authors' training checkpoints (MAE's checkpoint-<epoch>.pth) also hold their
        # argparse.Namespace of arguments: allowed, still without unpickling arbitrary code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise ConfigError(f"checkpoint {path} could not be read ({type(err).__name__}): "
                          "give a PyTorch checkpoint file") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {path} holds no state dict (expected weights under 'model')")
    return state


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of a pretraining state dict (decoder and mask token dropped)."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}


def infer_size(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(preset name, image size) of the encoder stored in ``state``."""
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        num_tokens = state["pos_embed"].shape[1]
    except KeyError as err:
        raise ConfigError(f"checkpoint has no {err.args[0]!r}: it is not an MAE/MILAN ViT checkpoint") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, shape in PRESETS.items():
        if (shape.embed_dim, shape.depth, shape.patch_size) == (width, depth, patch):
            grid = round((num_tokens - 1) ** 0.5)
            return name, grid * patch
    raise ConfigError(f"no preset matches the checkpoint's encoder (width {width}, depth {depth}, "
                      f"patch {patch}): known presets are {', '.join(PRESETS)}")


def build_timm_vit(size: str, img_size: int, *, num_classes: int = 0, global_pool: str = "token",
                   fc_norm: bool | None = None, drop_path_rate: float = 0.0) -> VisionTransformer:
    """timm's plain ViT with the shape of an MAE/MILAN encoder preset."""
    if size not in PRESETS:
        raise ConfigError(f"unknown model size {size!r}: choose one of {', '.join(PRESETS)}")
    shape = PRESETS[size]
    return VisionTransformer(
        img_size=img_size, patch_size=shape.patch_size, embed_dim=shape.embed_dim,
        depth=shape.depth, num_heads=shape.num_heads, mlp_ratio=shape.mlp_ratio, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
        global_pool=global_pool, fc_norm=fc_norm, drop_path_rate=drop_path_rate)


def load_encoder_into_timm(vit: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Copy an MAE/MILAN encoder into ``vit``; every encoder weight must find its place."""
    encoder = encoder_state_dict(state)
    if isinstance(vit.norm, nn.Identity):
        # Global-pool ViTs (MAE fine-tuning) replace the final norm by a fresh fc_norm.
        encoder = {k: v for k, v in encoder.items() if not k.startswith("norm.")}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    # Only the classification head and fc_norm may be new.
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ConfigError(f"encoder weights do not fit the ViT: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")


def timm_encoder_from_checkpoint(path: str | Path, **kwargs) -> tuple[VisionTransformer, str, int]:
    """(timm ViT with the checkpoint's encoder, preset name, image size)."""
    state = read_state_dict(path)
    size, img_size = infer_size(state)
    vit = build_timm_vit(size, img_size, **kwargs)
    load_encoder_into_timm(vit, state)
    return vit, size, img_size
