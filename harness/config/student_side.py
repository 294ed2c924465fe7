"""Which runs can train as one job: one data stream and one teacher forward for several students.

Two runs can share when they differ only on the *student side*: what the student is and what it
learns (its architecture, target, decoder, mask sampling and ratio, its loss, its optimiser) and
how it is evaluated afterwards. Everything else is *shared*: the seed, the data and its
augmentation, the teacher, the batch schedule (epochs, batch size, accumulation), the precision
and the runtime. Runs with equal shared parts see the same batches in the same order; this module
is the one definition of that split, used by ``ablate`` (grouping), the group job (a check) and
the report (which cells were paired).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from harness.config import RunConfig

# Dotted prefixes of the student side; every other field is shared by a group.
STUDENT_SIDE: tuple[str, ...] = (
    "model.size", "model.target", "model.decoder", "model.masking", "model.mask_ratio", "model.norm_pix_loss",
    "model.decoder_width", "model.decoder_depth", "model.decoder_heads",
    "pretrain.warmup_epochs", "pretrain.base_lr", "pretrain.lr", "pretrain.min_lr", "pretrain.weight_decay",
    "pretrain.betas", "pretrain.clip_grad",
    "eval.",
)


def is_student_side(field: str) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in STUDENT_SIDE)


def shared_part(cfg: RunConfig) -> dict[str, Any]:
    """The fields a group's runs must agree on (dotted keys), runtime included."""
    return {k: v for k, v in cfg.flat().items() if not is_student_side(k)}


def share_key(cfg: RunConfig) -> str:
    """A stable id of :func:`shared_part`: runs with equal keys can train in one group job."""
    text = json.dumps(shared_part(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def check_shareable(configs: Sequence[RunConfig]) -> None:
    """Raise ValueError naming the first shared field on which ``configs`` differ."""
    first = shared_part(configs[0])
    for cfg in configs[1:]:
        other = shared_part(cfg)
        if other != first:
            field = next(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ValueError(f"runs {configs[0].run_id()} and {cfg.run_id()} differ on the shared field {field} "
                             f"({first.get(field)!r} vs {other.get(field)!r}): they cannot train as one group")


T = TypeVar("T")


def group_by_share_key(items: Sequence[T], configs: Sequence[RunConfig]) -> list[list[T]]:
    """``items`` grouped by their configs' share keys; groups and members in first-seen order."""
    groups: dict[str, list[T]] = {}
    for item, cfg in zip(items, configs):
        groups.setdefault(share_key(cfg), []).append(item)
    return list(groups.values())
