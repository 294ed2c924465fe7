"""Learning-rate schedule: per-iteration linear warm-up, then half-cycle cosine (MAE).

Written out rather than timm's ``CosineLRScheduler``: both follow the authors' formula (MAE's
``util/lr_sched.py``) to within 1e-15 of the peak lr (tests/test_milan_model.py), but timm orders
the operations differently and would change this schedule's values in the last bit at about a
quarter of the steps (232 of 1,000, measured): every run's numbers would move.
"""

import math


def lr_at(step: int, *, base: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return base * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * effective batch / 256."""
    return base_lr * effective_batch / 256
