"""What the training loop asks for each epoch: this rank's micro-batches of every optimizer step.

``make_train_data(bundle, ...)`` returns an object with ``n_train``, ``steps_per_epoch`` and
``epoch(epoch, start_step)``, which yields ``(step_in_epoch, parts, images_in_step)`` where
``parts`` is the list of ``accum_steps`` (uint8 images, int64 labels) micro-batches of this rank.
Three kinds of training set stand behind it:

- in memory (:class:`~vitlab.data.core.ImageDataset`): the batch is gathered from the one tensor
  by index, in the main process (the fastest path for sets that fit);
- lazy image folders (:class:`~vitlab.data.lazy.LazyImageFolder`): the same indices, decoded by
  DataLoader worker processes (``workers``; default: from the cores present);
- WebDataset shards (:class:`~vitlab.data.shards.ShardSet`): see :mod:`vitlab.data.shards`.

For the first two, the order is a seeded permutation per epoch (a pure function of seed and
epoch), cut into global batches of ``batch_size``; each is split into ``accum_steps`` micro-batches
and each of those into ``world_size`` equal shards, one per rank. With ``drop_last=False`` (the
default) the last, partial batch of an epoch is used as well: it is topped up to a multiple of
``accum_steps x world_size`` with the first images of the epoch's order (none in one process
without accumulation), so every rank still gets an equal shard and every image is seen each epoch.
The position is still (seed, epoch, step): a resumed run continues bit for bit.
"""
from __future__ import annotations

import math
import os
import time

import torch

from ..errors import ConfigError


def auto_workers(requested: int | None = None, cpus: int | None = None) -> int:
    """Loader worker processes: ``requested`` when given (0: decode in the main process); otherwise
    one per core up to 8, leaving one core to the model where there are more than two."""
    if requested is not None and int(requested) >= 0:
        return int(requested)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1 if cpus > 2 else cpus))


class ThroughputProbe:
    """Times how long the loop waits for data against how long it computes, over the first steps of
    a run, and says once which side limits the speed (a loader that cannot keep up wastes the model)."""

    def __init__(self, report, skip: int = 2, steps: int = 20, seconds: float = 30.0):
        self.report = report
        self.skip, self.steps, self.seconds = skip, steps, seconds
        self.seen = 0
        self.wait = self.busy = 0.0
        self.images = 0
        self.done = report is None

    def add(self, wait_s: float, busy_s: float, images: int) -> None:
        if self.done:
            return
        self.seen += 1
        if self.seen <= self.skip:  # the first steps pay for start-up (workers, allocator, caches)
            return
        self.wait += wait_s
        self.busy += busy_s
        self.images += images
        if self.seen - self.skip >= self.steps or self.wait + self.busy >= self.seconds:
            self.done = True
            total = self.wait + self.busy
            model = self.images / self.busy if self.busy > 0 else float("inf")
            overall = self.images / total if total > 0 else float("inf")
            # with prefetching the loader delivers at least what the loop consumed; when the loop
            # waited, what it got is what the loader could give
            line = (f"throughput: model {model:,.0f} img/s, loader {overall:,.0f} img/s or more "
                    f"({100 * self.wait / max(total, 1e-9):.0f}% of step time waiting for data)")
            if self.wait > 0.2 * total:
                line += ("; warning: the data loader is the bottleneck: raise workers=N, use a smaller image "
                         "size on disk (vitlab data shard ... --max-side N) or an in-memory set")
            self.report(line)


