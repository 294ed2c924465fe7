"""Reconstruction targets and losses.

Both losses are computed in float32 whatever the autocast context, because the reductions over
thousands of tokens lose too much in bf16.
"""

import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, L, p*p*3], patch pixels in (row, col, channel) order as in MAE."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(n, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               norm_pix_loss: bool) -> torch.Tensor:
    """Per-patch MSE averaged over MASKED patches only.

    pred, target: [N, L, p*p*3]; mask: [N, L] with 1 = masked. With ``norm_pix_loss`` each target
    patch is normalised by its own mean and variance (eps 1e-6), as in MAE.
    """
    pred, target = pred.float(), target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum()


def clip_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 * cosine(pred, target), averaged over ALL L+1 tokens (cls, visible and masked).

    pred, target: [N, L+1, D].
    """
    cosine = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)
    return (2 - 2 * cosine).mean()
