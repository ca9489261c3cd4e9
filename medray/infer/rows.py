"""Input rows of a batch-inference run: an image prefix listed, or a records file read by
`medray.data.read_records` (one reader, one alias map), each row with a stable id."""

from __future__ import annotations

import json

from medray import storage

from .options import InferConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".jsonl", ".json", ".parquet"))


def list_rows(cfg: InferConfig) -> list[dict]:
    """Input rows with stable ids: {id, image, question, references, adapter, error}.

    A records file is read by `medray.data.read_records`, the reader training and eval use, so
    every form one understands the others do too. A row it cannot read becomes a row with
    its error, under its own id (or its position): it fails alone, and shows in the output.
    """
    if _is_manifest(cfg.input):
        from medray.data import RecordError, read_records

        bad: list[RecordError] = []
        rows = []
        for rec in read_records(cfg.input, image_root=cfg.image_folder, errors=bad):
            question, answer = rec.query()
            error = ""
            if rec.adapter and rec.adapter not in cfg.adapters:
                error = (f"the row names adapter {rec.adapter!r}, which this run does not have; its named "
                         f"adapters: {sorted(cfg.adapters) or 'none'} (--adapters)")
            rows.append({"id": str(rec.id), "image": rec.image or "", "question": question or "",
                         "references": json.dumps(answer) if answer is not None else "",
                         "adapter": rec.adapter or "", "error": error})
        rows += [{"id": e.id, "image": "", "question": "", "references": "", "adapter": "",
                  "error": f"RecordError: {e}"} for e in bad]
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{cfg.input}: row ids are not unique (e.g. {dup!r}); give each row an id")
        return rows
    files = storage.list_files(cfg.input, include=cfg.include, exclude=cfg.exclude)
    base = cfg.input.rstrip("/") + "/"
    return [{"id": f.uri[len(base):] if f.uri.startswith(base) else f.uri, "image": f.uri, "question": "",
             "references": "", "adapter": "", "error": ""}
            for f in files if f.uri.lower().endswith(IMAGE_SUFFIXES)]
