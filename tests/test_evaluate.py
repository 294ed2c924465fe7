"""Tests of the downstream evaluation protocols on tiny, CPU-sized problems."""

import importlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from harness.evaluate.features import extract_features
from harness.evaluate.finetune import finetune, finetune_transform
from harness.evaluate.knn import knn_classify
from harness.evaluate.linear_probe import linear_probe_on_features
from harness.evaluate.shards import sharded_features
from harness.milan.weights import build_timm_vit

finetune_module = importlib.import_module("harness.evaluate.finetune")
linear_probe_module = importlib.import_module("harness.evaluate.linear_probe")

CPU = torch.device("cpu")


def linear_probe(encoder: VisionTransformer, train_loader: DataLoader, val_loader: DataLoader,
                 **settings: object) -> dict[str, float]:
    """The probe as a run does it: the frozen features of both splits, then the head on them."""
    return linear_probe_on_features(*extract_features(encoder, train_loader, CPU),
                                    *extract_features(encoder, val_loader, CPU), **settings)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: with two threads on shared cores, thread-pool hand-offs cost 100x the
    arithmetic and make the tests slow and erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    config = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    return VisionTransformer(**(config | kwargs))


def brightness_data(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is their mean brightness level, plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    levels = (labels.float() - (num_classes - 1) / 2) * 0.5
    images = levels.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 3, 16, 16, generator=generator)
    return images, labels


def loader(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False
) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def assert_same_weights(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def capture(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list:
    """Wrap `module.name` so that every value it returns is also appended to the returned list."""
    results: list = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, recording)
    return results


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


# --- k-NN ----------------------------------------------------------------------------------------

# Query (1, 0.1). Cosine similarities to the training points:
#   (1, 0) class 0: 0.995; (1, 1) class 1: 0.774; (0, 1) class 1: 0.0995; (-1, 0) class 2: -0.995.
# With k = 3 the neighbours are classes 0, 1, 1. At T = 1 the votes are e^0.995 = 2.70 for class 0
# against e^0.774 + e^0.0995 = 3.27 for class 1, so class 1 wins; at T = 0.07 the nearest
# neighbour's e^(0.995/0.07) outweighs the other two by a factor of ~20, so class 0 wins.
HAND_TRAIN = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
HAND_TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.1]])


@pytest.mark.parametrize(("temperature", "winner"), [(1.0, 1), (0.07, 0)])
def test_knn_weighted_vote_by_hand(temperature: float, winner: int) -> None:
    for label in range(3):
        metrics = knn_classify(
            HAND_TRAIN,
            HAND_TRAIN_LABELS,
            QUERY,
            torch.tensor([label]),
            k=3,
            temperature=temperature,
        )
        assert metrics == {"knn_top1": 100.0 if label == winner else 0.0}


def test_knn_accuracy_over_uneven_chunks() -> None:
    # Three copies of the query, two labelled with the T = 1 winner: 2/3 right, however chunked.
    queries, labels = QUERY.repeat(3, 1), torch.tensor([1, 0, 1])
    for chunk_size in (1, 2, 3):
        metrics = knn_classify(
            HAND_TRAIN,
            HAND_TRAIN_LABELS,
            queries,
            labels,
            k=3,
            temperature=1.0,
            chunk_size=chunk_size,
        )
        assert metrics["knn_top1"] == pytest.approx(200 / 3)


def test_knn_tiny_temperature_stays_finite() -> None:
    # exp(0.995 / 0.005) and exp(0.774 / 0.005) both overflow float32, which would tie the nearest
    # neighbour's class (2 here) with class 1; the vote must still go to the nearest neighbour.
    labels = torch.tensor([2, 1, 1, 0])
    metrics = knn_classify(HAND_TRAIN, labels, QUERY, torch.tensor([2]), k=3, temperature=0.005)
    assert metrics["knn_top1"] == 100.0


def test_knn_separable_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=generator)
    train_labels = torch.arange(1000) % 10
    test_labels = torch.arange(500) % 10
    train = centres[train_labels] + 0.3 * torch.randn(1000, 64, generator=generator)
    test = centres[test_labels] + 0.3 * torch.randn(500, 64, generator=generator)
    metrics = knn_classify(train, train_labels, test, test_labels, chunk_size=128)
    assert metrics["knn_top1"] > 99.0
    assert metrics["knn_top5"] == 100.0
    # Shuffled test labels must fall to chance.
    shuffled = test_labels[torch.randperm(500, generator=generator)]
    assert knn_classify(train, train_labels, test, shuffled)["knn_top1"] < 25.0


