"""Provenance: what made each artifact, in one typed record every writer shares.

An artifact (a stage's model, a batch-inference output, an eval report) records its
inputs as (role, URI, digest) and, where an input is itself a medray artifact, `medray show`
follows it: eval report -> answers -> stage `instruct` -> stage `align` -> base model.

A digest names content, not a location: `tiny://llava-mistral` or `s3://models/x` may hold
other weights tomorrow, their digest will not. A directory's digest is sha256 over the
name, size and sha256 of each top-level file, minus medray's own bookkeeping (metrics,
charts, this record), so the same model has the same digest on local disk, as an S3
prefix (through medray's mirror) and in the temporary directory it was exported from.
File hashes are cached by path, size and mtime, so computing a digest again reads only
files that changed.

Following records from artifact to artifact (`medray show`) is medray.lineage's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from medray import storage
from medray.config import StrictModel
from medray.digests import SET_SCHEME, SetDigest, canonical_json

log = logging.getLogger(__name__)

SCHEMA = "medray.provenance/1"
# A stage directory's record (beside the model); batch outputs and eval reports keep theirs
# in PROVENANCE_FILE.
STAGE_FILE = "medray_stage.json"
PROVENANCE_FILE = "_provenance.json"
# A directory's digest as medray wrote it, with each file's hash: what a reader can check.
DIGEST_FILE = "medray_digest.json"
# Written beside a model by medray, not part of it: never in a digest.
BOOKKEEPING = frozenset({STAGE_FILE, PROVENANCE_FILE, DIGEST_FILE, "metrics.jsonl", "loss.png", "lr.png"})
_CHUNK = 1 << 20


class Artifact(StrictModel):
    """One input or output: where it was, and what it held."""

    role: str
    """What it was to the step: start_model, data, manifest, model, adapter, input, predictions, ..."""
    uri: str
    digest: str | None = None
    """sha256:<hex> of its content (a directory's: see digest_dir); None where not computed."""


class MadeBy(StrictModel):
    """The software that made an artifact."""

    medray: str
    git_commit: str | None = None
    """The checkout's commit, when medray runs from a git checkout."""
    python: str
    packages: dict[str, str | None]
    """ray, torch, transformers, peft, deepspeed, vllm: their versions, None where not installed."""


class Provenance(StrictModel):
    """What made one artifact: the record every medray writer keeps beside its output."""

    schema_: str = Field(SCHEMA, alias="schema")
    kind: Literal["stage", "inference", "eval", "job"]
    name: str
    """The stage's name, the job's id, or the output's last path component."""
    inputs: list[Artifact]
    settings: dict[str, Any] = {}
    """The effective configuration of the step (a stage config after --set, generation settings)."""
    settings_hash: str = ""
    output: Artifact | None = None
    made_by: MadeBy
    started_at: str
    finished_at: str | None = None

    def input(self, role: str) -> Artifact | None:
        return next((a for a in self.inputs if a.role == role), None)

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def hash_json(value: Any) -> str:
    """sha256:<hex> of a JSON value in canonical form (sorted keys, no spaces)."""
    return "sha256:" + hashlib.sha256(canonical_json(value).encode()).hexdigest()


def hash_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def made_by() -> MadeBy:
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return MadeBy(medray=version("medray") or "unknown", git_commit=_git_commit(), python=platform.python_version(),
                  packages={p: version(p) for p in ("ray", "torch", "transformers", "peft", "deepspeed", "vllm")})


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None  # an installed wheel, not a checkout
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------- digests
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_file(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return storage.cache_root() / "digests" / f"{key}.json"


def digest_dir(path: str | Path, *, cache: bool = True) -> str:
    return hash_json(_entries(path, cache))


def _entries(path: str | Path, cache: bool = True) -> list[list]:
    """sha256:<hex> over (name, size, sha256) of each top-level file of a local directory,
    medray's bookkeeping files and hidden files left out. Hashes of files whose size and
    mtime are unchanged since the last call come from a cache (`cache=False`: a directory
    about to be deleted)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    cache_path = _cache_file(path)
    try:
        cached = json.loads(cache_path.read_text())["files"] if cache else {}
    except (OSError, ValueError, KeyError):
        cached = {}
    files, entries = {}, []
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name in BOOKKEEPING or f.name.startswith("."):
            continue
        st = f.stat()
        hit = cached.get(f.name)
        sha = hit[2] if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns else _file_sha256(f)
        files[f.name] = [st.st_size, st.st_mtime_ns, sha]
        entries.append([f.name, st.st_size, sha])
    if not entries:
        raise FileNotFoundError(f"{path} holds no files to digest")
    if cache and files != cached:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "files": files}))
        os.replace(tmp, cache_path)  # atomic: a concurrent reader sees the old or the new
    return entries


def write_digest(path: str | Path) -> str:
    """Digest a local directory about to be published and write DIGEST_FILE into it (the
    digest and each file's name, size and sha256); returns the digest."""
    path = Path(path)
    files = _entries(path, cache=False)  # each file read once: a 7B export is ~14 GB
    digest = hash_json(files)
    (path / DIGEST_FILE).write_text(json.dumps({"digest": digest, "files": files}, indent=1))
    return digest


def recorded_digest(uri: str) -> str | None:
    """The digest a medray writer recorded in DIGEST_FILE under `uri`, without fetching the
    directory itself; None when there is none."""
    record = storage.join(str(uri).rstrip("/"), DIGEST_FILE)
    try:
        return json.loads(storage.read_text(record)).get("digest") if storage.exists(record) else None
    except (OSError, ValueError):
        return None


def digest_model(uri: str) -> str:
    """The digest of a model or adapter directory given by URI: a local path, s3:// or tiny://.

    For s3://, the digest medray recorded beside the files (DIGEST_FILE) is taken when the
    prefix still lists the same files with the same sizes, so a driver or an ingress need not
    fetch a 7B model to name it; otherwise the prefix is mirrored (fetching only what
    changed) and digested."""
    from medray.models.loading import resolve_model_uri
    from medray.raycluster import restore_cwd

    uri = str(uri)
    if storage.is_s3(uri) and (recorded := _recorded_if_listed(uri)):
        return recorded
    restore_cwd()  # in a job's driver: building tiny:// imports transformers, which needs a cwd
    path = resolve_model_uri(uri)  # a missing directory: the loader's own error and hints
    if not storage.is_s3(uri):
        return digest_dir(path)
    # Fetched once to be digested: the digest is cached beside the prefix, so no reader
    # fetches it for that again (a prefix medray may not write keeps costing a fetch).
    files = _entries(path)
    digest = hash_json(files)
    try:
        storage.write_text(storage.join(uri.rstrip("/"), DIGEST_FILE),
                           json.dumps({"digest": digest, "files": files}, indent=1))
    except Exception as e:  # read-only prefix, outside the allowed ones: the digest stands
        log.info("could not record the digest beside %s (%s)", uri, type(e).__name__)
    return digest


def _recorded_if_listed(uri: str) -> str | None:
    """DIGEST_FILE's digest under an S3 prefix, if its files' names and sizes match a listing."""
    try:
        record = json.loads(storage.read_text(storage.join(uri.rstrip("/"), DIGEST_FILE)))
        listed = {f.uri.rsplit("/", 1)[1]: f.size for f in storage.list_files(uri, recursive=False)}
    except (OSError, ValueError, storage.StorageError):
        return None
    files = {name: size for name, size, _ in record.get("files", [])}
    top = {n: size for n, size in listed.items() if n not in BOOKKEEPING and not n.startswith(".")}
    return record.get("digest") if files and files == top else None


def digest_answers(answers: dict[str, str]) -> str:
    """The digest of a set of answers (id -> answer): what an inference output holds, and what
    an eval scored. A set digest (medray.digests: the sum of each [id, answer]'s sha256), so
    a run adds up its shards' digests without reading an answer again; the same answers
    digest the same in Parquet or JSONL, however they are sharded.

    Records written before 2026-12 hold `sha256:` over the sorted pairs instead
    (LEGACY_ANSWERS_NOTE): a resumed run writes its output's record anew in this form."""
    return str(SetDigest().update([str(k), str(v or "")] for k, v in answers.items()))


def is_set_digest(digest: str | None) -> bool:
    return bool(digest) and digest.startswith(SET_SCHEME)


LEGACY_ANSWERS_NOTE = ("its record names the answers by a digest of an earlier form (sha256: over the sorted "
                       "answers); medray now digests answers as a set (sha256-set:), summed shard by shard. The "
                       "record is rewritten in the new form when this run finishes; an eval report made from the "
                       "old answers keeps the old form: run `medray eval` again to link them by the new one")


def digest_file(uri: str) -> str:
    """sha256:<hex> of one file's bytes (a records list, a manifest), local or s3://."""
    return hash_bytes(storage.read_bytes(str(uri)))


# ----------------------------------------------------------------------------- records
class OutputConflict(ValueError):
    """An output already holds results made from other inputs or settings than this run's."""


def differences(then: Provenance, now: Provenance, *, by_uri: frozenset[str] = frozenset()) -> list[str]:
    """What differs between the record an output holds and this run's, in words: each input
    whose digest (or, for the roles in `by_uri`, whose URI) changed, and each changed setting."""
    out = []
    for role in sorted({a.role for a in then.inputs} | {a.role for a in now.inputs}):
        a, b = then.input(role), now.input(role)
        if a is None or b is None:
            out.append(f"{role}: {a.uri if a else 'none'} then, {b.uri if b else 'none'} now")
        elif role in by_uri or not (a.digest and b.digest):
            if a.uri != b.uri:
                out.append(f"{role}: {a.uri} then, {b.uri} now")
        elif a.digest != b.digest:
            out.append(f"{role} {b.uri}: {a.digest} then, {b.digest} now")
    if then.settings_hash != now.settings_hash:
        keys = sorted(k for k in then.settings.keys() | now.settings.keys()
                      if then.settings.get(k) != now.settings.get(k))
        out += [f"{k}: {then.settings.get(k)!r} then, {now.settings.get(k)!r} now" for k in keys] or ["settings"]
    return out


def write(uri: str, record: Provenance) -> str:
    """Write `record` as PROVENANCE_FILE under the output prefix `uri`; returns its URI."""
    target = storage.join(str(uri).rstrip("/"), PROVENANCE_FILE)
    storage.write_text(target, json.dumps(record.dump(), indent=2))
    return target


def read(uri: str) -> Provenance | None:
    """The provenance of the artifact at `uri` (a stage directory, an output prefix, or a
    record file itself), or None when it has none."""
    uri = str(uri).rstrip("/")
    candidates = [uri] if uri.endswith(".json") else [storage.join(uri, STAGE_FILE), storage.join(uri, PROVENANCE_FILE)]
    for candidate in candidates:
        if not storage.exists(candidate):
            continue
        data = json.loads(storage.read_text(candidate))
        record = data.get("provenance", data) if isinstance(data, dict) else None
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            return Provenance.model_validate(record)
    return None
