"""Training data for one worker: records -> Examples, and a position-addressable sampler.

The sampler is a pure function of (epoch, step, micro-batch, rank): each epoch is one
seeded permutation, cut into optimizer steps of `examples_per_step` examples, each split
over micro-batches and ranks. Resuming at step k therefore continues with exactly the
examples an uninterrupted run would have seen - none twice, none skipped. The tail of
an epoch that does not fill a whole step is left out of that epoch (a different tail each
epoch, since the permutation changes).
"""

from __future__ import annotations

import numpy as np

from medray import storage
from medray.data import Example, load_image, read_records


class RecordsDataset:
    def __init__(self, records_uri: str, kind: str = "auto", image_root: str | None = None):
        self.records = read_records(records_uri, kind=kind, image_root=image_root)
        if not self.records:
            raise ValueError(f"{records_uri} holds no records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        rec = self.records[i]
        images = [load_image(storage.read_bytes(uri), uri) for uri in rec.images()]
        return Example(rec.to_messages(with_answer=True), images, rec.id or str(i))


class StepSampler:
    def __init__(self, n: int, *, world: int, micro_batch: int, accum: int, seed: int, shuffle: bool = True):
        self.n, self.world, self.micro, self.accum = n, world, micro_batch, accum
        self.seed, self.shuffle = seed, shuffle
        self.per_step = world * micro_batch * accum
        if self.per_step > n:
            raise ValueError(f"one optimizer step needs {self.per_step} examples but the data has {n}; "
                             "lower micro_batch_size / grad_accum / workers")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.per_step

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        """Example indices for global optimizer step `step`, micro-batch `micro`, on `rank`."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        base = in_epoch * self.per_step + (micro * self.world + rank) * self.micro
        return self._order(epoch)[base: base + self.micro].tolist()
