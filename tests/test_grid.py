"""Grid files -> cells: expansion, stable ids, rules, variants, seeds, and every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.config import RunConfig
from harness.core.errors import ConfigError
from harness.grid import MILAN_BASELINES, build_grid, find_grid_file, load_grid

REPO = Path(__file__).resolve().parents[1]

BASE = {"model": {"size": "vit_micro_patch4", "img_size": 32}, "data": {"root": "data/demo"}}
MILAN_AXES = {"model.target": ["pixel", "clip"], "model.decoder": ["standard", "prompting"],
              "model.masking": ["random", "semantic"]}


def grid(**fields) -> dict:
    """A grid without its random-init reference cells (tested on their own below)."""
    return {"name": "g", "base": BASE, "random_init": False, "teacher_reference": False, **fields}


def write(tmp_path: Path, data: dict, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_milan_grid_expands_in_axis_order() -> None:
    g = build_grid(grid(axes=MILAN_AXES))
    assert len(g.cells) == 8
    assert g.cells[0].axes == (("model.target", "pixel"), ("model.decoder", "standard"),
                               ("model.masking", "random"))
    assert g.cells[-1].name == "target=clip decoder=prompting masking=semantic"
    assert g.cells[-1].config.model.target == "clip" and g.cells[-1].config.model.size == "vit_micro_patch4"
    assert g.baselines == MILAN_BASELINES
    assert len({c.run_id for c in g.cells}) == 8 and len({c.folder for c in g.cells}) == 8


def test_ids_are_the_configs_ids_and_stable_across_key_order(tmp_path: Path) -> None:
    g = build_grid(grid(axes=MILAN_AXES))
    cell = g.cells[5]
    assert cell.run_id == cell.config.run_id() and cell.cell_id == cell.config.cell_id()
    # the same grid written with every mapping in reverse order, base given as dotted keys
    reordered = {"axes": dict(reversed(MILAN_AXES.items())), "base": {"data.root": "data/demo",
                 "model.img_size": 32, "model.size": "vit_micro_patch4"}, "name": "g",
                 "random_init": False, "teacher_reference": False}
    again = load_grid(write(tmp_path, reordered))
    assert {c.run_id for c in again.cells} == {c.run_id for c in g.cells}
    assert build_grid(grid(axes=MILAN_AXES)).cells == g.cells  # deterministic


def test_folder_names_are_readable_and_unique() -> None:
    g = build_grid(grid(axes={"model.mask_ratio": [0.5, 0.75]}, seeds=2))
    assert [c.folder for c in g.cells] == [
        f"mask_ratio-{r}_s{s}_{c.run_id[:8]}" for c, (r, s) in zip(g.cells, [(0.5, 0), (0.5, 1), (0.75, 0), (0.75, 1)])]


def test_seeds_count_or_list() -> None:
    g = build_grid(grid(axes={"model.target": ["pixel", "clip"]}, seeds=3))
    assert [(c.name, c.seed) for c in g.cells][:3] == [("target=pixel", 0), ("target=pixel", 1), ("target=pixel", 2)]
    assert len({c.cell_id for c in g.cells}) == 2 and len({c.run_id for c in g.cells}) == 6
    listed = build_grid(grid(seeds=[3, 7]))
    assert [c.seed for c in listed.cells] == [3, 7] and [c.config.seed for c in listed.cells] == [3, 7]
    assert listed.cells[0].name == "baseline"


def test_include_and_exclude() -> None:
    excl = build_grid(grid(axes=MILAN_AXES, exclude=[{"target": "pixel", "masking": "semantic"}]))
    assert len(excl.cells) == 6
    assert not any(c.axis_values["model.target"] == "pixel" and c.axis_values["model.masking"] == "semantic"
                   for c in excl.cells)
    incl = build_grid(grid(axes=MILAN_AXES, include=[{"model.target": "clip"}, {"decoder": "standard"}],
                           exclude=[{"masking": ["random"]}]))
    # (clip or standard) and not random
    assert sorted(c.name for c in incl.cells) == sorted([
        "target=clip decoder=standard masking=semantic", "target=clip decoder=prompting masking=semantic",
        "target=pixel decoder=standard masking=semantic"])


def test_named_variants() -> None:
    axes = {"teacher": {"small": {"teacher.model": "milan-clip-micro"},
                        "big": {"teacher": {"model": "ViT-B-16-quickgelu", "pretrained": "openai"}}},
            "model.mask_ratio": [0.5, 0.75]}
    g = build_grid(grid(axes=axes))
    assert [c.name for c in g.cells] == ["teacher=small mask_ratio=0.5", "teacher=small mask_ratio=0.75",
                                         "teacher=big mask_ratio=0.5", "teacher=big mask_ratio=0.75"]
    assert g.cells[2].config.teacher.model == "ViT-B-16-quickgelu" and g.cells[2].config.teacher.pretrained == "openai"
    assert g.baselines == {"teacher": "small", "model.mask_ratio": 0.5}
    assert g.axes_spec()[0] == {"name": "teacher", "values": ["small", "big"], "baseline": "small"}
    rule = build_grid(grid(axes=axes, exclude=[{"teacher": "big", "mask_ratio": 0.5}]))
    assert len(rule.cells) == 3


def test_baseline_of_other_axes_is_the_first_value() -> None:
    g = build_grid(grid(axes={"model.masking": ["semantic", "random"], "model.decoder_depth": [4, 2]}))
    assert g.baselines == {"model.masking": "random", "model.decoder_depth": 4}


def test_base_config_file_and_command_line_changes(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump({**BASE, "pretrain": {"epochs": 3, "warmup_epochs": 0.1}}))
    path = write(tmp_path, {"name": "g", "base_config": "configs/run.yaml", "base": {"pretrain.epochs": 2},
                            "axes": {"model.target": ["pixel", "clip"]}, "random_init": False,
                            "teacher_reference": False})
    g = load_grid(path)
    assert g.cells[0].config.pretrain.epochs == 2 and g.cells[0].config.model.size == "vit_micro_patch4"
    changed = load_grid(path, sets={"pretrain.epochs": 0.5}, axes={"model.mask_ratio": [0.6, 0.9]}, seeds=2)
    assert len(changed.cells) == 8 and changed.cells[0].config.pretrain.epochs == 0.5
    assert [a.name for a in changed.axes] == ["model.target", "model.mask_ratio"]
    replaced = load_grid(path, axes={"model.target": ["clip"]})
    assert [c.name for c in replaced.cells] == ["target=clip"]


def test_axis_option_selects_variants(tmp_path: Path) -> None:
    path = write(tmp_path, grid(axes={"teacher": {"a": {"teacher.model": "x"}, "b": {"teacher.model": "y"}}}))
    assert [c.name for c in load_grid(path, axes={"teacher": ["b"]}).cells] == ["teacher=b"]
    with pytest.raises(ConfigError, match=r"--axis teacher: unknown variant\(s\) c: teacher has a, b"):
        load_grid(path, axes={"teacher": ["c"]})


def test_shipped_grids_expand() -> None:
    smoke = load_grid(REPO / "ablations" / "smoke.yaml")
    seeds = len(set(c.seed for c in smoke.cells))
    # per seed: 8 cells, the random-init and the teacher reference
    assert len(smoke.cells) == 10 * seeds and smoke.baselines == MILAN_BASELINES
    assert smoke.cells[-1].is_teacher_reference and sum(c.is_random_init for c in smoke.cells) == seeds
    assert sum(c.is_teacher_reference for c in smoke.cells) == seeds
    assert smoke.cells[0].config.teacher.model == "milan-clip-tiny"  # from configs/smoke.yaml
    paper = load_grid(REPO / "ablations" / "milan_vitb_in1k.yaml")
    cfg: RunConfig = paper.cells[-3].config
    assert paper.cells[-2].is_random_init and paper.cells[-2].config.eval == cfg.eval
    # the paper's teacher, CLIP ViT-B/16, fine-tuned and probed as the cells are
    teacher = paper.cells[-1].config
    assert paper.cells[-1].is_teacher_reference and teacher.eval.protocols == cfg.eval.protocols
    assert (teacher.teacher.model, teacher.teacher.pretrained) == ("ViT-B-16-quickgelu", "openai")
    p = cfg.pretrain
    assert (p.batch_size * paper.resources.tasks * p.accum_steps, p.epochs, p.warmup_epochs) == (4096, 400, 40)
    assert (cfg.teacher.model, cfg.teacher.pretrained, paper.resources.gpus_per_node) == ("ViT-B-16-quickgelu", "openai", 8)
    assert paper.spec.paper_setting and set(cfg.eval.protocols) == {"linear", "finetune"}
    other = load_grid(REPO / "ablations" / "mask_ratio_decoder.yaml")
    assert len(other.cells) == 19 and other.baselines["decoder_width"] == "narrow"  # 17 cells, 2 references


def test_random_init_reference_per_seed_and_student_size() -> None:
    g = build_grid({**grid(axes={**MILAN_AXES, "model.size": ["vit_micro_patch4", "vit_mini_patch4"]}),
                    "random_init": True, "seeds": 2})
    references = [c for c in g.cells if c.is_random_init]
    assert len(g.cells) == 16 * 2 + 4 and len(references) == 4  # 2 seeds x 2 student sizes
    assert {(c.config.model.size, c.seed) for c in references} == {
        (size, seed) for size in ("vit_micro_patch4", "vit_mini_patch4") for seed in (0, 1)}
    for ref in references:  # the untrained encoder: no pretraining, MAE side of the switches (no teacher)
        assert ref.name == "random init" and ref.axes == () and ref.config.pretrain.epochs == 0
        assert (ref.config.model.target, ref.config.model.masking) == ("pixel", "random")
        assert ref.folder.startswith("random_init_s") and ref.run_name == f"random init seed={ref.seed}"
    assert len({c.run_id for c in g.cells}) == len(g.cells)  # ids stay unique
    assert not any(c.is_random_init for c in build_grid(grid(axes=MILAN_AXES)).cells)  # random_init: false


def test_find_grid_file_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert find_grid_file("smoke") == Path("ablations/smoke.yaml")
    with pytest.raises(ConfigError, match=r"grid 'nope' not found: .*shipped grids: .*smoke"):
        find_grid_file("nope")


# --- validation: one line naming the file/field and the fix ------------------------------------

@pytest.mark.parametrize(("data", "message"), [
    (grid(axes={"model.targt": ["pixel"]}),
     r"/g.yaml: axis: unknown config field 'model.targt': did you mean model.target\?$"),
    (grid(axes={"model.target": []}),
     r"/g.yaml: axis 'model.target' has no values: list at least one or remove the axis$"),
    (grid(axes={"teacher": {}}), r"axis 'teacher' has no variants"),
    (grid(axes={"teacher": {"a": {"teacher.modl": "x"}}}),
     r"axis teacher, variant 'a': unknown config field 'teacher.modl': did you mean teacher.model\?"),
    (grid(axes={"model.target": ["pixel", "clip2"]}),
     r"/g.yaml: cell target=clip2: model.target: Input should be 'pixel' or 'clip' \(got 'clip2'\)$"),
    (grid(axes={"model.mask_ratio": [0.5, "lots"]}), r"cell mask_ratio=lots: model.mask_ratio: Input should be a valid number.*\(got .lots.\)$"),
    (grid(axes={"model.target": ["pixel", "pixel"]}),
     r"cells 'target=pixel seed=0' and 'target=pixel seed=0' have identical configs: remove the repeated"),
    (grid(axes={"a": {"x": {"model.target": "clip"}, "y": {"model.target": "clip"}}}),
     r"cells 'a=x seed=0' and 'a=y seed=0' have identical configs"),
    (grid(axes=MILAN_AXES, exclude=[{"colour": "red"}]),
     r"/g.yaml: exclude\[0\]: unknown axis 'colour': the grid's axes are model.target, model.decoder, model.masking$"),
    (grid(axes=MILAN_AXES, include=[{"target": "rgb"}]),
     r"/g.yaml: include\[0\]: model.target has no value 'rgb': its values are pixel, clip$"),
    (grid(axes=MILAN_AXES, include=[{"target": "clip"}], exclude=[{"target": "clip"}]),
     r"include/exclude leave no cells"),
    (grid(axes={"seed": [1, 2]}), r"vary seeds with `seeds:`"),
    (grid(base={"model": {"sise": "x"}}), r"/g.yaml: base: unknown config key 'model.sise': did you mean model.size\?$"),
    (grid(base={"pretrain": {"epochs": -1}}), r"/g.yaml: base: pretrain.epochs: .*greater than or equal to 0"),
    ({**grid(), "axis": {}}, r"/g.yaml: unknown grid field 'axis': did you mean axes\?$"),
    ({**grid(), "resources": {"gpu_per_node": 8}}, r"unknown grid field 'resources.gpu_per_node': did you mean resources.gpus_per_node\?"),
    ({**grid(), "resources": {"time_min": 2}}, r"resources.time_min: .*greater than or equal to 3"),
    ({**grid(), "seeds": 0}, r"seeds: give a number of seeds >= 1"),
    ({**grid(), "name": "has space"}, r"/g.yaml: name: String should match pattern"),
    ({**grid(), "base_config": "missing.yaml"}, r"base_config missing.yaml not found"),
])
def test_validation_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_grid(write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_command_line_set_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"g.yaml: --set: unknown config key 'pretrain.epoch'"):
        load_grid(write(tmp_path, grid()), sets={"pretrain.epoch": 1})


def test_the_ade20k_grid_evaluates_the_in1k_cells_without_pretraining_them_again() -> None:
    """Every cell of milan_vitb_ade20k is its twin in milan_vitb_in1k with the segmentation `eval`
    and pretrain.weights_from naming the twin's folder; --set of a non-eval field changes the twins
    (as it would in their own ablate), of an eval field only this grid."""
    sets = {"data.root": "/elsewhere/imagenet", "eval.seg_upernet.root": "/elsewhere/ade"}
    twin = load_grid(REPO / "ablations" / "milan_vitb_in1k.yaml", sets={"data.root": "/elsewhere/imagenet"})
    grid = load_grid(REPO / "ablations" / "milan_vitb_ade20k.yaml", sets=sets)
    assert [c.name for c in grid.cells] == [c.name for c in twin.cells] and len(grid.cells) == 10
    assert grid.axes == twin.axes and grid.spec.seeds == twin.spec.seeds
    [teacher] = [c for c in grid.cells if c.is_teacher_reference]  # evaluated again, on ADE20K
    assert teacher.config.eval.encoder == "teacher" and teacher.config.pretrain.weights_from is None
    assert teacher.config.eval.protocols == ("seg_upernet", "seg_linear")
    for cell, twin_cell in zip(grid.cells, twin.cells):
        if cell.is_teacher_reference:
            continue
        cfg = cell.config
        assert cfg.pretrain.weights_from == f"milan_vitb_in1k/{twin_cell.folder}"
        assert cfg.eval.protocols == ("seg_upernet", "seg_linear") and cfg.eval.seg_upernet.root == "/elsewhere/ade"
        assert cfg.eval.seg_upernet.iterations == 160_000 and cfg.eval.seg_linear.root == "/datasets/ADEChallengeData2016"
        assert cfg.model == twin_cell.config.model and cfg.data.root == "/elsewhere/imagenet"
        assert cell.run_id != twin_cell.run_id
    assert grid.headline_metric == "seg_upernet_miou"


def test_a_grid_that_evaluates_another_takes_its_cells_from_it(tmp_path: Path) -> None:
    twin = {"name": "twin", "base": {"data": {"root": "data/demo"}}, "axes": {"model.target": ["pixel", "clip"]}}
    (tmp_path / "twin.yaml").write_text(yaml.safe_dump(twin))
    for extra, named in (({"axes": {"seed": [1, 2]}}, "axes"), ({"seeds": 3}, "seeds"),
                         ({"base": {"model": {"mask_ratio": 0.5}}}, "base.model.mask_ratio")):
        grid = {"name": "sibling", "evaluates": "twin.yaml", **extra}
        with pytest.raises(ConfigError, match=rf"a grid that evaluates twin.yaml takes its cells from it: remove {named}"):
            build_grid(grid, tmp_path / "sibling.yaml")
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump({"name": "twice", "evaluates": "twin.yaml"}))
    with pytest.raises(ConfigError, match="itself evaluates twin.yaml: name the grid that pretrains the cells"):
        build_grid({"name": "third", "evaluates": "twice.yaml"}, tmp_path / "third.yaml")
    with pytest.raises(ConfigError, match="grid 'nowhere.yaml' not found"):
        build_grid({"name": "lost", "evaluates": "nowhere.yaml"}, tmp_path / "lost.yaml")
