"""Records files read in parts, a page of rows at a time, for readers that must not hold a
whole file: a manifest of ten million rows streams through a batch job in blocks.

- Parquet: parts are runs of row groups, read in parallel, with only the columns a record
  reads (`record_keys`); a row's position comes from the row-group sizes in the footer.
- JSON lines (.jsonl, or a .json file of one object per line, as MedMCQA's release names
  them): one part, read as a stream, so a row's position (the id of a row without one) is
  its line's index among the file's rows, as `read_records` counts it.
- A JSON document (a list, or a dict keyed by id) is one value: one part, parsed whole.

Each row keeps the position `read_records` gives it, so a row without an id gets the same id
streamed as read whole, and an output written by either resumes under the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator, Literal

from medray import storage

from .records import RecordError, medmcqa_cop_base, read_rows, record_keys

PAGE = 1000
_CHUNK = 1 << 20
StreamFormat = Literal["parquet", "jsonl", "json"]


def is_records_file(uri: str) -> bool:
    return uri.lower().endswith((".jsonl", ".json", ".parquet"))


@dataclass(frozen=True)
class FilePart:
    """Rows of one records file: row groups of a Parquet file (`first_row` is the position of
    the first), or the whole file."""

    uri: str
    fmt: StreamFormat
    row_groups: tuple[int, ...] = ()
    first_row: int = 0


def _format(uri: str) -> StreamFormat:
    suffix = PurePosixPath(uri.split("?")[0]).suffix.lower()
    return {".parquet": "parquet", ".jsonl": "jsonl"}.get(suffix, "json")


def _parquet(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.default_storage().filesystem_for(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def split_records_file(uri: str, max_parts: int) -> list[FilePart]:
    """Parts of a records file for tasks to read side by side: reads a Parquet footer (its
    row-group sizes), nothing of any other file."""
    fmt = _format(uri)
    if fmt != "parquet":
        return [FilePart(uri, fmt)]
    meta = _parquet(uri).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if not sizes:
        return [FilePart(uri, fmt)]
    per = -(-len(sizes) // max(1, max_parts))
    parts, first = [], 0
    for start in range(0, len(sizes), per):
        groups = tuple(range(start, min(start + per, len(sizes))))
        parts.append(FilePart(uri, fmt, groups, first))
        first += sum(sizes[g] for g in groups)
    return parts


def read_part(part: FilePart, page: int = PAGE) -> Iterator[list[tuple[int, dict | RecordError]]]:
    """The rows of one part as pages of (position, raw row); a JSON line that does not parse
    comes as its RecordError."""
    if part.fmt == "parquet":
        yield from _parquet_rows(part, page)
    elif part.fmt == "jsonl":
        yield from _paged(_json_lines(part.uri), page)
    else:
        yield from _paged(_json_document(part.uri), page)


def _paged(rows: Iterator[tuple[int, dict]], page: int) -> Iterator[list[tuple[int, dict]]]:
    out = []
    for item in rows:
        out.append(item)
        if len(out) >= page:
            yield out
            out = []
    if out:
        yield out


def _parquet_rows(part: FilePart, page: int):
    pf = _parquet(part.uri)
    names = set(pf.schema_arrow.names)
    columns = sorted(names & record_keys())
    if not columns:
        raise RecordError(f"{part.uri}: none of its columns ({sorted(names)[:12]}) is one a record reads "
                          f"({sorted(record_keys())})")
    groups = list(part.row_groups) if part.row_groups else None
    n = part.first_row
    for batch in pf.iter_batches(batch_size=page, row_groups=groups, columns=columns):
        rows = batch.to_pylist()
        yield [(n + i, r) for i, r in enumerate(rows)]
        n += len(rows)


def _lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """The file's lines as (line number from 1, bytes), read as a stream."""
    fs, path = storage.default_storage().filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        rest, number = b"", 0
        while chunk := f.read(_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line
        if rest:
            yield number + 1, rest


def _json_lines(uri: str) -> Iterator[tuple[int, dict | RecordError]]:
    """One row per non-empty line, numbered as read_rows numbers them (blank lines skipped).
    A line that is not JSON is a row too, its RecordError in place of the row: it fails
    alone, where read_rows stops the whole file."""
    n = 0
    for number, line in _lines(uri):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = RecordError(f"{uri} line {number}: not JSON ({e.msg})", row=n, id=str(n))
        yield n, row
        n += 1


def _json_document(uri: str) -> Iterator[tuple[int, dict]]:
    """A .json file: JSON lines when its first line is a whole object and more follows (MedMCQA
    names its JSON-lines files .json), else one JSON value, parsed whole by read_rows."""
    first = next((line for _, line in _lines(uri) if line.strip()), b"")
    lines = False
    if first.lstrip()[:1] == b"{":
        try:
            lines = isinstance(json.loads(first), dict) and _has_second_row(uri)
        except json.JSONDecodeError:
            lines = False
    if lines:
        yield from _json_lines(uri)
    else:
        yield from enumerate(read_rows(uri))


def _has_second_row(uri: str) -> bool:
    seen = 0
    for _, line in _lines(uri):
        if line.strip():
            seen += 1
            if seen == 2:
                return True
    return False


def cop_base(part: FilePart) -> int:
    """MedMCQA's `cop` base for the whole file a part belongs to (medmcqa_cop_base): the
    `cop` column of a Parquet file, or one pass over a JSON file's rows."""
    if part.fmt == "parquet":
        values = _parquet(part.uri).read(columns=["cop"]).column("cop").to_pylist()
    else:
        whole = FilePart(part.uri, part.fmt)
        values = (r.get("cop") for page in read_part(whole) for _, r in page if isinstance(r, dict))
    return medmcqa_cop_base(values, part.uri)
