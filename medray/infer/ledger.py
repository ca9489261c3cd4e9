"""What a batch run knows about its rows without holding them in the driver.

- The done index: the ids an output already holds, as a sorted array of 128-bit hashes in Ray's
  object store (16 bytes a row, read zero-copy by every task on a node). Built by tasks that
  each list a key range of the output and read their shards' footers and id columns
  (medray.data.shards.read_shard_index), never an answer of a current shard. The read tasks
  probe it to drop rows that are done: the anti-join runs where the rows are listed.
- The tally (RunLedger): an actor that each read task tells how many rows it listed and
  skipped, and the set digest of its listing. The driver asks it for progress; the run's
  record takes the listing's digest from it. A read task that Ray retries starts its part
  again from zero (`begin`), so a retry never counts a row twice.

The driver holds object refs and a few counters: the same for ten rows or ten million.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from medray import storage
from medray.data import shards
from medray.digests import SetDigest

log = logging.getLogger(__name__)

KEY = np.dtype([("hi", "<u8"), ("lo", "<u8")])
# Key ranges of an output listed by separate tasks when an index is built; its shards' names
# are hex digests, so they spread evenly over the ranges.
INDEX_RANGES = 16
_READERS = 8  # shards read at once by one index task: the reads wait on the store, not the CPU


def id_keys(ids) -> np.ndarray:
    """128-bit keys of row ids (blake2b): a collision between ten million ids has odds of about
    1e-25, where a 64-bit key's would be 1e-6 (a row silently taken for done)."""
    data = b"".join(hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in ids)
    return np.frombuffer(data, dtype=KEY).copy() if data else np.zeros(0, dtype=KEY)


def contains(index: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` the sorted `index` holds."""
    if not len(index) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(index, keys), len(index) - 1)
    return index[pos] == keys


@dataclass
class DoneIndex:
    """The ids an output holds (`ref`: their sorted keys in the object store) and what they sum to."""

    ref: object | None
    rows: int
    shards: int
    answers: str
    """The set digest of the (id, answer) pairs the output holds."""
    legacy_shards: int = 0
    """Parquet shards without a footer digest (written before it existed): read in full once."""
    duplicates: int = 0
    """Rows whose id another row of the output has too."""


def _index_range(rng: storage.KeyRange) -> tuple[np.ndarray, int, str, int]:
    """One key range of an output: the sorted keys of its rows' ids, its shard count, the set
    digest of its answers, and how many Parquet shards had to be read in full."""
    uris = [f.uri for page in storage.list_range(rng, include=shards.SHARD_GLOB) for f in page]
    with ThreadPoolExecutor(_READERS) as pool:
        infos = list(pool.map(shards.read_shard_index, uris))
    digest, parts = SetDigest(), []
    for info in infos:
        digest.merge(info.answers)
        parts.append(id_keys(info.ids))
    legacy = sum(1 for info in infos if info.legacy)
    keys = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=KEY)
    return keys, len(uris), str(digest), legacy


def _merge(*ranges) -> tuple[np.ndarray, dict]:
    keys = np.concatenate([r[0] for r in ranges]) if ranges else np.zeros(0, dtype=KEY)
    keys.sort()
    digest = SetDigest()
    for r in ranges:
        digest.merge(r[2])
    dup = np.flatnonzero(keys[1:] == keys[:-1]) if len(keys) > 1 else np.zeros(0, dtype=int)
    summary = {"rows": int(len(keys)), "shards": sum(r[1] for r in ranges), "answers": str(digest),
               "legacy_shards": sum(r[3] for r in ranges), "duplicates": int(len(dup))}
    return keys, summary


def _has_shards(output: str) -> bool:
    """Whether any shard lies under `output`, stopping at the first (a page on S3; a directory
    is scanned lazily, not sorted)."""
    if storage.is_s3(output):
        return bool(storage.list_files(output, include=shards.SHARD_GLOB, limit=1))
    return next(storage.local_path(output).glob(shards.SHARD_GLOB), None) is not None


def build_done_index(output: str) -> DoneIndex:
    """The done index of `output`, built by Ray tasks (one per key range of the output, then one
    that merges their sorted keys). Empty, without a task, for an output with no shard yet."""
    import ray

    if not _has_shards(output):  # a new output: no task to start
        return DoneIndex(None, 0, 0, str(SetDigest()))
    ranges = storage.split_prefix(output, INDEX_RANGES)
    # A whole CPU each, though they mostly wait on the store (their threads read _READERS shards
    # at once): on a small node, fractional tasks would each start a worker process of their own.
    index_range = ray.remote(num_cpus=1)(_index_range)
    merge = ray.remote(num_cpus=1, num_returns=2)(_merge)
    keys_ref, summary_ref = merge.remote(*[index_range.remote(r) for r in ranges])
    summary = ray.get(summary_ref)
    if summary["duplicates"]:
        log.warning("%s holds %d rows whose id another row of it has too: its input's ids were not unique. "
                    "Each id is answered once per row that holds it; give every input row its own id",
                    output, summary["duplicates"])
    return DoneIndex(keys_ref if summary["rows"] else None, summary["rows"], summary["shards"], summary["answers"],
                     summary["legacy_shards"], summary["duplicates"])


def load_index(ref) -> np.ndarray:
    """The done index's keys in a task (zero-copy from the object store)."""
    import ray

    return ray.get(ref) if ref is not None else np.zeros(0, dtype=KEY)


class RunLedger:
    """Counts per read part (listed, skipped, listing digest), which parts have finished, and
    the rows written (the driver's count). A Ray actor (`start_ledger`); O(parts) state."""

    def __init__(self, parts: int, ahead_at_start: int, ahead: int):
        self.parts = parts
        self.bounds = (ahead_at_start, ahead)  # InferConfig.rows_ahead_at_start(), rows_ahead()
        self.written = 0
        self.listed: dict[int, int] = {}
        self.skipped: dict[int, int] = {}
        self.digests: dict[int, SetDigest] = {}
        self.finished: set[int] = set()

    def begin(self, part: int) -> None:
        self.listed[part], self.skipped[part], self.digests[part] = 0, 0, SetDigest()
        self.finished.discard(part)

    def add(self, part: int, listed: int, skipped: int, digest: str) -> None:
        self.listed[part] = self.listed.get(part, 0) + listed
        self.skipped[part] = self.skipped.get(part, 0) + skipped
        self.digests.setdefault(part, SetDigest()).merge(digest)

    def finish(self, part: int) -> None:
        self.finished.add(part)

    def wrote(self, rows: int) -> None:
        self.written += rows

    def ahead(self) -> int:
        """Rows listed to be answered that no shard holds yet: how far the listing runs ahead."""
        return sum(self.listed.values()) - sum(self.skipped.values()) - self.written

    def may_list(self) -> bool:
        """Whether a read task may list another page: the rows it would run ahead stay under
        the run's bound, the smaller one until a first shard is written."""
        return self.ahead() < self.bounds[1 if self.written else 0]

    def snapshot(self) -> dict:
        digest = SetDigest()
        for d in self.digests.values():
            digest.merge(d)
        return {"listed": sum(self.listed.values()), "skipped": sum(self.skipped.values()),
                "complete": len(self.finished) == self.parts, "listing": str(digest)}


def start_ledger(parts: int, ahead_at_start: int, ahead: int):
    """The run's ledger, on the driver's own node. Ray may place a 0-CPU actor on any node, and
    one on a worker node that is lost (a preempted spot instance) would take the run with it,
    though Ray Data redoes the lost node's tasks; the driver's node going ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(RunLedger)
    return actor.remote(parts, ahead_at_start, ahead)
