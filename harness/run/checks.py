"""Everything about one run's config that can be checked before any training: the teacher's name and
weights, the student's shapes, the pretraining data, and the data of each evaluation protocol it
selects (its own check, from the registry). Raises a one-line UserError."""

from pathlib import Path

import open_clip
import torch

from harness.config import RunConfig
from harness.core.errors import ConfigError
from harness.core.distributed import resolve_device
from harness.data.datasets import check_image_folder, check_image_sample, count_images
from harness.evaluate.protocols import PROTOCOLS
from harness.milan.model import build_student
from harness.milan.switches import needs_teacher
from harness.milan.presets import PRESETS
from harness.milan.teacher import check_teacher_weights, resolve_model_name


def preflight(cfg: RunConfig, *, world_size: int = 1, here: bool = True) -> None:
    """Everything that can be checked before any training: raises a one-line UserError. ``world_size``:
    the ranks the run trains on; ``here``: it runs on this machine (its device is checked)."""
    if here:
        resolve_device(cfg.runtime.device)
    if cfg.pretrain.weights_from is None:  # else it evaluates a finished run's encoder and trains nothing
        _check_pretraining(cfg, world_size)
    # protocols that read the same data share its check
    for check in dict.fromkeys(PROTOCOLS[name].check_data for name in cfg.eval.protocols):
        check(cfg)


def _check_pretraining(cfg: RunConfig, world_size: int) -> None:
    """The teacher, the student's shape and the training split."""
    m = cfg.model
    teacher_grid = None
    if needs_teacher(m.target, m.masking):
        name = resolve_model_name(cfg.teacher.model)
        check_teacher_weights(name, cfg.teacher.pretrained)
        vision = open_clip.get_model_config(name)["vision_cfg"]
        teacher_grid = vision["image_size"] // vision["patch_size"]
    # the student's shape checks, on the meta device (no memory, no time)
    with torch.device("meta"):
        build_student(m.size, img_size=m.img_size, decoder=m.decoder, pred_dim=1,
                      mask_ratio=m.mask_ratio, decoder_embed_dim=m.decoder_width,
                      decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads)
    student_grid = m.img_size // PRESETS[m.size].patch_size
    if teacher_grid is not None and teacher_grid != student_grid:
        raise ConfigError(f"teacher {cfg.teacher.model} has a {teacher_grid}x{teacher_grid} patch grid but "
                          f"the student ({m.size} at {m.img_size}px) has {student_grid}x{student_grid}: "
                          "choose a teacher with the student's patch grid or change model.img_size")
    check_image_folder(cfg.data.root, cfg.data.train_split)
    check_image_sample(cfg.data.root, cfg.data.train_split, jpeg_only=cfg.data.decode == "gpu")
    p = cfg.pretrain
    step = p.batch_size * p.accum_steps * world_size
    images = count_images(Path(cfg.data.root) / cfg.data.train_split) or 0
    if p.epochs and images < step:
        raise ConfigError(f"the training split {cfg.data.root}/{cfg.data.train_split} has {images} images, fewer "
                          f"than one optimizer step ({p.batch_size} x {p.accum_steps} accumulation x {world_size} "
                          "rank(s)): lower pretrain.batch_size or pretrain.accum_steps")
