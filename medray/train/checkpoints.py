"""Which checkpoint a restarted stage resumes from, and which ones a finished stage keeps.

Ray Train registers a checkpoint only once its controller has taken every rank's report,
and it takes them with a lag. A node lost a few seconds after a checkpoint was written
left that checkpoint (and the one before) complete in storage but unregistered: the
restart resumed from an older one and redid two intervals (measured by hand: steps 5-12
redone, checkpoints 8 and 12 left behind). So a restarted worker group looks in the run's
storage itself and resumes from the newest *complete* checkpoint, registered or not; and a
finished stage deletes the checkpoints beyond the last `keep` steps, so a failed attempt's
leftovers do not pile up.

Complete means: every rank's `worker-<rank>.json` is there, and every file each rank listed
in it has arrived with the size it had when written (a node can die mid-upload).
"""

from __future__ import annotations

import json
import logging

from medray import storage

log = logging.getLogger(__name__)


def manifest(directory, rank: int, step: int, extra: dict) -> dict:
    """What rank `rank` writes as worker-<rank>.json beside its checkpoint files."""
    from pathlib import Path

    files = {p.name: p.stat().st_size for p in Path(directory).iterdir()
             if p.is_file() and not p.name.startswith("worker-")}
    return {"step": step, "files": files, **extra}


def complete(run_dir: str, world: int) -> list[tuple[int, str]]:
    """(step, checkpoint URI) of every complete checkpoint under a run's storage dir, by step."""
    found: dict[str, dict[str, int]] = {}
    for f in storage.list_files(run_dir):
        rel = f.uri[len(run_dir.rstrip("/")) + 1:]
        if rel.count("/") != 1 or not rel.startswith("checkpoint_"):
            continue
        ckpt, name = rel.split("/")
        found.setdefault(ckpt, {})[name] = f.size
    out = []
    for ckpt, sizes in found.items():
        uri = storage.join(run_dir, ckpt)
        try:
            infos = [json.loads(storage.read_text(storage.join(uri, f"worker-{r}.json"))) for r in range(world)]
        except (FileNotFoundError, ValueError):
            continue  # a rank's manifest missing or cut short: not complete
        if all(sizes.get(name) == size for info in infos for name, size in info.get("files", {}).items()) \
                and len({info["step"] for info in infos}) == 1:
            out.append((infos[0]["step"], uri))
    return sorted(out)


def newest(run_dir: str, world: int) -> tuple[int, str] | None:
    found = complete(run_dir, world)
    return found[-1] if found else None


def prune(run_dir: str, world: int, keep: int) -> list[str]:
    """Delete every checkpoint but the `keep` newest complete ones (incomplete ones too);
    returns the deleted checkpoint URIs."""
    kept = {uri for _, uri in complete(run_dir, world)[-keep:]}
    deleted = set()
    for f in storage.list_files(run_dir):
        rel = f.uri[len(run_dir.rstrip("/")) + 1:]
        if rel.count("/") == 1 and rel.startswith("checkpoint_"):
            ckpt = storage.join(run_dir, rel.split("/")[0])
            if ckpt not in kept:
                storage.delete(f.uri)
                deleted.add(ckpt)
    for ckpt in deleted:
        if not storage.is_s3(ckpt):  # local: the emptied directory too
            import shutil

            shutil.rmtree(storage.local_path(ckpt), ignore_errors=True)
    if deleted:
        log.info("pruned %d checkpoint(s) under %s", len(deleted), run_dir)
    return sorted(deleted)