# --- features and linear probe --------------------------------------------------------------------


def test_extract_features_is_the_normed_cls_token() -> None:
    encoder = tiny_vit()
    images, labels = brightness_data(10, 5, seed=0)
    encoder.train()
    features, feature_labels = extract_features(encoder, loader(images, labels, batch_size=4), CPU)
    assert encoder.training
    assert features.dtype == torch.float32 and features.shape == (10, 32)
    assert torch.equal(feature_labels, labels)
    # timm's own cls pooling ('token'), before the classifier, is the same feature.
    with torch.no_grad():
        expected = encoder.forward_head(encoder.eval().forward_features(images), pre_logits=True)
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize(
    ("optimizer", "base_lr", "epochs"),
    [("lars", 50.0, 40), ("sgd", 0.5, 10)],
)
def test_linear_probe_learns_brightness_without_touching_encoder(
    monkeypatch: pytest.MonkeyPatch,
    optimizer: str,
    base_lr: float,
    epochs: int,
) -> None:
    encoder = tiny_vit()
    before = snapshot(encoder)
    train_images, train_labels = brightness_data(200, 5, seed=1)
    val_images, val_labels = brightness_data(100, 5, seed=2)
    heads = capture(monkeypatch, linear_probe_module, "_probe_head")
    metrics = linear_probe(
        encoder,
        loader(train_images, train_labels, batch_size=50),
        loader(val_images, val_labels, batch_size=30),  # 30, 30, 30, 10: uneven batches
        num_classes=5,
        epochs=epochs,
        batch_size=50,
        base_lr=base_lr,
        warmup_epochs=1,
        optimizer=optimizer,
        device=CPU,
    )
    assert set(metrics) == {"linear_top1", "linear_top5", "linear_train_seconds"}
    assert metrics["linear_top1"] >= 95.0
    assert metrics["linear_top5"] == 100.0
    assert metrics["linear_train_seconds"] > 0
    assert_same_weights(encoder, before)
    # The reported accuracy is the head's accuracy over the whole validation set.
    features, _ = extract_features(encoder, loader(val_images, val_labels, batch_size=100), CPU)
    with torch.no_grad():
        assert metrics["linear_top1"] == pytest.approx(top1(heads[0](features), val_labels))


def test_lars_scales_weight_steps_by_trust_ratio_even_without_weight_decay() -> None:
    # MAE's LARS: a matrix moves by lr * 0.001 * |w| on its first step, whatever the gradient's
    # size; a bias takes a plain SGD step.
    head = linear_probe_module._probe_head(8, 3, torch.Generator().manual_seed(0))
    linear = head[1]
    optimizer = linear_probe_module._head_optimizer(head, "lars", lr=2.0, weight_decay=0.0)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    linear.weight.grad = torch.full_like(weight, 5.0)
    linear.bias.grad = torch.full_like(bias, 0.5)
    optimizer.step()
    assert (linear.weight - weight).norm().item() == pytest.approx(
        2.0 * 0.001 * weight.norm().item(), rel=1e-4
    )
    torch.testing.assert_close(linear.bias - bias, torch.full_like(bias, -1.0))


def test_linear_probe_top1_only_below_five_classes() -> None:
    images, labels = brightness_data(40, 2, seed=3)
    metrics = linear_probe(
        tiny_vit(),
        loader(images, labels, 20),
        loader(images, labels, 20),
        num_classes=2,
        epochs=1,
        batch_size=20,
        base_lr=0.1,
        warmup_epochs=0,
        optimizer="sgd",
        device=CPU,
    )
    assert set(metrics) == {"linear_top1", "linear_train_seconds"}


# --- fine-tuning ----------------------------------------------------------------------------------


