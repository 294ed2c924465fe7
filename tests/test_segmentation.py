"""Semantic segmentation: the mIoU against a hand-computed case, the data tree and its checks, the
sliding-window inference, UperNet's shape and recipe, and both protocols resuming exactly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

from harness.data.datasets import DatasetError
from harness.data.segmentation import (IGNORE, SegmentationSet, check_segmentation_tree, eval_transform,
                                       read_num_classes, reduce_zero_label, segmentation_pairs, train_transform)
from harness.evaluate.miou import confusion_matrix, segmentation_scores
from harness.evaluate.seg_probe import segmentation_probe
from harness.evaluate.upernet import ViTUperNet, feature_blocks
from harness.evaluate.upernet_train import finetune_upernet, slide_logits

CPU = torch.device("cpu")


# --- the metric ------------------------------------------------------------------------------------

def test_miou_matches_a_hand_computed_confusion_matrix_with_ignored_pixels() -> None:
    """Two images, 3 classes, labels with ignored pixels (255) whose predictions must not count.

    Pixels counted (label, prediction): (0,0) x3, (0,1) x1, (1,1) x2, (1,0) x1, (2,1) x1; class 2
    is never predicted right. IoU0 = 3 / (4 + 4 - 3) = 0.6, IoU1 = 2 / (3 + 4 - 2) = 0.4,
    IoU2 = 0 / (1 + 0 - 0) = 0: mIoU 33.33%; pixel accuracy 5/8; class accuracies 3/4, 2/3, 0.
    """
    labels = torch.tensor([[[0, 0, 0, 0], [1, 1, IGNORE, IGNORE]], [[1, 2, IGNORE, IGNORE], [IGNORE] * 4]])
    preds = torch.tensor([[[0, 0, 0, 1], [1, 1, 2, 2]], [[0, 1, 0, 0], [2, 2, 2, 2]]])
    confusion = confusion_matrix(preds[0], labels[0], 3) + confusion_matrix(preds[1], labels[1], 3)
    assert confusion.tolist() == [[3, 1, 0], [1, 2, 0], [0, 1, 0]]
    scores = segmentation_scores(confusion)
    assert scores["miou"] == pytest.approx(100 * (0.6 + 0.4 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 5 / 8)
    assert scores["mean_class_accuracy"] == pytest.approx(100 * (3 / 4 + 2 / 3 + 0) / 3)


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean() -> None:
    """mmseg's nanmean: a class with an empty union does not count as 0 (4 classes, one never seen)."""
    labels, preds = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    scores = segmentation_scores(confusion_matrix(preds, labels, 4))
    # IoU0 = 2 / 3, IoU1 = 1 / 2; classes 2 and 3: union 0
    assert scores["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_the_confusion_matrix_is_the_one_torchmetrics_would_count() -> None:
    """An independent count: numpy's 2-d histogram of (label, prediction) over the kept pixels."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 17, 19), generator=generator)
    labels[labels == 4] = IGNORE
    preds = torch.randint(0, 4, (3, 17, 19), generator=generator)
    kept = labels != IGNORE
    expected, _, _ = np.histogram2d(labels[kept].numpy(), preds[kept].numpy(), bins=[np.arange(5), np.arange(5)])
    assert confusion_matrix(preds, labels, 4).numpy().tolist() == expected[:4, :4].astype(int).tolist()


# --- the data -----------------------------------------------------------------------------------------

def write_tree(root: Path, *, classes: int = 3, per_split: int = 6, size: int = 32) -> Path:
    """A tree in ADE20K's layout: each image a square of class k (1..classes) on an ignored background."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index in range(per_split):
            label = np.zeros((size, size), np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            label[top:top + size // 2, left:left + size // 2] = 1 + index % classes
            pixels = np.stack([label * 60, 255 - label * 60, np.full_like(label, 128)], -1).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"img{index}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"img{index}.png")
    return root


def test_labels_are_read_as_mmseg_reduce_zero_label() -> None:
    assert reduce_zero_label(np.array([0, 1, 2, 150, 255])).tolist() == [IGNORE, 0, 1, 149, IGNORE]


def test_a_good_tree_passes_and_each_problem_is_one_line(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tree")
    check_segmentation_tree(root, "training", 3)
    assert len(segmentation_pairs(root, "validation")) == 6
    with pytest.raises(DatasetError, match="holds label 3 but the tree has 2 classes"):
        check_segmentation_tree(root, "training", 2)
    with pytest.raises(DatasetError, match=r"img2.png holds label 3 but the tree has 2 classes"):  # mid-run too
        SegmentationSet(segmentation_pairs(root, "training"), eval_transform(32), num_classes=2)[2]
    with pytest.raises(DatasetError, match="does not exist"):
        check_segmentation_tree(root, "train", 3)
    (root / "annotations" / "training" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"img1.jpg has no partner .*every image needs a label map"):
        check_segmentation_tree(root, "training", 3)
    Image.new("RGB", (32, 32)).save(root / "annotations" / "training" / "img1.png")
    with pytest.raises(DatasetError, match="is RGB: label maps are 8-bit single-channel"):
        check_segmentation_tree(root, "training", 3)
    Image.new("L", (16, 32)).save(root / "annotations" / "training" / "img1.png")
    with pytest.raises(DatasetError, match="is 32x32 but its label map is 16x32"):
        check_segmentation_tree(root, "training", 3)
    (root / "annotations" / "training" / "img1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot be decoded"):
        check_segmentation_tree(root, "training", 3)


def test_the_demo_tree_gives_its_class_count(tmp_path: Path) -> None:
    from harness.data.demo import SEGMENTATION_DIR, make_demo_dataset

    make_demo_dataset(tmp_path / "demo", train_per_class=2, val_per_class=2)
    root = tmp_path / "demo" / SEGMENTATION_DIR
    assert read_num_classes(root) == 10
    check_segmentation_tree(root, "training", 10)
    image, label = SegmentationSet(segmentation_pairs(root, "validation")[:1], eval_transform(32))[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= set(range(10)) | {IGNORE}
    assert (label != IGNORE).any()  # the shape is labelled, the background ignored


def test_training_crops_are_the_crop_size_and_follow_their_key(tmp_path: Path) -> None:
    from harness.data.sampler import SeededSamples

    root = write_tree(tmp_path / "tree")
    crops = SeededSamples(SegmentationSet(segmentation_pairs(root, "training"), train_transform(24)))
    (image, label), (again, label_again) = crops[(0, 7)], crops[(0, 7)]
    assert image.shape == (3, 24, 24) and label.shape == (24, 24)
    assert torch.equal(image, again) and torch.equal(label, label_again)


# --- inference and the model ----------------------------------------------------------------------

def test_sliding_windows_of_a_pointwise_model_equal_the_whole_image() -> None:
    """A 1x1 'model' gives the same logits whole or in overlapping windows: the stitching (overlaps
    averaged, padding cut off) is exact, also for an image smaller than the crop."""
    weight = torch.randn(5, 3, 1, 1)
    predict = lambda window: torch.nn.functional.conv2d(window, weight)  # noqa: E731
    for height, width in ((40, 70), (20, 24), (32, 32)):
        image = torch.randn(1, 3, height, width)
        assert torch.allclose(slide_logits(predict, image, 32, 5), predict(image), atol=1e-5)


def test_upernet_takes_beits_four_blocks_and_decays_the_backbone_lr_by_layer() -> None:
    assert feature_blocks(12) == [3, 5, 7, 11]
    assert feature_blocks(24) == [7, 11, 15, 23]
    assert feature_blocks(2) == [0, 0, 0, 1]
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    model = ViTUperNet(encoder, num_classes=7, crop_size=32, drop_path=0.1, channels=16)
    assert model.backbone.pos_embed.shape[1] == 1 + 8 * 8  # resampled to the crop
    logits, aux = model(torch.randn(2, 3, 32, 32))
    # 4x the patch grid and the patch grid (1/4 and 1/16 of the input for ViT-B's 16-pixel patches)
    assert logits.shape == (2, 7, 32, 32) and aux.shape == (2, 7, 8, 8)
    groups = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.backbone.patch_embed.proj.weight)] == pytest.approx(0.5 ** 5)  # stem: layer 0 of 6
    assert scale[id(model.backbone.blocks[3].mlp.fc1.weight)] == pytest.approx(0.5 ** 1)
    assert scale[id(model.classifier[1].weight)] == 1.0 and scale[id(model.neck[0][0].weight)] == 1.0
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.blocks[0].norm1.weight) in no_decay


# --- the protocols resume exactly ---------------------------------------------------------------------

class _Stop(Exception):
    pass


def _tiny_encoder() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def test_upernet_resumes_at_its_checkpoint_with_the_same_result(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tree")
    train = SegmentationSet(segmentation_pairs(root, "training"), train_transform(16))
    val = SegmentationSet(segmentation_pairs(root, "validation"), eval_transform(16))
    args = dict(num_classes=3, crop_size=16, iterations=6, batch_size=2, lr=1e-3, warmup_iterations=2,
                layer_decay=0.65, weight_decay=0.05, drop_path=0.1, channels=8, num_workers=0, device=CPU, seed=3,
                checkpoint_every=2)
    seen: list[int] = []

    def stop_at_4(iteration: int, loss: float) -> None:
        seen.append(iteration)
        if iteration == 4:
            raise _Stop

    with pytest.raises(_Stop):
        finetune_upernet(_tiny_encoder(), train, val, checkpoint=tmp_path / "seg.pt", on_checkpoint=stop_at_4, **args)
    resumed = finetune_upernet(_tiny_encoder(), train, val, checkpoint=tmp_path / "seg.pt",
                               on_checkpoint=lambda i, loss: seen.append(i), **args)
    assert seen == [2, 4, 4, 6]  # the last saved point again on resuming (MLflow keeps one per step)
    whole = finetune_upernet(_tiny_encoder(), train, val, checkpoint=tmp_path / "whole.pt", **args)
    assert resumed == {**whole, "seg_upernet_train_seconds": resumed["seg_upernet_train_seconds"]}
    saved, uninterrupted = torch.load(tmp_path / "seg.pt"), torch.load(tmp_path / "whole.pt")
    assert all(torch.equal(saved["model"][k], uninterrupted["model"][k]) for k in saved["model"])
    assert 0 <= resumed["seg_upernet_miou"] <= 100


def test_the_probe_resumes_after_its_last_epoch_with_the_same_result(tmp_path: Path, monkeypatch) -> None:
    from harness.evaluate import seg_probe

    generator = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 3, (24, 4, 4), generator=generator)  # a label per patch, 2x2 pixels each
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    maps = (torch.nn.functional.one_hot(coarse, 3).permute(0, 3, 1, 2)
            + 0.3 * torch.randn(24, 3, 4, 4, generator=generator)).half()
    labels[:, 0] = IGNORE
    labels = labels.to(torch.uint8)
    args = dict(num_classes=3, epochs=12, batch_size=8, lr=0.1, weight_decay=0.0, device=CPU, seed=1)
    whole = segmentation_probe(maps[:16], labels[:16], maps[16:], labels[16:], checkpoint=tmp_path / "whole.pt",
                               **args)
    assert whole["seg_linear_miou"] > 60  # the maps carry the labels
    save = seg_probe.save_atomic

    def save_then_stop(state: dict, path: Path) -> None:
        save(state, path)
        if state["epoch"] == 2:
            raise _Stop  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(seg_probe, "save_atomic", save_then_stop)
    with pytest.raises(_Stop):
        segmentation_probe(maps[:16], labels[:16], maps[16:], labels[16:], checkpoint=tmp_path / "cut.pt", **args)
    monkeypatch.setattr(seg_probe, "save_atomic", save)
    resumed = segmentation_probe(maps[:16], labels[:16], maps[16:], labels[16:], checkpoint=tmp_path / "cut.pt",
                                 **args)
    assert resumed["seg_linear_miou"] == whole["seg_linear_miou"]
    cut, uninterrupted = torch.load(tmp_path / "cut.pt"), torch.load(tmp_path / "whole.pt")
    assert all(torch.equal(cut["head"][k], uninterrupted["head"][k]) for k in cut["head"])


# --- the user's path -----------------------------------------------------------------------------------

SEG_MICRO = ["--set", "model.size=vit_micro_patch4", "--set", "model.img_size=32", "--set", "model.target=pixel",
             "--set", "model.masking=random", "--set", "pretrain.epochs=1", "--set", "pretrain.warmup_epochs=0",
             "--set", "pretrain.batch_size=32", "--set", "runtime.num_workers=0", "--set", "runtime.device=cpu",
             "--set", "eval.protocols=[seg_linear,seg_upernet]",
             "--set", "eval.seg_linear.epochs=3", "--set", "eval.seg_linear.batch_size=16",
             "--set", "eval.seg_upernet.crop_size=32", "--set", "eval.seg_upernet.iterations=4",
             "--set", "eval.seg_upernet.warmup_iterations=1", "--set", "eval.seg_upernet.batch_size=4",
             "--set", "eval.seg_upernet.channels=16", "--set", "eval.seg_upernet.checkpoint_every=2"]


def _demo_seg(tmp_path: Path) -> tuple[Path, list[str]]:
    from harness.data.demo import SEGMENTATION_DIR, make_demo_dataset

    data = tmp_path / "demo"
    make_demo_dataset(data, train_per_class=40, val_per_class=10)  # segmentation: 8 and 2 per class
    seg = data / SEGMENTATION_DIR
    return data, ["--set", f"data.root={data}", "--set", f"eval.seg_linear.root={seg}",
                  "--set", f"eval.seg_upernet.root={seg}"]


def test_a_run_with_both_segmentation_protocols_reports_and_logs_them(tmp_path: Path) -> None:
    """`bench.py run` on the demo data's segmentation split: both mIoUs and pixel accuracies in the
    results, UperNet's loss curve in the log (what MLflow gets), at every checkpoint."""
    import json

    from typer.testing import CliRunner

    from harness.cli import app
    from harness.train.metrics_log import read_jsonl

    _, paths = _demo_seg(tmp_path)
    result = CliRunner().invoke(app, ["run", *SEG_MICRO, *paths, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    for key in ("seg_linear_miou", "seg_linear_pixel_accuracy", "seg_upernet_miou", "seg_upernet_pixel_accuracy"):
        assert 0 <= metrics[key] <= 100, key
    curve = [line["step"] for line in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "seg_upernet/loss" in line]
    assert curve == [2, 4]


def test_a_bad_segmentation_tree_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harness.cli import app

    _, paths = _demo_seg(tmp_path)
    labels = tmp_path / "demo" / "segmentation" / "annotations" / "validation"
    Image.fromarray(np.full((32, 32), 11, np.uint8)).save(sorted(labels.iterdir())[0])  # class 11 of 10
    result = CliRunner().invoke(app, ["run", *SEG_MICRO, *paths, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert "holds label 11 but the tree has 10 classes" in line
    assert not (tmp_path / "run").exists()


def test_a_grid_that_evaluates_another_adds_segmentation_without_retraining(
        demo_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluates: twin.yaml`: refused (exit 2, nothing submitted) while the twin grid has not
    finished; once it has, each cell evaluates its twin's final encoder with both segmentation
    protocols and trains nothing (the twin's checkpoints are not touched)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from conftest import micro_config
    from harness.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, teacher = demo_assets
    seg = str(data / "segmentation")
    resources = {"cpus_per_task": 1, "time_min": 10}
    twin = {"name": "twin", "base": micro_config(data, teacher, model={"target": "pixel", "masking": "random"}),
            "axes": {"model.mask_ratio": [0.5, 0.75]}, "random_init": False, "teacher_reference": False, "resources": resources}
    sibling = {"name": "twin_seg", "evaluates": "twin.yaml", "resources": resources,
               "base": {"eval": {"protocols": ["seg_linear", "seg_upernet"],
                                 "seg_linear": {"root": seg, "epochs": 2, "batch_size": 16},
                                 "seg_upernet": {"root": seg, "crop_size": 32, "iterations": 2, "warmup_iterations": 1,
                                                 "batch_size": 4, "channels": 16, "checkpoint_every": 1}}}}
    (tmp_path / "ablations").mkdir()
    for grid in (twin, sibling):
        (tmp_path / "ablations" / f"{grid['name']}.yaml").write_text(yaml.safe_dump(grid))

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    code, out = invoke("ablate", "ablations/twin_seg.yaml", "--executor", "local")
    assert code == 2 and "has not finished (not started): finish its grid first (`bench.py ablate twin`)" in out
    assert not list((tmp_path / "runs").glob("twin_seg/mask_ratio-*"))  # no cell folder: nothing submitted
    code, out = invoke("ablate", "ablations/twin.yaml", "--executor", "local")
    assert code == 0, out
    twin_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "twin").rglob("*") if p.is_file()}
    code, out = invoke("ablate", "ablations/twin_seg.yaml", "--executor", "local")
    assert code == 0, out
    folders = sorted((tmp_path / "runs" / "twin_seg").glob("mask_ratio-*"))
    twins = sorted((tmp_path / "runs" / "twin").glob("mask_ratio-*"))
    assert len(folders) == 2 and [f.name.rsplit("_", 1)[0] for f in folders] == [t.name.rsplit("_", 1)[0] for t in twins]
    for folder, twin_folder in zip(folders, twins):
        results = json.loads((folder / "results.json").read_text())
        metrics, twin_metrics = results["metrics"], json.loads((twin_folder / "results.json").read_text())["metrics"]
        assert {"seg_linear_miou", "seg_upernet_miou"} <= metrics.keys() and "linear_top1" not in metrics
        assert metrics["train_seconds"] == 0 and metrics["final_loss"] == twin_metrics["final_loss"]
        assert Path(results["checkpoint"]).parent.parent.resolve() == twin_folder.resolve()
        assert not (folder / "checkpoints").exists()  # nothing pretrained here
    assert {p: p.stat().st_mtime_ns for p in twin_files} == twin_files
    assert "seg_upernet_miou" in (tmp_path / "reports" / "twin_seg" / "report.md").read_text()


def test_evaluate_gives_both_segmentation_metrics_for_the_random_init_encoder(tmp_path: Path) -> None:
    """`bench.py evaluate --random-init` with the segmentation protocols (a checkpoint or published
    weights take the same path after loading)."""
    from typer.testing import CliRunner

    from harness.cli import app

    _, paths = _demo_seg(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--random-init", *SEG_MICRO, *paths])
    assert result.exit_code == 0, result.output
    for key in ("seg_linear_miou", "seg_upernet_miou", "seg_upernet_pixel_accuracy"):
        assert re.search(rf"{key}\s+\d+(\.\d+)?", result.output), key
