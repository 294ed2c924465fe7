"""The grid's teacher reference: the frozen teacher's image tower as a timm ViT (exactly the tower's
features), its cells per seed and teacher, and "student vs teacher" in the effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness.evaluate.backbone import vit_like
from harness.grid import build_grid
from harness.milan.teacher import build_teacher, teacher_encoder
from harness.report.effects import TEACHER_EFFECT, estimate_effects

BASE = {"model": {"size": "vit_micro_patch4", "img_size": 32}, "data": {"root": "data/demo"},
        "teacher": {"model": "milan-clip-micro", "pretrained": None}, "eval": {"protocols": ["linear", "knn"]}}
MILAN_AXES = {"model.target": ["pixel", "clip"], "model.decoder": ["standard", "prompting"],
              "model.masking": ["random", "semantic"]}


@pytest.mark.parametrize("normalize", ["imagenet", "clip"])
def test_teacher_encoder_gives_the_towers_own_features(normalize: str) -> None:
    """The cls token after the ViT's final norm, through its head, is the tower's image embedding
    (ln_post, proj), on the students' ImageNet-normalised input, with CLIP's re-normalisation folded
    in; the teacher itself is left untouched."""
    torch.manual_seed(0)
    teacher = build_teacher("milan-clip-micro", None, normalize)
    with torch.no_grad():  # a random-init tower's position embedding is small: make the folded shift matter
        teacher.visual.positional_embedding.normal_()
    before = {k: v.clone() for k, v in teacher.visual.state_dict().items()}
    vit = teacher_encoder(teacher)
    images = torch.randn(3, 3, 32, 32)
    tower_input = images * teacher.input_scale + teacher.input_shift
    with torch.no_grad():
        expected = teacher.visual(tower_input)
        got = vit.forward_head(vit.forward_features(images))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in teacher.visual.state_dict().items())
    # the fine-tune protocols' copy keeps the CLIP layout (pre-norm, its activation, no patch bias)
    copy = vit_like(vit, drop_path=0.0, num_classes=5, fresh=("head.",))
    assert not isinstance(copy.norm_pre, torch.nn.Identity) and copy.patch_embed.proj.bias is None
    with torch.no_grad():
        torch.testing.assert_close(copy.forward_features(images)[:, 1:], vit.forward_features(images)[:, 1:])


def test_one_teacher_cell_per_seed_and_teacher_with_the_cells_protocols() -> None:
    grid = build_grid({"name": "g", "base": BASE, "axes": MILAN_AXES, "seeds": 2})
    teachers = [c for c in grid.cells if c.is_teacher_reference]
    assert [c.seed for c in teachers] == [0, 1] and {c.name for c in teachers} == {"teacher"}
    for cell in teachers:
        cfg = cell.config
        assert cfg.eval.encoder == "teacher" and cfg.pretrain.epochs == 0 and not cell.is_random_init
        assert cfg.eval.protocols == ("linear", "knn") and cfg.teacher == grid.cells[0].config.teacher
    assert len([c for c in grid.cells if c.is_random_init]) == 2 and len(grid.cells) == 8 * 2 + 2 + 2
    # two teachers on an axis: a reference for each
    two = build_grid({"name": "g", "base": BASE, "axes": {"teacher.normalize": ["imagenet", "clip"]}})
    assert len([c for c in two.cells if c.is_teacher_reference]) == 2


def test_no_teacher_cell_without_a_teacher_or_when_the_grid_opts_out() -> None:
    mae = {**BASE, "model": {**BASE["model"], "target": "pixel", "masking": "random"}}
    pixel = build_grid({"name": "g", "base": mae, "axes": {"model.mask_ratio": [0.5, 0.75]}})
    assert not any(c.is_teacher_reference for c in pixel.cells)
    opted_out = build_grid({"name": "g", "base": BASE, "axes": MILAN_AXES, "teacher_reference": False})
    assert not any(c.is_teacher_reference for c in opted_out.cells)


def test_a_teacher_config_that_trains_is_refused() -> None:
    from harness.config import parse_config
    from harness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.encoder is teacher"):
        parse_config({"eval": {"encoder": "teacher"}, "pretrain": {"epochs": 1, "warmup_epochs": 0}})


def test_student_vs_teacher_is_the_clip_cells_mean_minus_the_teacher() -> None:
    """Four cells (target x decoder), the teacher, three seeds: the effect is the mean of the two
    CLIP-target cells minus the teacher, with an interval from the seed-blocked OLS."""
    rng = np.random.default_rng(0)
    means = {("pixel", "standard"): 20.0, ("pixel", "prompting"): 21.0, ("clip", "standard"): 30.0,
             ("clip", "prompting"): 32.0}
    rows = []
    for seed in range(3):
        for i, ((target, decoder), mean) in enumerate(means.items()):
            rows.append({"cell_id": f"c{i}", "cell": f"{target} {decoder}", "role": "cell", "seed": seed,
                         "model.target": target, "model.decoder": decoder, "status": "done",
                         "linear_top1": mean + rng.normal(0, 0.1)})
        rows.append({"cell_id": "t", "cell": "teacher", "role": "teacher", "seed": seed,
                     "model.target": "pixel", "model.decoder": "standard", "status": "done",
                     "linear_top1": 40.0 + rng.normal(0, 0.1)})
    runs = pd.DataFrame(rows)
    runs.attrs = {"axes": ["model.target", "model.decoder"],
                  "axis_baselines": {"model.target": "pixel", "model.decoder": "standard"},
                  "metrics": ["linear_top1"]}
    effects = estimate_effects(runs, "linear_top1", margin=1.0).set_index("effect")
    row = effects.loc[TEACHER_EFFECT]
    assert row["levels"] == "mean of 2 cells − teacher"
    assert row["estimate"] == pytest.approx(31.0 - 40.0, abs=0.3)
    assert row["ci_low"] < row["estimate"] < row["ci_high"] and row["verdict"] == "resolved -"
    # the teacher's runs are no cell: the target effect is the cells' own
    assert effects.loc["target", "estimate"] == pytest.approx(10.5, abs=0.3)


def test_the_paper_grids_teacher_row_sits_beside_ft_clip() -> None:
    """The reference table's teacher row: the teacher runs' fine-tune top-1 beside FT-CLIP's 85.7."""
    from harness.report.tables import PAPER, reference_table

    runs = pd.DataFrame({"role": ["cell", "teacher", "teacher"], "status": ["done"] * 3,
                         "model.target": ["clip", "pixel", "pixel"], "finetune_top1": [85.0, 85.2, 85.6]})
    runs.attrs = {"axes": ["model.target"], "axis_baselines": {"model.target": "pixel"}, "metrics": ["finetune_top1"],
                  "paper_setting": True}
    table = reference_table(runs).set_index("cell")
    row = table.loc["CLIP ViT-B/16 (teacher)"]
    assert row[PAPER] == 85.7 and row["n"] == 2 and row["measured_mean"] == pytest.approx(85.4)


def test_until_resolved_may_name_the_teacher_effect() -> None:
    from harness.report.sequential import scope_for

    axes = ["model.target", "model.decoder"]
    assert scope_for(axes, True, ["teacher", "target"], teacher=True) == [TEACHER_EFFECT, "target"]
    with pytest.raises(ValueError, match="no effect 'teacher'"):
        scope_for(axes, True, ["teacher"], teacher=False)  # a grid without teacher runs
