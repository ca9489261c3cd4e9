"""The result-shard format of batch inference, read by eval and by resumed runs.

A run writes `part-<hash of its row ids>.parquet|jsonl` files under an output prefix, each
written atomically, so a retried write replaces its own shard instead of adding a copy.
Every row has the columns in COLUMNS. A Parquet shard also carries, in its footer, how many
rows it holds and the set digest of its answers (SHARD_KEY): a resumed run learns what a
shard holds from its footer and its id column, never from its answers.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from medray import storage
from medray.digests import SetDigest

COLUMNS = ["id", "image", "question", "answer", "references", "model", "generation", "latency_s",
           "completion_tokens", "error", "image_type", "expert_text", "study_uid", "series_uid"]
"""study_uid, series_uid: a DICOMweb instance's study and series ("" for other images)."""


def block(**columns):
    """A block of shard rows, its columns by name in COLUMNS' order: what the generation stage
    returns. A column missing or unknown is a TypeError here, where it is made, not a shard
    that lacks it (the columns are declared once, above)."""
    missing, unknown = [c for c in COLUMNS if c not in columns], sorted(set(columns) - set(COLUMNS))
    if missing or unknown:
        raise TypeError(f"shard columns: missing {missing}, unknown {unknown} (medray.data.shards.COLUMNS)")
    return {c: columns[c] for c in COLUMNS}
SHARD_GLOB = "part-*"
# The Parquet key-value metadata entry that holds the run's provenance record (JSON).
PROVENANCE_KEY = "medray.provenance"
# The Parquet key-value metadata entry that says what the shard holds: {"rows", "answers"}.
# Shards written before it existed are read in full once, to digest their answers.
SHARD_KEY = "medray.shard"
ShardFormat = Literal["parquet", "jsonl"]


def shard_name(ids: list[str], fmt: ShardFormat) -> str:
    """A name derived from the ids a shard holds: the same rows always land in the same file."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}." + ("parquet" if fmt == "parquet" else "jsonl")


def answers_digest(ids, answers) -> SetDigest:
    """The set digest of (id, answer) pairs: what a shard, an output and an eval's
    predictions are named by (medray.provenance.digest_answers)."""
    return SetDigest().update([str(i), str(a or "")] for i, a in zip(ids, answers))


@dataclass(frozen=True)
class ShardInfo:
    """What one shard holds, as a resumed run and the run's record need it."""

    uri: str
    ids: list[str]
    answers: str
    """The set digest of its (id, answer) pairs (medray.digests)."""
    legacy: bool = False
    """A Parquet shard without SHARD_KEY (written before it existed): its answers were read."""


def write_shard(rows: dict[str, list], *, output: str, fmt: ShardFormat,
                metadata: dict[str, str] | None = None) -> ShardInfo:
    """Write one shard atomically (columns as lists of plain values).
    `metadata` goes into a Parquet file's key-value metadata (JSONL has none: its rows carry
    their digests in `generation`, and _provenance.json lies beside)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [str(x) for x in rows["id"]]
    digest = str(answers_digest(ids, rows["answer"]))
    uri = storage.join(output, shard_name(ids, fmt))
    with storage.atomic_writer(uri) as f:
        if fmt == "parquet":
            table = pa.table({c: rows[c] for c in COLUMNS})
            meta = {**(metadata or {}), SHARD_KEY: json.dumps({"rows": len(ids), "answers": digest})}
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
            pq.write_table(table, f)
        else:
            for i in range(len(ids)):
                f.write((json.dumps(as_values({c: rows[c][i] for c in COLUMNS})) + "\n").encode())
    return ShardInfo(uri, ids, digest)


# Columns that hold JSON text in a row: a Parquet column has one type, and a reference may be
# a word, a list or an object. A JSONL shard (and a job's answers download) holds their
# values, so pandas and jq read values, not strings; readers get the text back (read_shard).
JSON_COLUMNS = ("references", "generation")


def as_values(row: dict) -> dict:
    """A row with its JSON_COLUMNS as values ("" is None), for JSON lines."""
    return {k: (json.loads(v) if v else None) if k in JSON_COLUMNS and isinstance(v, str) else v
            for k, v in row.items()}


def _as_text(row: dict) -> dict:
    """as_values undone. A row whose `generation` is a string was written before JSONL shards
    held values, and is taken as it is."""
    if isinstance(row.get("generation"), str):
        return row
    return {k: ("" if v is None else json.dumps(v)) if k in JSON_COLUMNS else v for k, v in row.items()}


def read_shard_index(uri: str) -> ShardInfo:
    """A shard's ids and answers' digest, reading as little as its format allows: a Parquet
    shard's footer and id column; a JSONL shard, or a Parquet one written before SHARD_KEY,
    in full."""
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = storage.default_storage().filesystem_for(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = (pf.schema_arrow.metadata or {}).get(SHARD_KEY.encode())
            if meta is not None:
                ids = [str(i) for i in pf.read(columns=["id"]).column("id").to_pylist()]
                return ShardInfo(uri, ids, json.loads(meta)["answers"])
            table = pf.read(columns=["id", "answer"])
            ids, answers = table.column("id").to_pylist(), table.column("answer").to_pylist()
            legacy = True
    else:
        rows = read_shard(uri)
        ids, answers, legacy = [r["id"] for r in rows], [r.get("answer") for r in rows], False
    ids = [str(i) for i in ids]
    return ShardInfo(uri, ids, str(answers_digest(ids, answers)), legacy)


def read_shard(uri: str) -> list[dict]:
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [_as_text(json.loads(line)) for line in data.decode().splitlines() if line.strip()]


def read_shards(prefix: str) -> list[dict]:
    """Every row written under an output prefix."""
    return [row for f in storage.list_files(prefix, include=SHARD_GLOB) for row in read_shard(f.uri)]


def read_answers(uri: str) -> dict[str, str]:
    """id -> answer from result shards (a prefix) or an answer file (JSON / JSONL / Parquet:
    medray's columns, or LLaVA-Med's `question_id` and `text`)."""
    from .records import read_rows

    if PurePosixPath(uri).suffix.lower() in (".json", ".jsonl", ".parquet"):
        rows = read_rows(uri)
    else:
        rows = read_shards(uri)
    return {str(r.get("id", r.get("question_id"))): str(r.get("answer", r.get("text")) or "") for r in rows}
