"""A small language-supervised CLIP teacher for the demo data.

Pretrained CLIP weights cannot be downloaded everywhere, and CLIP targets from a random network
measure nothing. This trains a tiny open_clip model on the demo images and their captions with
open_clip's own contrastive loss and tokenizer, and saves a checkpoint that the teacher loader
reads like any other (``teacher.model=milan-clip-tiny``, ``teacher.pretrained=<file>``).

The images are ImageNet-normalised, as the student's are: MILAN feeds the student's input to
the teacher unchanged (``teacher.normalize=imagenet``).
"""

import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader

from harness.data.datasets import CaptionedImages, eval_transform, image_folder
from harness.data.demo import COLOURS, SIZES, _NOUNS
from harness.milan.teacher import resolve_model_name


# The demo generator's caption grammar (harness.data.demo.render_image).
CAPTION = re.compile(r"a (?P<size>\w+) (?P<colour>\w+) (?P<noun>.+?) (?P<position>(?:in|at|on) the [\w ]+?) "
                     r"on a (?P<texture>\w+) (?P<background>\w+) background")


def caption_variant(caption: str, rng: random.Random, keep: float = 0.5) -> str:
    """The caption with each attribute phrase kept with probability ``keep``; the noun always stays.

    With full captions every image in a batch is already told apart by colours, position and
    background, so a small model never needs the shape; shorter captions make the shape word
    carry the match, as varied alt-texts do for real CLIP models.
    """
    parts = CAPTION.fullmatch(caption)
    if parts is None:
        return caption
    p = parts.groupdict()
    adjectives = " ".join(word for word in (p["size"], p["colour"]) if rng.random() < keep)
    text = f"a {adjectives + ' ' if adjectives else ''}{p['noun']}"
    if rng.random() < keep:
        text += f" {p['position']}"
    if rng.random() < keep:
        text += f" on a {p['texture']} {p['background']} background"
    return text


@dataclass(frozen=True)
class DemoTeacherReport:
    checkpoint: Path
    model: str
    epochs: int
    zero_shot_top1: float  # percent, on the demo val split
    chance_top1: float
    seconds: float


def class_prompts(cls: str) -> list[str]:
    """Caption-style prompts for one class, over every size and colour (an ensemble)."""
    noun = _NOUNS.get(cls, cls)
    return [f"a {size} {colour} {noun}" for size, colour in itertools.product(SIZES, COLOURS)]


@torch.no_grad()
def zero_shot_top1(model, tokenizer, loader: DataLoader, classes: list[str], device: torch.device) -> float:
    """Accuracy (percent) of picking the class whose averaged prompt embedding is closest."""
    model.eval()
    weights = []
    for cls in classes:
        text = F.normalize(model.encode_text(tokenizer(class_prompts(cls)).to(device)), dim=-1)
        weights.append(F.normalize(text.mean(0), dim=-1))
    weights = torch.stack(weights)  # [classes, D]
    correct = total = 0
    for images, labels in loader:
        image = F.normalize(model.encode_image(images.to(device)), dim=-1)
        correct += (image @ weights.T).argmax(1).cpu().eq(labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


# Zero-shot top-1 on the v2 demo val split (chance 10%), each a full run with its own cosine
# schedule: 12.7% after 5 epochs, 15.2% after 20, 24.7% after 30 (on its first 60 images per
# class; 10.8% after 5 on all 150). About 12 s an epoch on two idle cores. `make demo` trains 3:
# its 10-minute budget, install included, holds no more, so the demo's CLIP targets come from a
# near-chance teacher (the README says so); `bench.py teacher demo --epochs 30` trains the better one.
DEFAULT_EPOCHS = 3


def train_demo_teacher(data_root: Path, out: Path, *, model: str = "milan-clip-tiny",
                       epochs: int = DEFAULT_EPOCHS, batch_size: int = 64, lr: float = 5e-4, seed: int = 0,
                       device: torch.device = torch.device("cpu"),
                       echo: Callable[[str], None] = lambda line: None) -> DemoTeacherReport:
    """Train a CLIP model on the demo captions; writes ``out`` and ``out`` + ``.json``.

    ``echo`` receives one progress line per epoch.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    name = resolve_model_name(model)
    clip = open_clip.create_model(name).to(device)
    tokenizer = open_clip.get_tokenizer(name)
    size = clip.visual.image_size[0]
    transform = eval_transform(size, crop_pct=1.0)  # no flips or crops: captions name positions
    # Decode the PNGs once (a list of pairs is a dataset): the tiny images fit in memory.
    train = list(CaptionedImages(data_root, "train", transform))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    loss_fn = ClipLoss()
    rng = random.Random(seed)
    clip.train()
    for epoch in range(1, epochs + 1):
        epoch_loss = 0.0
        for images, captions in loader:
            texts = [caption_variant(c, rng) for c in captions]
            image_features, text_features, logit_scale = clip(images.to(device), tokenizer(texts).to(device))
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item()
        echo(f"teacher epoch {epoch}/{epochs}: contrastive loss {epoch_loss / len(loader):.3f} "
             f"({time.perf_counter() - start:.0f} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip.state_dict(), out)

    val = image_folder(data_root, "val", transform)
    val_loader = DataLoader(val, batch_size=256)
    report = DemoTeacherReport(checkpoint=out, model=name, epochs=epochs,
                               zero_shot_top1=zero_shot_top1(clip, tokenizer, val_loader, val.classes, device),
                               chance_top1=100.0 / len(val.classes), seconds=time.perf_counter() - start)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(asdict(report), indent=2, default=str))
    return report


def read_report(checkpoint: Path) -> DemoTeacherReport | None:
    """The report written beside a demo teacher checkpoint, if both exist."""
    sidecar = checkpoint.with_suffix(checkpoint.suffix + ".json")
    if not (checkpoint.is_file() and sidecar.is_file()):
        return None
    data = json.loads(sidecar.read_text())
    return DemoTeacherReport(**{**data, "checkpoint": Path(data["checkpoint"])})

