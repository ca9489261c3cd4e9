"""The result-shard format of batch inference, read by eval and by resumed runs.

A run writes `part-<hash of its row ids>.parquet|jsonl` files under an output prefix, each
written atomically, so a retried write replaces its own shard instead of adding a copy.
Every row has the columns in COLUMNS.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import PurePosixPath
from typing import Literal

from medray import storage

COLUMNS = ["id", "image", "question", "answer", "references", "model", "generation", "latency_s",
           "completion_tokens", "error", "image_type", "expert_text"]
SHARD_GLOB = "part-*"
# The Parquet key-value metadata entry that holds the run's provenance record (JSON).
PROVENANCE_KEY = "medray.provenance"
ShardFormat = Literal["parquet", "jsonl"]


def shard_name(ids: list[str], fmt: ShardFormat) -> str:
    """A name derived from the ids a shard holds: the same rows always land in the same file."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}." + ("parquet" if fmt == "parquet" else "jsonl")


def write_shard(rows: dict[str, list], *, output: str, fmt: ShardFormat, metadata: dict[str, str] | None = None) -> str:
    """Write one shard atomically (columns as lists of plain values); returns its URI.
    `metadata` goes into a Parquet file's key-value metadata (JSONL has none: its rows carry
    their digests in `generation`, and _provenance.json lies beside)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [str(x) for x in rows["id"]]
    uri = storage.join(output, shard_name(ids, fmt))
    with storage.atomic_writer(uri) as f:
        if fmt == "parquet":
            table = pa.table({c: rows[c] for c in COLUMNS})
            if metadata:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            pq.write_table(table, f)
        else:
            for i in range(len(ids)):
                f.write((json.dumps({c: rows[c][i] for c in COLUMNS}) + "\n").encode())
    return uri


def read_shard(uri: str) -> list[dict]:
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def read_shards(prefix: str) -> list[dict]:
    """Every row written under an output prefix."""
    return [row for f in storage.list_files(prefix, include=SHARD_GLOB) for row in read_shard(f.uri)]


def written_ids(prefix: str) -> set[str]:
    """Ids already written under an output prefix (by earlier runs)."""
    return {row["id"] for row in read_shards(prefix)}


def read_answers(uri: str) -> dict[str, str]:
    """id -> answer from result shards (a prefix) or an answer file (JSON / JSONL / Parquet:
    medray's columns, or LLaVA-Med's `question_id` and `text`)."""
    from .records import read_rows

    if PurePosixPath(uri).suffix.lower() in (".json", ".jsonl", ".parquet"):
        rows = read_rows(uri)
    else:
        rows = read_shards(uri)
    return {str(r.get("id", r.get("question_id"))): str(r.get("answer", r.get("text")) or "") for r in rows}