def test_finetune_trains_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = tiny_vit(depth=2)
    before = snapshot(encoder)
    models = capture(monkeypatch, finetune_module, "_finetune_model")
    optimizers = capture(monkeypatch, finetune_module, "create_optimizer_v2")
    train_images, train_labels = brightness_data(40, 5, seed=4)
    val_images, val_labels = brightness_data(13, 5, seed=5)
    metrics = finetune(
        encoder,
        TensorDataset(train_images, train_labels),
        loader(val_images, val_labels, batch_size=4),
        num_classes=5,
        epochs=1,
        batch_size=8,
        base_lr=1e-3,
        warmup_epochs=0.4,
        device=CPU,
    )
    assert set(metrics) == {"finetune_top1", "finetune_top5", "finetune_train_seconds"}
    assert 0.0 <= metrics["finetune_top1"] <= metrics["finetune_top5"] <= 100.0

    assert_same_weights(encoder, before)
    model = models[0]
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert not torch.equal(model.state_dict()[name], before[name]), name
    # The reported accuracy over uneven batches (4, 4, 4, 1) is the model's accuracy on all 13.
    with torch.no_grad():
        assert metrics["finetune_top1"] == pytest.approx(top1(model(val_images), val_labels))

    # MAE's layer-wise decay: scale decay ** (depth + 1 - layer); stem layer 0, head depth + 1.
    scales = {
        id(param): group["lr_scale"]
        for group in optimizers[0].param_groups
        for param in group["params"]
    }
    assert scales[id(model.patch_embed.proj.weight)] == pytest.approx(0.65**3)
    assert scales[id(model.cls_token)] == pytest.approx(0.65**3)
    assert scales[id(model.blocks[1].attn.qkv.weight)] == pytest.approx(0.65)
    assert scales[id(model.head.weight)] == 1.0


def test_finetune_without_mixing_reports_top1_only() -> None:
    images, labels = brightness_data(12, 2, seed=6)
    metrics = finetune(
        tiny_vit(),
        TensorDataset(images, labels),
        loader(images, labels, batch_size=5),
        num_classes=2,
        epochs=1,
        batch_size=3,
        base_lr=1e-3,
        warmup_epochs=0,
        mixup=0.0,
        cutmix=0.0,
        device=CPU,
    )
    assert set(metrics) == {"finetune_top1", "finetune_train_seconds"}
    assert math.isfinite(metrics["finetune_top1"])


def test_finetune_rejects_odd_mixup_batches() -> None:
    images, labels = brightness_data(12, 2, seed=6)
    with pytest.raises(ValueError, match="even"):
        finetune(
            tiny_vit(),
            TensorDataset(images, labels),
            loader(images, labels, batch_size=5),
            num_classes=2,
            epochs=1,
            batch_size=3,
            base_lr=1e-3,
            warmup_epochs=0,
            device=CPU,
        )


def test_finetune_rejects_encoders_it_cannot_copy() -> None:
    # Layer scale adds parameters a plain ViT lacks; they must not be silently dropped.
    encoder = tiny_vit(init_values=0.1)
    with pytest.raises(ValueError, match="unexpected"):
        finetune_module._finetune_model(encoder, num_classes=2, drop_path=0.1)


def test_finetune_transform_handles_tiny_images() -> None:
    transform = finetune_transform(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pixels = torch.randint(
        0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    image = Image.fromarray(pixels.numpy())
    first, second = transform(image), transform(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_finetune_transform_survives_posterize_at_full_magnitude() -> None:
    """timm's increasing posterize keeps 0 bits at magnitude 10, which Pillow >= 11 rejects; MAE's
    rand-m9-mstd0.5-inc1 draws it for ~2% of posterized images, so a fine-tune crashed mid-epoch.
    0 bits give a black image, as Pillow did when the recipe was published."""
    from timm.data import auto_augment

    transform = finetune_transform(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), randaug="rand-m10-n2-inc1",
                                   reprob=0.0)
    [augment] = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)]
    [posterize] = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    posterize.prob = 1.0
    black = posterize(image)
    assert black.getextrema() == ((0, 0),) * 3 and black.size == image.size
    for _ in range(200):  # every op at magnitude 10, two per image
        transform(image)


def _run_ranks(target, world: int, *args: object, timeout: float = 180) -> None:
    """``target(rank, world, port, *args)`` in ``world`` spawned processes (one gloo group); each must exit 0."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
        assert proc.exitcode == 0


def _extract_shard(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from harness.core.distributed import barrier, init_distributed, shutdown

    env = init_distributed(torch.device("cpu"), timeout_min=1)
    torch.manual_seed(0)
    encoder = build_timm_vit("vit_micro_patch4", 32)
    result = sharded_features(encoder, _Images(37), rank=rank, world=world, folder=Path(folder), name="train",
                              batch_size=5, num_workers=0, device=torch.device("cpu"), wait=lambda: barrier(env))
    if rank == 0:
        torch.save(result, out)
    shutdown(env)


class _Images(torch.utils.data.Dataset):
    """n deterministic 32x32 images, labelled by index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.sin(torch.arange(3 * 32 * 32, dtype=torch.float32) * (i + 1) / 97).view(3, 32, 32), i


