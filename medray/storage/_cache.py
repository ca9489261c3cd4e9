"""A local mirror of an s3:// prefix, refreshed by ETag.

Model directories are tens of GB; every Ray worker on a node loads the same one. The mirror
lives under the medray cache dir, one folder per bucket/prefix, with a JSON index of the
ETag each file was fetched at. A sync lists the prefix (one cheap call per 1000 keys) and
fetches only objects whose ETag changed, so an unchanged model is never downloaded twice.
A file lock makes concurrent syncs on one node wait for each other instead of racing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ._store import Storage, StorageError, default_storage
from ._uri import parse_s3

log = logging.getLogger(__name__)

INDEX = ".medray-etags.json"


def cache_root() -> Path:
    """MEDRAY_CACHE_DIR, else $XDG_CACHE_HOME/medray, else ~/.cache/medray."""
    env = os.environ.get("MEDRAY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medray"


@dataclass(frozen=True)
class SyncResult:
    path: Path
    """Local directory holding the mirror."""
    downloaded: tuple[str, ...]
    """Keys (relative to the prefix) fetched by this sync; empty when nothing changed."""
    removed: tuple[str, ...]
    """Local files dropped because their object is gone."""


def sync_prefix(uri: str, dest: Path | None = None, *, storage: Storage | None = None) -> SyncResult:
    """Mirror `uri` (an s3:// prefix) into `dest` (default: the cache), fetching only changes."""
    storage = storage or default_storage()
    loc = parse_s3(uri.rstrip("/"))
    dest = dest or cache_root() / "s3" / loc.bucket / loc.key
    dest.mkdir(parents=True, exist_ok=True)
    objects = storage.list_files(uri)
    if not objects:
        raise FileNotFoundError(f"nothing under {uri}")
    base = uri.rstrip("/") + "/"
    with open(dest / ".medray-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index_path = dest / INDEX
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        downloaded = []
        root = dest.resolve()
        for obj in objects:
            rel = obj.uri[len(base):]
            local = dest / rel
            # A key such as "a/../../x" must not write outside the mirror.
            if not local.resolve().is_relative_to(root) or rel.startswith(".medray-"):
                raise StorageError(f"refusing to mirror {obj.uri}: its key escapes {uri}")
            if index.get(rel) == obj.etag and local.is_file() and local.stat().st_size == obj.size:
                continue
            storage.download_file(obj.uri, local)
            index[rel] = obj.etag
            downloaded.append(rel)
            # Write the index after every file so an interrupted sync keeps what it fetched.
            index_path.write_text(json.dumps(index, indent=0, sort_keys=True))
        present = {obj.uri[len(base):] for obj in objects}
        removed = [rel for rel in list(index) if rel not in present]
        for rel in removed:
            (dest / rel).unlink(missing_ok=True)
            del index[rel]
        index_path.write_text(json.dumps(index, indent=0, sort_keys=True))
    if downloaded:
        log.info("synced %s: fetched %d file(s)", uri, len(downloaded))
    return SyncResult(dest, tuple(downloaded), tuple(removed))
