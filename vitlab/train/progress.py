"""Training progress where the user looks: a live bar on a terminal (rich), otherwise a plain line
every ``every_s`` seconds with the same figures (step, epoch, loss, images/s, ETA), so a log
file or a CI job shows that the run is moving."""
from __future__ import annotations

import os
import time

from .runlog import progress_allowed


def _every_s() -> float:
    try:
        return max(1.0, float(os.environ.get("VITLAB_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, log, total_steps: int, start_step: int, batch_size: int, allowed: bool,
                 every_s: float | None = None):
        self.log = log
        self.total, self.start = total_steps, start_step
        self.every_s = every_s if every_s is not None else _every_s()
        self.t0 = self.last = time.perf_counter()
        self.images = 0
        self.bar = bool(allowed) and log.verbose and progress_allowed()
        self.plain = bool(allowed) and log.verbose and not self.bar
        if self.bar:
            log.start_bar(total_steps, start_step, "train", True)

    def figures(self, step: int) -> tuple[float, float]:
        el = time.perf_counter() - self.t0
        ips = self.images / el if el > 0 else 0.0
        done = step - self.start
        eta = el / done * (self.total - step) if done > 0 else float("nan")
        return ips, eta

    def update(self, step: int, images: int, epoch: int, loss) -> None:
        self.images += images
        if not (self.bar or self.plain):
            return
        now = time.perf_counter()
        if self.bar:
            ips, _ = self.figures(step)
            self.log.update_bar(step, f"epoch {epoch} | loss {float(loss):.4f} | {ips:,.0f} img/s")
        elif now - self.last >= self.every_s:
            self.last = now
            ips, eta = self.figures(step)
            self.log.line(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) | epoch {epoch} | "
                          f"loss {float(loss):.4f} | {ips:,.0f} img/s | ETA {_duration(eta) if eta == eta else '?'}")

    def stop(self) -> None:
        self.log.stop_bar()
