"""The demo dataset and demo CLIP teacher at their default paths, made on first use so the smoke
grid works on a fresh clone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Where `bench.py data demo` / `bench.py teacher demo` write by default (and configs/smoke.yaml reads).
DEMO_DATA = Path("data/demo")
DEMO_TEACHER = Path("data/demo-teacher/milan-clip-tiny.pt")


def ensure_demo_assets(data_roots: Iterable[str], teacher_files: Iterable[str | None],
                       echo: Callable[[str], None]) -> float:
    """Make the demo dataset / demo teacher if runs read them at their default paths (``data_roots``:
    the runs' data.root, ``teacher_files``: their teacher.pretrained) and they are missing (the
    teacher takes minutes on a CPU: say so); returns the seconds spent."""
    start = time.perf_counter()
    needs_data = any(Path(root) == DEMO_DATA for root in data_roots)
    needs_teacher = any(file and Path(file) == DEMO_TEACHER for file in teacher_files)
    if (needs_data or needs_teacher) and not (DEMO_DATA / "meta.json").is_file():
        from harness.data.demo import make_demo_dataset

        echo(f"making the demo dataset in {DEMO_DATA} (first run only) ...")
        make_demo_dataset(DEMO_DATA)
    if needs_teacher and not DEMO_TEACHER.is_file():
        from harness.data.demo_teacher import train_demo_teacher

        echo(f"training the demo CLIP teacher into {DEMO_TEACHER} (first run only; about a minute on two cores) ...")
        report = train_demo_teacher(DEMO_DATA, DEMO_TEACHER, echo=echo)
        echo(f"demo teacher: zero-shot top-1 {report.zero_shot_top1:.1f}% (chance {report.chance_top1:.1f}%), "
             f"{report.seconds:.0f} s")
    return time.perf_counter() - start
