"""The frozen CLIP teacher: per-token targets and cls-to-patch attention from open_clip.

open_clip's ViT returns tokens after ``ln_post`` but not projected, and never returns attention
weights, so the teacher takes the last block's input from open_clip's public
``forward_intermediates``, computes that block's cls-query attention by hand (one query row, cheap),
then runs the block itself on its fast path, ``ln_post`` and ``proj`` on every token.
"""

import json
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer, checkpoint_filter_fn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from harness.core.errors import ConfigError, did_you_mean

# Architectures shipped with the harness (tiny towers for the demo data and the tests).
CONFIG_DIR = Path(__file__).with_name("clip_configs")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class TeacherOutput:
    targets: torch.Tensor  # [N, L+1, D]: ln_post + proj on every token, cls first
    importance: torch.Tensor  # [N, L]: last-block cls-to-patch attention, mean over heads


class ClipTeacher(nn.Module):
    """Wraps an open_clip ``VisionTransformer``; frozen, always in eval mode, never saved."""

    def __init__(self, visual: VisionTransformer, normalize: str = "imagenet") -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"the teacher's image tower is a {type(visual).__name__}, not an "
                              "open_clip VisionTransformer: choose a ViT CLIP model")
        last = visual.transformer.resblocks[-1]
        if not isinstance(last, ResidualAttentionBlock) or not isinstance(last.attn, nn.MultiheadAttention):
            raise ConfigError("the teacher's blocks are not standard open_clip attention blocks: "
                              "choose a plain ViT CLIP model")
        if len(visual.transformer.resblocks) < 2:
            raise ConfigError("the teacher's image tower has one block: its attention and targets need two or more")
        if visual.attn_pool is not None:
            raise ConfigError("teachers with attentional pooling (CoCa-style) have no per-token "
                              "targets: choose a plain ViT CLIP model")
        self.visual = visual.eval().requires_grad_(False)
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]
        self.grid_size = visual.grid_size
        self.embed_dim = visual.proj.shape[1]
        # The authors feed the student's ImageNet-normalised images to CLIP unchanged. "clip"
        # re-normalises them with CLIP's own statistics: x * std_in/std_clip + (mean_in - mean_clip)/std_clip.
        scale, shift = torch.ones(3), torch.zeros(3)
        if normalize == "clip":
            mean_in, std_in = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
            mean_c, std_c = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
            scale, shift = std_in / std_c, (mean_in - mean_c) / std_c
        elif normalize != "imagenet":
            raise ConfigError(f"unknown teacher normalisation {normalize!r}: choose imagenet or clip")
        self.renormalize = normalize == "clip"
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "ClipTeacher":
        # The teacher is frozen: keep it in eval mode whatever the surrounding module does.
        return super().train(False)

    @torch.inference_mode()  # its outputs are targets and weights: no autograd, no version counters
    def forward(self, imgs: torch.Tensor) -> TeacherOutput:
        """imgs [N, 3, H, W] (ImageNet-normalised) -> targets [N, L+1, D], importance [N, L]."""
        return self.outputs(imgs)

    def compile(self, **kwargs: Any) -> None:
        """Compile the teacher's computation (:meth:`outputs`), which :meth:`forward` runs under
        inference mode (a compiled forward that enters inference mode itself fails in torch 2.14)."""
        self.outputs = torch.compile(self.outputs, **kwargs)  # type: ignore[method-assign]

    def outputs(self, imgs: torch.Tensor) -> TeacherOutput:
        """What :meth:`forward` returns, computed in whatever grad mode the caller set."""
        if self.renormalize:
            imgs = imgs * self.input_scale + self.input_shift
        v = self.visual
        last = v.transformer.resblocks[-1]
        # the input of the last block, through open_clip's public intermediates: [N, L+1, W]
        inputs = v.forward_intermediates(imgs, indices=[len(v.transformer.resblocks) - 2], stop_early=True,
                                         intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        x = torch.cat([inputs["image_intermediates_prefix"][0], inputs["image_intermediates"][0]], dim=1)
        importance = cls_attention(last, x)[:, 1:]  # drop the cls column: [N, L]
        x = last(x)
        targets = v.ln_post(x) @ v.proj  # [N, L+1, D]
        return TeacherOutput(targets=targets, importance=importance)


def cls_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Attention of the cls query over all L+1 keys in ``block``, averaged over heads.

    x: the block's input [N, L+1, W] -> [N, L+1]. Only the cls query row is computed.
    """
    attn: nn.MultiheadAttention = block.attn
    n, tokens, width = x.shape
    heads, head_dim = attn.num_heads, width // attn.num_heads
    h = block.ln_1(x)
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    q = (h[:, :1] @ w_q.T + b_q).view(n, 1, heads, head_dim).transpose(1, 2)  # [N, heads, 1, d]
    k = (h @ w_k.T + b_k).view(n, tokens, heads, head_dim).transpose(1, 2)  # [N, heads, L+1, d]
    weights = (q @ k.transpose(-2, -1) * head_dim**-0.5).float().softmax(dim=-1)
    return weights.mean(dim=1)[:, 0]  # [N, L+1]


# ----------------------------------------------------------------------------------------
# Building a teacher by name


@cache
def _register_shipped_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def vit_model_names() -> list[str]:
    """open_clip model names (plus the shipped tiny ones) whose image tower is a plain ViT."""
    _register_shipped_configs()
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision = cfg.get("vision_cfg", {})
        # ResNet towers have a list of layers, timm towers a timm name, CoCa an attentional pool.
        if (isinstance(vision.get("layers"), int) and "timm_model_name" not in vision
                and "multimodal_cfg" not in cfg and not vision.get("attentional_pool")):
            names.append(name)
    return names


def _is_checkpoint_path(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or Path(pretrained).exists()


def resolve_model_name(model: str) -> str:
    """A registered open_clip name, or a path to a JSON model config registered on the fly."""
    _register_shipped_configs()
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"teacher model config {model} does not exist: give an open_clip "
                              "model name or the path of an open_clip model-config JSON file")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"teacher model config {model} is not valid JSON ({err.msg}): "
                              "fix the file") from None
        open_clip.add_model_config(path)
        return path.stem
    valid = vit_model_names()
    if model not in valid:
        hint = did_you_mean(model, valid, n=3)
        raise ConfigError(f"unknown teacher model {model!r}: {hint + ' ' if hint else ''}"
                          f"valid ViT CLIP models: {', '.join(valid)}")
    return model


def check_pretrained(model: str, pretrained: str | None) -> None:
    """Fail early on a missing checkpoint file or a tag that open_clip does not know."""
    if not pretrained:
        return
    if _is_checkpoint_path(pretrained):
        if not Path(pretrained).is_file():
            raise ConfigError(f"teacher checkpoint {pretrained} does not exist: fix teacher.pretrained "
                              "(a checkpoint file or an open_clip pretrained tag)")
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none (train one, or use a local checkpoint file)"
        raise ConfigError(f"teacher {model} has no pretrained tag {pretrained!r}: known tags are {known}")


@cache
def _fits(name: str, checkpoint: str, mtime_ns: int, size: int) -> None:
    teacher = build_teacher(name, checkpoint)  # raises ConfigError when the weights do not fit
    bad = [key for key, value in teacher.visual.state_dict().items() if value.is_floating_point()
           and not torch.isfinite(value).all()]
    if bad:
        raise ConfigError(f"teacher checkpoint {checkpoint} holds non-finite weights ({len(bad)} tensors, e.g. "
                          f"{bad[0]}): its targets would be NaN; use a checkpoint of a finished training")


def check_teacher_weights(model: str, pretrained: str | None) -> None:
    """A local checkpoint file is loaded into its architecture now (once per file and version in
    this process), so that a checkpoint of another model fails before any job is submitted. An
    open_clip tag is only checked by name: its weights may be downloaded on the compute nodes."""
    name = resolve_model_name(model)
    check_pretrained(name, pretrained)
    if pretrained and _is_checkpoint_path(pretrained):
        stat = Path(pretrained).stat()
        if stat.st_size == 0:
            raise ConfigError(f"teacher checkpoint {pretrained} is empty (0 bytes): copy it again, or train it again "
                              "(`bench.py teacher demo --force` for the demo teacher)")
        _fits(name, str(Path(pretrained).resolve()), stat.st_mtime_ns, stat.st_size)


def build_teacher(model: str, pretrained: str | None, normalize: str = "imagenet") -> ClipTeacher:
    """A frozen teacher from an open_clip name (or model-config JSON) and a tag or checkpoint.

    ``pretrained`` is an open_clip tag (e.g. ``openai``), a local checkpoint file, or ``None``
    for random init (tests only: random CLIP targets measure nothing). OpenAI's weights were
    trained with QuickGELU, so with the ``openai`` tag QuickGELU is forced, as open_clip's
    ``-quickgelu`` model names do; otherwise the features silently differ.
    """
    name = resolve_model_name(model)
    check_pretrained(name, pretrained)
    try:
        clip = open_clip.create_model(name, pretrained=pretrained or None,
                                      force_quick_gelu=pretrained == "openai", device="cpu")
    except (RuntimeError, AssertionError, KeyError, ValueError) as err:
        # open_clip reports a checkpoint of another architecture in any of these ways.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"teacher checkpoint {pretrained} does not fit model {name} ({first}): "
                          "use the model name the checkpoint was trained with") from None
    except Exception as err:  # noqa: BLE001 - a torn, empty or foreign file fails in torch's loader in many ways
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"teacher checkpoint {pretrained} cannot be read ({type(err).__name__}: {first[:120]}): "
                          "copy it again or give another teacher.pretrained") from None
    return ClipTeacher(clip.visual, normalize=normalize)


# ----------------------------------------------------------------------------------------
# The teacher's image tower as an encoder to evaluate (a grid's "teacher" reference)


def teacher_encoder(teacher: ClipTeacher) -> TimmVisionTransformer:
    """The teacher's image tower as timm's plain ViT, for the evaluation protocols: timm's CLIP
    layout (pre-norm, no patch bias, the tower's own activation and LayerNorm eps), its weights
    through timm's own OpenAI-CLIP converter, ``ln_post`` as the final norm and ``proj`` as the
    head (which the protocols replace). The cls token after the final norm is then exactly the
    tower's ``ln_post`` output, the feature the frozen protocols read from a student.

    A teacher that re-normalises its input (``teacher.normalize=clip``) has that affine map folded
    in: the scale into the patch projection, the constant it adds to every patch token into the
    patch tokens' position embeddings (the projection has no padding, so this is exact), so the
    ViT takes the students' ImageNet-normalised images."""
    v = teacher.visual
    block = v.transformer.resblocks[0]
    activation = type(block.mlp.gelu)
    vit = TimmVisionTransformer(
        img_size=teacher.image_size, patch_size=teacher.patch_size, embed_dim=v.conv1.out_channels,
        depth=len(v.transformer.resblocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / v.conv1.out_channels, qkv_bias=True, pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=v.ln_post.eps),
        act_layer="quick_gelu" if activation is QuickGELU else activation,
        num_classes=teacher.embed_dim)
    state = checkpoint_filter_fn({f"visual.{k}": t for k, t in v.state_dict().items()}, vit)
    if teacher.renormalize:
        weight = state["patch_embed.proj.weight"]
        patch_shift = (weight * teacher.input_shift).sum(dim=(1, 2, 3))  # [width]
        state["pos_embed"] = state["pos_embed"].clone()  # the state dict shares the teacher's storage
        state["pos_embed"][:, 1:] += patch_shift
        state["patch_embed.proj.weight"] = weight * teacher.input_scale
    vit.load_state_dict(state)  # strict: every weight of the tower finds its place, and nothing else
    return vit.eval()
