"""What a run leaves behind and shows: metrics.jsonl, steps.jsonl, TensorBoard events,
train.log, curves.png, and the progress bar / log lines on the terminal."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path


def plural(n: int, word: str) -> str:
    """'1 epoch', '30 epochs'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def terminal_width() -> int | None:
    """Columns of the terminal standard output is, None when it is not a terminal (a file or a
    pipe keeps one record per line)."""
    try:
        if not sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return None
    return shutil.get_terminal_size().columns


def fit_width(text: str, width: int | None, sep: str = " | ") -> str:
    """Break a line longer than `width` at its ' | ' separators (else at spaces), never inside a
    word, continuation lines indented: a terminal would otherwise wrap it mid-word."""
    if width is None or len(text) <= width:
        return text
    width = max(width, 20)
    parts = text.split(sep)
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append("    " + part)
    out = []
    for ln in lines:
        out.extend(textwrap.wrap(ln, width, subsequent_indent="    ", break_long_words=False,
                                 break_on_hyphens=False, drop_whitespace=True) if len(ln) > width else [ln])
    return "\n".join(out)


def json_safe(obj):
    """`obj` with every NaN/inf float replaced by None: JSON has no NaN, and a file with a bare
    `NaN` in it is not JSON that other tools can read."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """json.dumps that writes null for NaN/inf (and fails rather than write invalid JSON)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def progress_allowed() -> bool:
    """A live bar only on a terminal, never in CI (CI=true) or when output is piped."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


class RunLog:
    """Rank 0's writer for one run directory (every method is a no-op elsewhere)."""

    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool, verbose: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.verbose = verbose and enabled
        self.writer = None
        self._bar = None
        self._tensorboard = self.enabled and tensorboard
        self._purge_step: int | None = None

    def _tb(self):
        """The TensorBoard writer, created at the first record: a run refused before training
        (a bad resume, a live run) leaves no empty events file behind."""
        if self.writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, purge_step tells TensorBoard to drop the events the interrupted session
            # wrote after the checkpoint, so curves show each step once
            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step)
        return self.writer

    # ------------------------------------------------------------ text
    def line(self, text: str, echo: bool = True) -> None:
        """Print `text` (when verbose) and append it to train.log; echo=False: the log only (the
        caller reports it another way, e.g. as the error the command exits with)."""
        if not self.enabled and not self.verbose:
            return
        stamp = time.strftime("%H:%M:%S")
        if self.verbose and echo:
            if self._bar is not None:
                self._bar.console.print(fit_width(text, self._bar.console.width), highlight=False)
            else:
                print(fit_width(text, terminal_width()), flush=True)
        if self.enabled:
            with open(self.run_dir / "train.log", "a") as f:
                f.write(f"{stamp} {text}\n")

    # ------------------------------------------------------------ records
    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(dumps(record) + "\n")
        if self._tb() is not None:
            for k, v in json_safe(record).items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and v is not None:
                    group = "val" if k.startswith("val_") else "train" if k.startswith("train_") else "misc"
                    self.writer.add_scalar(f"{group}/{k}", v, record["step"])

    def steps(self, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "steps.jsonl", "a") as f:
            for r in rows:
                f.write(dumps(r) + "\n")
        if self._tb() is not None:
            for r in rows:
                if r["loss"] is not None:
                    self.writer.add_scalar("train/step_loss", r["loss"], r["step"])
                self.writer.add_scalar("train/lr", r["lr"], r["step"])
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint at `step`: forget the records the interrupted session
        wrote after it. A metrics row's `step` is the step count after its evaluation (the
        checkpoint at `step` includes the row with that step); a steps.jsonl row's `step` is the
        index of the optimizer step it logs, i.e. the step done *after* checkpoint `step`, so the
        checkpoint includes rows 0 .. step-1 only."""
        self._purge_step = step
        if not self.enabled:
            return
        for name, keep_row in (("metrics.jsonl", lambda s: s <= step), ("steps.jsonl", lambda s: s < step)):
            path = self.run_dir / name
            if path.is_file():
                keep = [ln for ln in path.read_text().splitlines() if ln.strip() and keep_row(json.loads(ln)["step"])]
                path.write_text("".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------ progress bar
    def start_bar(self, total: int, completed: int, description: str, allowed: bool) -> None:
        if not (self.verbose and allowed and progress_allowed()):
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                             transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def update_bar(self, completed: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)

    def stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        self.stop_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png: training/validation loss and validation accuracy against epochs."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["epoch"] for r in records]
    has_acc = any(r.get("val_acc") is not None for r in records)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6))
    ax = axes[0] if has_acc else axes
    ax.plot(x, [r.get("train_loss") for r in records], marker=".", label="train")
    ax.plot(x, [r.get("val_loss") for r in records], marker=".", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[1]
        ax.plot(x, [100 * r["val_acc"] if r.get("val_acc") is not None else None for r in records],
                marker=".", color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("validation accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
