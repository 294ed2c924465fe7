"""Mask sampling: which patches the encoder sees.

Every mask is a per-sample permutation ``ids_shuffle`` [N, L] of the patch indices. The first
``num_visible(L, mask_ratio)`` entries are kept (visible), the rest are masked. Both samplers
return such a permutation, so the model never needs to know how a mask was drawn, and tests or
evaluation can pass an explicit one.
"""

from collections.abc import Callable

import torch

from harness.core.errors import ConfigError
from harness.milan.switches import Masking


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, as the reference code computes it (truncation, not rounding)."""
    return int(num_patches * (1 - mask_ratio))


def mask_generator(seed: int, step: int, micro: int, rank: int, *, stream: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one micro-batch's masks: a function of (seed, step, micro-batch, rank,
    stream) only, so a run draws the same masks alone or beside other students, and after a resume."""
    key = ((((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank) * 3 + stream) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)


def random_ids_shuffle(batch_size: int, num_patches: int, device: torch.device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random permutation per sample: argsort of uniform noise (MAE). -> [N, L] int64."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return torch.argsort(noise, dim=1)


def semantic_ids_shuffle(importance: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Attention-weighted permutation per sample (MILAN's semantic-aware sampling).

    ``importance`` [N, L] is the teacher's cls-to-patch attention. Patches are drawn one after
    another without replacement with probability proportional to their importance; the first
    draws become the visible set, so patches the teacher attends to are more likely to be KEPT.
    -> [N, L] int64.
    """
    # multinomial needs non-negative finite float weights; the teacher may run in bf16.
    weights = importance.float().clamp_min(0)
    return torch.multinomial(weights, importance.shape[1], replacement=False, generator=generator)


# Each sampler draws from its own stream of a micro-batch's generator (mask_generator's ``stream``).
_STREAM: dict[str, int] = {"random": 0, "semantic": 1}


def draw_ids_shuffle(masking: Masking, *, batch_size: int, num_patches: int, device: torch.device,
                     importance: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The one dispatch from a mask sampling's name to its sampler: ``random`` draws uniform
    permutations, ``semantic`` weighs them by the teacher's ``importance`` [N, L]. -> [N, L] int64."""
    samplers: dict[str, Callable[[], torch.Tensor]] = {
        "random": lambda: random_ids_shuffle(batch_size, num_patches, device, generator),
        "semantic": lambda: semantic_ids_shuffle(_needs_importance(importance), generator),
    }
    if masking not in samplers:
        raise ConfigError(f"unknown mask sampling {masking!r}: choose {' or '.join(samplers)}")
    return samplers[masking]()


def stream_of(masking: Masking) -> int:
    """The generator stream a sampler draws from, so that two samplers never share random numbers."""
    return _STREAM[masking]


def _needs_importance(importance: torch.Tensor | None) -> torch.Tensor:
    if importance is None:
        raise ValueError("semantic masks are drawn from the teacher's attention: pass its importance")
    return importance


def split_ids(ids_shuffle: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (ids_keep [N, Lv], ids_masked [N, L - Lv], ids_restore [N, L]).

    ``ids_restore`` is the inverse permutation: position ``i`` of the shuffled sequence goes back
    to patch ``ids_shuffle[:, i]``, so ``gather(shuffled, ids_restore)`` is in original order.
    """
    visible = num_visible(ids_shuffle.shape[1], mask_ratio)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :visible], ids_shuffle[:, visible:], ids_restore


def binary_mask(ids_restore: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Mask in original patch order, 0 = visible, 1 = masked. -> [N, L] float."""
    mask = torch.ones(ids_restore.shape, device=ids_restore.device)
    mask[:, :num_keep] = 0
    return torch.gather(mask, 1, ids_restore)
