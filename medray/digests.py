"""Content digests that combine: the digest of a set of rows, built block by block.

The digest of a set is the sum, modulo 2**256, of the sha256 of each member's canonical JSON.
A sum does not care in which order, in which block or on which node a member was counted, so
a pipeline adds up each block's digest where the block is, a shard keeps its own in its
footer, and the digest of ten million answers costs the driver one integer. The same set
digests the same whichever way it was cut (a test recomputes it by hand).

Owns: canonical JSON and set digests. Imports nothing from medray, so that data (the shard
format) and provenance (the records) both use the one definition.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

SET_SCHEME = "sha256-set:"
_MOD = 1 << 256


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one text per value, whoever writes it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class SetDigest:
    """The digest of a set of JSON values, added one at a time or merged from other SetDigests."""

    __slots__ = ("total", "count")

    def __init__(self, total: int = 0, count: int = 0):
        self.total, self.count = total % _MOD, count

    def add(self, value: Any) -> "SetDigest":
        self.total = (self.total + int.from_bytes(hashlib.sha256(canonical_json(value).encode()).digest(), "big")) % _MOD
        self.count += 1
        return self

    def update(self, values: Iterable[Any]) -> "SetDigest":
        for v in values:
            self.add(v)
        return self

    def merge(self, other: "SetDigest | str") -> "SetDigest":
        other = SetDigest.parse(other) if isinstance(other, str) else other
        self.total = (self.total + other.total) % _MOD
        self.count += other.count
        return self

    def __str__(self) -> str:
        return f"{SET_SCHEME}{self.count}:{self.total:064x}"

    @classmethod
    def parse(cls, text: str) -> "SetDigest":
        if not text.startswith(SET_SCHEME):
            raise ValueError(f"not a set digest: {text!r}")
        count, _, total = text[len(SET_SCHEME):].partition(":")
        return cls(int(total, 16), int(count))


def set_digest(values: Iterable[Any]) -> str:
    return str(SetDigest().update(values))
