"""Lineage: the records of medray.provenance followed from an artifact to what made it, as a
tree (`medray show`, the report's Provenance section), its one-line headlines, and a copied
tree's records moved to name the copy, so the tree follows the copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medray import storage
from medray.provenance import PROVENANCE_FILE, STAGE_FILE, read


def relocate(directory: str | Path, old: str, new: str) -> int:
    """After a tree of artifacts was copied from `old` (a prefix) to `new`, make the copy's
    records name the copy: every URI under `old` in its STAGE_FILE and PROVENANCE_FILE files
    is rewritten under `new`, so `medray show` follows the copy. Digests name content and stay
    as they are (records are not part of any digest). Returns the files rewritten."""
    old, new = old.rstrip("/"), new.rstrip("/")

    def move(value):
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return new + value[len(old):]
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    count = 0
    for path in Path(directory).rglob("*"):
        if path.name in (STAGE_FILE, PROVENANCE_FILE) and path.is_file():
            data = json.loads(path.read_text())
            moved = move(data)
            if moved != data:
                path.write_text(json.dumps(moved, indent=2))
                count += 1
    return count


def lineage(uri: str, role: str = "artifact", digest: str | None = None, _seen: set | None = None) -> dict:
    """The tree under `uri`: its record, and each input's tree where the input is itself a
    medray artifact. Plain inputs (a base model from elsewhere, a records file) are leaves."""
    seen = _seen if _seen is not None else set()
    node: dict[str, Any] = {"role": role, "uri": uri, "digest": digest}
    if uri in seen:  # a cycle would be a bug in a writer; stop rather than recurse forever
        return node
    seen.add(uri)
    try:
        record = read(uri)
    except (OSError, ValueError, storage.StorageError):
        record = None
    if record is None:
        return node
    # An output without a digest of its own (an eval report's record) keeps the digest its
    # reader recorded for it.
    node.update(kind=record.kind, name=record.name, digest=(record.output.digest if record.output else None) or digest,
                made_by=record.made_by.model_dump(), settings=record.settings, settings_hash=record.settings_hash,
                started_at=record.started_at, finished_at=record.finished_at)
    node["inputs"] = [lineage(a.uri, a.role, a.digest, seen) for a in record.inputs]
    return node


def headline_settings(kind: str, settings: dict) -> dict:
    """The settings a reader needs to judge or redo an artifact, from its record's `settings`
    (which hold them all): a stage's training settings, an inference run's decoding."""
    if kind == "stage":
        return _stage_headline(settings)
    if kind in ("inference", "job"):
        return _decoding_headline(settings)
    return {}


def _stage_headline(stage: dict) -> dict:
    """What a reader needs to redo a stage's curve, from its record's settings (the stage
    config, flat)."""
    lora = stage.get("lora")
    return {k: v for k, v in {
        "trains": ", ".join(stage.get("train") or []), "lora": f"r {lora.get('r')}, alpha {lora.get('alpha')}" if lora else None,
        "quantization": stage.get("quantization") if stage.get("quantization") not in (None, "none") else None,
        "learning rate": stage.get("lr"), "schedule": stage.get("schedule"), "warmup": stage.get("warmup_ratio"),
        "steps": stage.get("max_steps"), "epochs": None if stage.get("max_steps") else stage.get("epochs"),
        "global batch": stage.get("global_batch_size"), "micro batch": stage.get("micro_batch_size"),
        "workers": stage.get("workers"), "strategy": stage.get("strategy"), "precision": stage.get("precision"),
        "seed": stage.get("seed"),
    }.items() if v not in (None, "", [], {})}


def _decoding_headline(settings: dict) -> dict:
    """How the scored answers were generated, from their inference record's settings."""
    temperature = settings.get("temperature")
    own = "question_for_rows_without_one" in settings  # a records file's rows (infer.pipeline.RECORDS_QUESTION)
    return {k: v for k, v in {
        "task": settings.get("task"), "engine": settings.get("engine"),
        "question": settings.get("question"),
        "questions": (f"each row's own (rows without one: {settings['question_for_rows_without_one']!r})"
                      if settings.get("question_for_rows_without_one") else "each row's own") if own else None,
        "max_new_tokens": settings.get("max_new_tokens"),
        "decoding": None if temperature is None else "greedy" if temperature == 0 else f"sampled, temperature {temperature}",
        "top_p": settings.get("top_p") if temperature else None,
    }.items() if v not in (None, "")}


def render_tree(node: dict, indent: str = "") -> list[str]:
    """`lineage`'s tree as indented text lines."""
    what = f"{node['kind']} {node['name']!r}" if node.get("kind") else node["role"]
    line = f"{indent}{what}: {node['uri']}"
    if node.get("kind"):
        line = f"{indent}{node['role']} <- {what}: {node['uri']}" if indent else line
    elif indent:
        line = f"{indent}{node['role']}: {node['uri']}"
    lines = [line]
    pad = indent.replace("└─ ", "   ").replace("├─ ", "│  ")
    details = []
    if node.get("digest"):
        details.append(f"digest {node['digest']}")
    headline = headline_settings(node.get("kind", ""), node.get("settings") or {})
    if headline:
        details.append("settings: " + ", ".join(f"{k} {v}" for k, v in headline.items()))
    if node.get("made_by"):
        mb = node["made_by"]
        details.append(f"medray {mb['medray']}" + (f" ({mb['git_commit'][:12]})" if mb.get("git_commit") else "")
                       + f", finished {node.get('finished_at') or '-'}")
    lines += [f"{pad}    {d}" for d in details]
    children = node.get("inputs", [])
    for i, child in enumerate(children):
        lines += render_tree(child, pad + ("└─ " if i == len(children) - 1 else "├─ "))
    return lines