def test_two_ranks_extract_each_item_once_and_match_one_process(tmp_path: Path) -> None:
    """With 2 ranks the shards cover the data set exactly once; every rank gets the features in
    data-set order, equal to one process's; shards already on disk (a requeued job) are not
    extracted again."""
    _run_ranks(_extract_shard, 2, str(tmp_path / "f"), str(tmp_path / "out.pt"))
    shards = [torch.load(tmp_path / "f" / f"train-{r}of2.pt", weights_only=True) for r in range(2)]
    indices = sorted(i for s in shards for i in s["indices"].tolist())
    assert indices == list(range(37)) and len(shards[0]["indices"]) == 19 and len(shards[1]["indices"]) == 18
    features, labels = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.manual_seed(0)
    encoder = build_timm_vit("vit_micro_patch4", 32)
    loader = torch.utils.data.DataLoader(_Images(37), batch_size=5)
    expected, expected_labels = extract_features(encoder, loader, torch.device("cpu"))
    assert torch.equal(labels, expected_labels) and torch.allclose(features, expected, atol=1e-5)
    # shards on disk (a requeued job) are read, not extracted again: an encoder that cannot run is never called
    for rank in (0, 1):
        resumed, _ = sharded_features(None, _Images(37), rank=rank, world=2, folder=tmp_path / "f", name="train",
                                      batch_size=5, num_workers=0, device=torch.device("cpu"))
        assert torch.equal(resumed, features)


class _Stop(Exception):
    """Raised from on_epoch: the job is killed right after that epoch's checkpoint."""


def _finetune_args(**overrides) -> dict:
    images, labels = brightness_data(48, 4, seed=7)
    return dict(train_dataset=TensorDataset(images, labels), val_loader=loader(images, labels, batch_size=16),
                num_classes=4, epochs=3, batch_size=8, base_lr=1e-3, warmup_epochs=0.5, mixup=0.0, cutmix=0.0,
                drop_path=0.0, device=CPU) | overrides


def _stop_at(last: int, seen: list[int]):
    def on_epoch(epoch: int, loss: float) -> None:
        seen.append(epoch)
        assert math.isfinite(loss)
        if epoch == last:
            raise _Stop
    return on_epoch


def test_finetune_resumes_after_its_last_epoch_checkpoint_with_the_same_result(tmp_path: Path) -> None:
    """Interrupted after epoch 2 of 3 (a requeue), the next call trains epoch 3 only and ends where an
    uninterrupted call ends; a call after the end returns the stored metrics without training."""
    seen: list[int] = []
    with pytest.raises(_Stop):
        finetune(tiny_vit(), checkpoint=tmp_path / "ft.pt", on_epoch=_stop_at(2, seen), **_finetune_args())
    assert torch.load(tmp_path / "ft.pt", weights_only=True)["epoch"] == 2
    resumed = finetune(tiny_vit(), checkpoint=tmp_path / "ft.pt", on_epoch=_stop_at(0, seen), **_finetune_args())
    # trained once each, resumed at epoch 3; the last saved epoch's loss is reported again on resuming
    # (the kill may have come between its save and its report: MLflow keeps one value per step)
    assert seen == [1, 2, 2, 3]
    whole = finetune(tiny_vit(), **_finetune_args())
    assert resumed["finetune_top1"] == whole["finetune_top1"]
    again = finetune(None, checkpoint=tmp_path / "ft.pt", on_epoch=_stop_at(0, seen), **_finetune_args())
    assert again == resumed and seen == [1, 2, 2, 3]


