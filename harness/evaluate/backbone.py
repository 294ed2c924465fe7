"""A fresh timm ViT shaped like a pretrained encoder, holding its weights: the model the protocols
that train the encoder (fine-tuning, segmentation) start from."""

from functools import partial
from typing import Any

from timm.layers import resample_abs_pos_embed
from torch import nn
from timm.models.vision_transformer import VisionTransformer


def vit_like(encoder: VisionTransformer, *, drop_path: float, img_size: int | None = None,
             fresh: tuple[str, ...] = (), **head: Any) -> VisionTransformer:
    """A ViT with ``encoder``'s shape (a plain ViT such as vit_base_patch16_224, or a CLIP tower's
    layout: norm before the blocks, no patch bias, its activation), stochastic
    depth ``drop_path``, the head options ``head`` (timm's ``num_classes``, ``global_pool``,
    ``fc_norm``...), at ``img_size`` (the position embedding resampled as timm does, bicubic) or
    the encoder's own size, holding the encoder's weights.

    The encoder's ``norm``, ``fc_norm`` and ``head`` are not carried over; the new model's
    parameters under the prefixes ``fresh`` stay freshly initialised. Any other parameter the
    encoder has that this ViT lacks, or the reverse, raises instead of being dropped.
    """
    block = encoder.blocks[0]
    size = img_size or encoder.patch_embed.img_size
    model = VisionTransformer(
        img_size=size,
        patch_size=encoder.patch_embed.patch_size,
        in_chans=encoder.patch_embed.proj.in_channels,
        embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        class_token=encoder.has_class_token,
        reg_tokens=encoder.num_reg_tokens,
        no_embed_class=encoder.no_embed_class,
        dynamic_img_size=encoder.dynamic_img_size,
        norm_layer=partial(type(block.norm1), eps=block.norm1.eps),
        act_layer=type(block.mlp.act),
        pre_norm=not isinstance(encoder.norm_pre, nn.Identity),  # CLIP towers (a grid's teacher reference)
        drop_path_rate=drop_path,
        **head,
    )
    pretrained = {name: value for name, value in encoder.state_dict().items()
                  if not name.startswith(("norm.", "fc_norm.", "head."))}
    if pretrained["pos_embed"].shape != model.pos_embed.shape:
        pretrained["pos_embed"] = resample_abs_pos_embed(
            pretrained["pos_embed"], new_size=model.patch_embed.grid_size, old_size=encoder.patch_embed.grid_size,
            num_prefix_tokens=0 if encoder.no_embed_class else encoder.num_prefix_tokens)
    loaded = model.load_state_dict(pretrained, strict=False)
    not_loaded = sorted(name for name in loaded.missing_keys if not name.startswith(("norm.", *fresh)))
    if loaded.unexpected_keys or not_loaded:
        raise ValueError("encoder does not map onto a plain timm ViT: "
                         f"unexpected {loaded.unexpected_keys}, missing {not_loaded}")
    return model
