"""A prefix split into key ranges that tasks list in parallel, and the listing of one range.

Why: listing ten million keys from one process is 10,000 sequential S3 requests before the
first image can be read (many minutes), and a list of them in one process is gigabytes. A
range is listed by one task, page by page, and rows flow on as each page arrives.

Correctness never depends on how the split falls: the ranges are contiguous, the first starts
at the beginning of the key space and the last runs to its end, so every key lies in exactly
one range whatever the probes saw. The probes only decide how evenly the keys spread:
- a level with several common prefixes (directories, MIMIC-CXR's p10..p19) splits on them;
- a level holding a single directory and nothing else is descended into;
- a flat level (keys only) splits on the character after the keys' common prefix, found by a
  loose index scan (one request per character in use: 11 for decimal names, 17 for hex).
Splitting costs a bounded number of requests, whatever the prefix holds (MAX_PROBES).

Keys are compared as Python strings, whose code-point order is S3's UTF-8 byte order.
A local directory is split on a sample of its top-level entries and listed by a pruned walk.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ._uri import is_s3, local_path

if TYPE_CHECKING:
    from ._store import FileInfo, Storage

PAGE = 1000  # S3's largest page: one request a page
MAX_PROBES = 160  # requests one split may make, whatever the prefix holds
_TOP = "\U0010ffff"  # sorts after every character: "s" + _TOP bounds every key starting with s
# A local directory is sampled, not read, to place the boundaries: scandir returns entries in
# the file system's own (hash) order, so the first entries are a fair sample of all of them.
_LOCAL_SAMPLE = 10_000
_LOCAL_MAX_RANGES = 4  # one disk: more walkers of one directory only repeat the scan


@dataclass(frozen=True)
class KeyRange:
    """Keys under `prefix` (relative to it, '/'-separated) from `start` (inclusive) to `end`
    (exclusive; None: to the end)."""

    prefix: str
    start: str = ""
    end: str | None = None

    def holds(self, key: str) -> bool:
        return key >= self.start and (self.end is None or key < self.end)


def _before(key: str) -> str | None:
    """A string that sorts before `key` and after every string that sorts before it, up to
    strings that start with it followed by _TOP (S3's StartAfter is exclusive)."""
    if not key:
        return None
    return key[:-1] + chr(ord(key[-1]) - 1) + _TOP if ord(key[-1]) > 0 else key[:-1]


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _spread(bounds: list[str], max_ranges: int) -> list[str]:
    """At most max_ranges - 1 of the sorted `bounds`, evenly spaced."""
    bounds = sorted(set(b for b in bounds if b))
    if len(bounds) < max_ranges:
        return bounds
    step = len(bounds) / max_ranges
    return sorted({bounds[int(i * step)] for i in range(1, max_ranges)})


def _ranges(prefix: str, bounds: list[str]) -> list[KeyRange]:
    edges = [""] + bounds + [None]
    return [KeyRange(prefix, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def split_prefix(store: "Storage", prefix: str, max_ranges: int) -> list[KeyRange]:
    """Contiguous key ranges covering everything under `prefix`, at most `max_ranges` of them."""
    if max_ranges <= 1:
        return [KeyRange(prefix)]
    if is_s3(prefix):
        return _ranges(prefix, _spread(_s3_bounds(store, prefix, max_ranges), max_ranges))
    return _ranges(prefix, _spread(_local_bounds(prefix), min(max_ranges, _LOCAL_MAX_RANGES)))


def _s3_bounds(store: "Storage", prefix: str, max_ranges: int) -> list[str]:
    loc = store._s3(prefix)
    base = loc.key.rstrip("/") + "/" if loc.key else ""
    probes = 0

    def page(prefix: str, **kwargs) -> dict:
        nonlocal probes
        probes += 1
        return store.client.list_objects_v2(Bucket=loc.bucket, Prefix=base + prefix, **kwargs)

    level = ""  # the directory (relative to prefix) the split is made in
    for _ in range(8):
        resp = page(level, Delimiter="/", MaxKeys=PAGE)
        dirs = [p["Prefix"][len(base):] for p in resp.get("CommonPrefixes", [])]
        keys = [o["Key"][len(base):] for o in resp.get("Contents", []) if not o["Key"].endswith("/")]
        if len(dirs) == 1 and not keys and not resp.get("IsTruncated"):
            level = dirs[0]  # everything lies under one directory: split inside it
            continue
        if len(dirs) >= 2:
            return dirs  # the level's directories (the first page of them) are the boundaries
        if not resp.get("IsTruncated"):
            return []  # one page holds the level: one range
        break
    else:
        return []
    # A flat level of more than a page: the keys' common prefix, then the characters after it.
    first, last = keys[0], keys[-1]
    common = _common(first, last)
    while len(common) > len(level) and probes < MAX_PROBES // 2:
        beyond = page(level, StartAfter=base + common + _TOP, MaxKeys=1).get("Contents", [])
        if not beyond:
            break
        common = _common(common, beyond[0]["Key"][len(base):])
    chars: list[str] = []
    after: str | None = base + common if common else None
    while probes < MAX_PROBES:
        kwargs = {"StartAfter": after} if after else {}
        found = page(common, MaxKeys=1, **kwargs).get("Contents", [])
        if not found:
            break
        key = found[0]["Key"][len(base):]
        if len(key) <= len(common):
            after = base + key  # the key that equals the common prefix itself
            continue
        chars.append(key[len(common)])
        after = base + common + chars[-1] + _TOP
    return [common + c for c in chars[1:]]


def _local_bounds(prefix: str) -> list[str]:
    root = local_path(prefix)
    rel = ""
    for _ in range(8):
        if not root.is_dir():
            return []
        names = []
        with os.scandir(root) as it:
            for entry in it:
                names.append(entry.name + "/" if entry.is_dir() else entry.name)
                if len(names) >= _LOCAL_SAMPLE:
                    break
        if len(names) == 1 and names[0].endswith("/"):
            rel += names[0]
            root = root / names[0].rstrip("/")
            continue
        return [rel + n for n in names]
    return []


def list_range(store: "Storage", rng: KeyRange, *, include: str | None = None, exclude: str | None = None,
               page_size: int = PAGE) -> Iterator[list["FileInfo"]]:
    """The files of one key range, a page at a time, each page as soon as it is listed.
    `include` / `exclude` are globs on the key relative to the prefix."""

    def keep(key: str) -> bool:
        if include and not fnmatch.fnmatch(key, include):
            return False
        return not (exclude and fnmatch.fnmatch(key, exclude))

    source = _s3_range(store, rng, page_size) if is_s3(rng.prefix) else _local_range(rng, page_size)
    for files in source:
        kept = [f for key, f in files if keep(key)]
        if kept:
            yield kept


def _s3_range(store: "Storage", rng: KeyRange, page_size: int):
    from ._store import FileInfo, StorageError

    loc = store._s3(rng.prefix)
    base = loc.key.rstrip("/") + "/" if loc.key else ""
    kwargs = {"Bucket": loc.bucket, "Prefix": base, "MaxKeys": page_size}
    if (after := _before(rng.start)) is not None:
        kwargs["StartAfter"] = base + after
    try:
        while True:
            resp = store.client.list_objects_v2(**kwargs)
            out = []
            for obj in resp.get("Contents", []):
                key = obj["Key"][len(base):]
                if rng.end is not None and key >= rng.end:
                    if out:
                        yield out
                    return
                if key >= rng.start and not obj["Key"].endswith("/"):  # skip console "folder" markers
                    out.append((key, FileInfo(f"s3://{loc.bucket}/{obj['Key']}", obj["Size"],
                                              obj.get("ETag", "").strip('"') or None)))
            if out:
                yield out
            if not resp.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
            kwargs.pop("StartAfter", None)
    except StorageError:
        raise
    except Exception as e:  # botocore's errors name no prefix
        raise StorageError(f"listing {rng.prefix} from {rng.start!r}: {e}") from e


def _local_range(rng: KeyRange, page_size: int):
    from ._store import FileInfo

    root = local_path(rng.prefix)
    if root.is_file():  # a single file given as the input
        if rng.start == "":
            yield [(root.name, FileInfo(str(root), root.stat().st_size))]
        return
    page: list = []

    def walk(directory, rel: str):
        nonlocal page
        try:
            entries = sorted(os.scandir(directory),
                             key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):  # as Path.rglob: no loops through links
                sub = rel + entry.name + "/"
                # Prune a directory whose keys ([sub, sub + _TOP)) all lie outside the range.
                if (rng.end is not None and sub >= rng.end) or sub + _TOP < rng.start:
                    continue
                yield from walk(entry.path, sub)
            elif entry.is_file():
                key = rel + entry.name
                if rng.holds(key):
                    page.append((key, FileInfo(entry.path, entry.stat().st_size)))
                    if len(page) >= page_size:
                        yield page
                        page = []

    yield from walk(root, "")
    if page:
        yield page