def _finetune_rank(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from harness.core.distributed import init_distributed, shutdown

    env = init_distributed(CPU, timeout_min=1)
    finetune(tiny_vit(), checkpoint=Path(folder) / "ft.pt", **_finetune_args(epochs=2))
    shutdown(env)


def test_finetune_on_two_ranks_matches_one_rank_at_the_same_effective_batch(tmp_path: Path) -> None:
    """DDP over 2 gloo ranks, 4 images each per step, takes the same steps as one process with
    batches of 8: same weights after two epochs (deterministic data, no mixing, no drop path)."""
    _run_ranks(_finetune_rank, 2, str(tmp_path / "two"))
    finetune(tiny_vit(), checkpoint=tmp_path / "one" / "ft.pt", **_finetune_args(epochs=2))
    two = torch.load(tmp_path / "two" / "ft.pt", weights_only=True)["model"]
    one = torch.load(tmp_path / "one" / "ft.pt", weights_only=True)["model"]
    changed = [name for name in one if not torch.equal(one[name], tiny_vit().state_dict().get(name, one[name]))]
    assert changed  # it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_linear_probe_resumes_after_its_last_epoch_checkpoint_with_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed right after saving epoch 2 of 4, the probe continues with epoch 3 and ends as an
    uninterrupted probe does; once done, a call returns the stored metrics."""
    generator = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 3, (96,), generator=generator)
    features = labels.float().unsqueeze(1) + 0.3 * torch.randn(96, 16, generator=generator)
    args = dict(num_classes=3, epochs=4, batch_size=16, base_lr=0.1, warmup_epochs=1, device=CPU, seed=3)
    saved = linear_probe_module.save_atomic
    epochs_saved: list[int] = []

    def killed_after_epoch_2(state: dict, path: Path) -> None:
        saved(state, path)
        epochs_saved.append(state["epoch"])
        if state["epoch"] == 2 and "metrics" not in state:
            raise _Stop

    monkeypatch.setattr(linear_probe_module, "save_atomic", killed_after_epoch_2)
    with pytest.raises(_Stop):
        linear_probe_on_features(features, labels, features, labels, checkpoint=tmp_path / "lp.pt", **args)
    monkeypatch.setattr(linear_probe_module, "save_atomic", lambda state, path: (epochs_saved.append(state["epoch"]),
                                                                                saved(state, path)))
    resumed = linear_probe_on_features(features, labels, features, labels, checkpoint=tmp_path / "lp.pt", **args)
    assert epochs_saved == [1, 2, 3, 4, 4]  # epochs 3 and 4 after the restart, then the metrics
    whole = linear_probe_on_features(features, labels, features, labels, **args)
    assert resumed == {**whole, "linear_train_seconds": resumed["linear_train_seconds"]}
    assert linear_probe_on_features(None, None, None, None, checkpoint=tmp_path / "lp.pt", **args) == resumed


def test_finetune_benchmark_measures_one_and_two_ranks() -> None:
    from harness.benchmarks.finetune_speed import run_finetune_speed

    for ranks in (1, 2):
        result = run_finetune_speed(ranks, images=96, batch=32, epochs=1)
        assert result.ranks == ranks and result.images == 96 and result.seconds > 0


def _knn_shard(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from harness.evaluate.shards import average_over_ranks
    from harness.core.distributed import init_distributed, shutdown

    env = init_distributed(CPU, timeout_min=1)
    train, train_labels, test, test_labels = _knn_problem()
    mine = slice(rank, None, world)
    votes = knn_classify(train, train_labels, test[mine], test_labels[mine], k=5, num_classes=6)
    combined = average_over_ranks(votes, len(test_labels[mine]), CPU)
    torch.save(combined, f"{out}.{rank}")
    shutdown(env)


def _knn_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    centres = torch.randn(6, 8, generator=generator)
    train_labels, test_labels = torch.randint(0, 6, (120,), generator=generator), torch.randint(0, 6, (37,), generator=generator)
    noise = lambda n: 0.9 * torch.randn(n, 8, generator=generator)  # noqa: E731
    return centres[train_labels] + noise(120), train_labels, centres[test_labels] + noise(37), test_labels


def test_knn_split_over_two_ranks_gives_the_whole_sets_accuracy(tmp_path: Path) -> None:
    """Each rank votes for its share of the validation items (19 and 18 of 37); the combined
    accuracies, on every rank, are those of one process voting for all 37."""
    _run_ranks(_knn_shard, 2, str(tmp_path / "knn"))
    train, train_labels, test, test_labels = _knn_problem()
    whole = knn_classify(train, train_labels, test, test_labels, k=5, num_classes=6)
    for rank in range(2):
        combined = torch.load(tmp_path / f"knn.{rank}", weights_only=True)
        assert combined.keys() == whole.keys()
        for key in whole:
            assert combined[key] == pytest.approx(whole[key])
    assert 20 < whole["knn_top1"] < 100