class IndexedTrainData:
    """In-memory or lazy training sets: indices from the epoch permutation (see the module doc)."""

    def __init__(self, dataset, *, batch_size: int, accum_steps: int, world_size: int, rank: int, seed: int,
                 drop_last: bool, permutation, workers: int | None = None, report=None):
        self.ds = dataset
        self.n_train = len(dataset.labels)
        self.B, self.A, self.W, self.rank = int(batch_size), int(accum_steps), int(world_size), int(rank)
        self.seed = seed
        self.permutation = permutation
        per = self.A * self.W
        if self.n_train < max(per, self.B):  # a batch larger than the whole set is a mistake, not a partial batch
            raise ConfigError(f"batch_size={self.B} is larger than the training set ({self.n_train} images); "
                              f"use batch_size <= {self.n_train // per * per or per}")
        self.steps_per_epoch = self.n_train // self.B if drop_last else math.ceil(self.n_train / self.B)
        self.lazy = bool(getattr(dataset, "lazy", False))
        self.workers = auto_workers(workers) if self.lazy else 0
        self.probe = ThroughputProbe(report)
        self._loader = None
        self._sampler = None

    def describe(self) -> str:
        last = self.n_train - (self.steps_per_epoch - 1) * self.B
        tail = f", last batch {last}" if last != self.B and self.n_train >= self.B else ""
        src = f"decoded on the fly by {self.workers} worker(s)" if self.lazy else "in memory"
        return f"data: {self.n_train:,} training images {src}, {self.steps_per_epoch} steps per epoch{tail}"

    def step_indices(self, perm: torch.Tensor, s: int) -> tuple[list[torch.Tensor], int]:
        """This rank's micro-batch indices of step ``s`` and the global number of images in it."""
        batch = perm[s * self.B:(s + 1) * self.B]
        micro, local = self.B // self.A, self.B // (self.A * self.W)
        if len(batch) < self.B:  # the last, partial batch: equal shards for every rank
            pad = (-len(batch)) % (self.A * self.W)
            if pad:
                batch = torch.cat([batch, perm[:pad]])
            micro = len(batch) // self.A
            local = micro // self.W
        parts = [batch[m * micro:(m + 1) * micro][self.rank * local:(self.rank + 1) * local] for m in range(self.A)]
        return parts, len(batch)

    def epoch(self, epoch: int, start: int):
        perm = self.permutation(self.n_train, self.seed, epoch)
        plan = [self.step_indices(perm, s) for s in range(start, self.steps_per_epoch)]
        if not self.lazy or self.workers == 0:
            source = (([(self.ds.images[i], self.ds.labels[i]) for i in parts]) for parts, _ in plan)
        else:
            source = self._lazy_batches(plan)
        for k, parts in enumerate(_timed(source, self.probe, [n for _, n in plan])):
            yield start + k, parts, plan[k][1]

    def _lazy_batches(self, plan):
        if self._loader is None:
            self._sampler = _ListSampler()
            self._loader = torch.utils.data.DataLoader(
                self.ds, batch_sampler=self._sampler, num_workers=self.workers, collate_fn=_stack,
                persistent_workers=True, prefetch_factor=4, multiprocessing_context=_mp_context())
        self._sampler.batches = [p.tolist() for parts, _ in plan for p in parts]
        it = iter(self._loader)
        for parts, _ in plan:
            yield [next(it) for _ in parts]

    def position(self):
        return None  # the position is (seed, epoch, step): nothing else to save

    def restore(self, positions) -> None:
        pass

    def close(self) -> None:
        self._loader = None  # persistent workers end with the loader


class _ListSampler:
    """A batch sampler whose list of index batches the caller sets before each pass (so one
    DataLoader, with persistent workers, serves every epoch)."""

    batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _stack(items):
    xs, ys = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _mp_context():
    # fork starts workers at once and shares the file list copy-on-write; spawn where fork is absent
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else None


def _timed(source, probe: ThroughputProbe, counts):
    """Yield from ``source``, telling ``probe`` how long each item took to arrive and how long the
    consumer took with the previous one."""
    it = iter(source)
    k = 0
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        t1 = time.perf_counter()
        yield item
        probe.add(t1 - t0, time.perf_counter() - t1, counts[k])
        k += 1


def make_train_data(bundle, *, batch_size: int, accum_steps: int, world_size: int, rank: int, seed: int,
                    drop_last: bool = False, workers: int | None = None, permutation=None, report=None):
    """The training-set stream of ``bundle`` for this rank (see the module doc)."""
    train = bundle.train
    if hasattr(train, "train_stream"):  # WebDataset shards
        return train.train_stream(batch_size=batch_size, accum_steps=accum_steps, world_size=world_size, rank=rank,
                                  seed=seed, drop_last=drop_last, workers=workers, report=report)
    return IndexedTrainData(train, batch_size=batch_size, accum_steps=accum_steps, world_size=world_size, rank=rank,
                            seed=seed, drop_last=drop_last, permutation=permutation, workers=workers, report=report)
