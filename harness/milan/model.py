"""The MILAN/MAE student: a masked-autoencoder ViT with a standard or prompting decoder.

Parameter names follow the MAE/MILAN reference models so that published checkpoints load with
``strict=True``: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}``, ``norm``,
``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}`` (``attn.qkv`` in
the standard decoder, ``attn.q`` + ``attn.kv`` in the prompting one), ``decoder_norm``,
``decoder_pred``. Shapes below: N batch, L patches, Lv visible, Lm = L - Lv masked, D encoder
width, C decoder width, P prediction width (p*p*3 for pixels, the teacher width for CLIP).
"""

from functools import partial

import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from harness.core.errors import ConfigError
from harness.milan.masking import binary_mask, split_ids
from harness.milan.presets import PRESETS
from harness.milan.switches import DecoderKind
from harness.milan.prompting import PromptingBlock

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, decoder: DecoderKind, decoder_embed_dim: int,
                 decoder_depth: int, decoder_num_heads: int, pred_dim: int, mask_ratio: float,
                 in_chans: int = 3) -> None:
        super().__init__()
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size

        # --- encoder --------------------------------------------------------------------
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embeddings: buffers, not parameters, but saved under the reference names.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(depth))
        self.norm = LayerNorm(embed_dim)

        # --- decoder --------------------------------------------------------------------
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_embed_dim))
        block = PromptingBlock if decoder == "prompting" else Block
        self.decoder_blocks = nn.ModuleList(
            block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim)

        self.initialize_weights()

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        """MAE's initialisation: sin-cos positions, xavier linears, N(0, 0.02) tokens."""
        grid = self.grid_size[0]
        for buf in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(buf.shape[-1], grid, cls_token=True)
            buf.copy_(torch.from_numpy(table).float().unsqueeze(0))
        # patch_embed is a conv; initialise it like a linear layer over the flattened patch.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # ------------------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W], ids_keep [N, Lv] -> latent [N, 1+Lv, D] (cls first, after norm)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [N, L, D]
        x = _gather_tokens(x, ids_keep)  # [N, Lv, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1+Lv, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor,
                        ids_masked: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+Lv, D] -> predictions for every token in original order [N, L+1, P]."""
        x = self.decoder_embed(latent)  # [N, 1+Lv, C]
        n, num_masked = x.shape[0], ids_masked.shape[1]
        if self.decoder == "standard":
            # MAE: append mask tokens, unshuffle, add positions, attend over all L+1 tokens.
            mask_tokens = self.mask_token.expand(n, num_masked, -1)
            patches = _gather_tokens(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)
            x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [N, L+1, C]
            for blk in self.decoder_blocks:
                x = blk(x)
        else:
            # Prompting: position rows gathered directly for the fixed and the masked tokens;
            # this equals unshuffling, adding positions and splitting, without the round trip.
            pos_patches = self.decoder_pos_embed[:, 1:].expand(n, -1, -1)
            fixed = x + torch.cat([self.decoder_pos_embed[:, :1].expand(n, -1, -1),
                                   _gather_tokens(pos_patches, ids_keep)], dim=1)  # [N, 1+Lv, C]
            m = self.mask_token + _gather_tokens(pos_patches, ids_masked)  # [N, Lm, C]
            for blk in self.decoder_blocks:
                m = blk(m, fixed)
            patches = _gather_tokens(torch.cat([fixed[:, 1:], m], dim=1), ids_restore)
            x = torch.cat([fixed[:, :1], patches], dim=1)  # [N, L+1, C], original order
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [N, 3, H, W], ids_shuffle [N, L] -> (pred [N, L+1, P], mask [N, L], 1 = masked)."""
        ids_keep, ids_masked, ids_restore = split_ids(ids_shuffle, self.mask_ratio)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_keep, ids_masked, ids_restore)
        return pred, binary_mask(ids_restore, ids_keep.shape[1])


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [N, L, C], ids [N, K] -> x[n, ids[n]] of shape [N, K, C]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_student(size: str, *, img_size: int, decoder: DecoderKind, pred_dim: int,
                  mask_ratio: float, decoder_embed_dim: int | None = None,
                  decoder_depth: int | None = None,
                  decoder_num_heads: int | None = None) -> MaskedAutoencoderViT:
    """Student from a preset name; ``None`` decoder fields keep the preset's decoder shape."""
    if size not in PRESETS:
        raise ConfigError(f"unknown model size {size!r}: choose one of {', '.join(PRESETS)}")
    shape = PRESETS[size]
    if img_size <= 0 or img_size % shape.patch_size:
        raise ConfigError(f"image size {img_size} is not divisible by the patch size "
                          f"{shape.patch_size} of {size}: use a multiple of {shape.patch_size}")
    if decoder not in ("standard", "prompting"):
        raise ConfigError(f"unknown decoder {decoder!r}: choose standard or prompting")
    num_patches = (img_size // shape.patch_size) ** 2
    if not 0 < mask_ratio < 1 or not 0 < int(num_patches * (1 - mask_ratio)) < num_patches:
        raise ConfigError(f"mask ratio {mask_ratio} must lie in (0, 1) and leave at least one "
                          f"visible and one masked patch of {num_patches}")
    width = decoder_embed_dim or shape.decoder_embed_dim
    heads = decoder_num_heads or shape.decoder_num_heads
    if width % heads:
        raise ConfigError(f"decoder width {width} is not divisible by its {heads} heads: "
                          f"change model.decoder_width or model.decoder_heads")
    return MaskedAutoencoderViT(
        img_size=img_size, patch_size=shape.patch_size, embed_dim=shape.embed_dim,
        depth=shape.depth, num_heads=shape.num_heads, mlp_ratio=shape.mlp_ratio, decoder=decoder,
        decoder_embed_dim=width, decoder_depth=decoder_depth or shape.decoder_depth,
        decoder_num_heads=heads, pred_dim=pred_dim, mask_ratio=mask_ratio)
