"""`medray eval`: join predictions to references by id, compute metrics, write a report."""

from __future__ import annotations

import io
import json
import logging

from medray import storage
from medray.data import MCQARecord, RecordError, VQARecord, read_records
from medray.data.shards import read_answers

from .metrics import mcqa_accuracy, vqa_metrics

log = logging.getLogger(__name__)


def read_candidates(uri: str) -> list:
    """LLaVA-Med's candidate answers for open accuracy: its candidate file ({"0": [answers]})
    or a plain JSON list."""
    obj = json.loads(storage.read_bytes(uri))
    if isinstance(obj, dict) and "0" in obj:
        obj = obj["0"]
    if not isinstance(obj, list) or not obj:
        raise RecordError(f"{uri}: a candidate file holds a non-empty list of answers (or {{\"0\": [...]}})")
    return obj


def evaluate(predictions: str, references: str, candidates: str | None = None) -> dict:
    """Score predictions (an answer file or medray infer shards) against a references file.

    Reference rows medray cannot read, and rows it cannot score (no answer, no answer_type),
    are counted in the report and logged, never dropped silently.
    """
    preds = read_answers(predictions)
    errors: list[RecordError] = []
    refs = read_records(references, errors=errors)
    vqa, mcqa, missing, unscored = [], [], [], []
    for rec in refs:
        if rec.id not in preds:
            missing.append(rec.id)
        elif isinstance(rec, VQARecord):
            if rec.answer is None or rec.answer_type is None:
                unscored.append(rec.id)
            else:
                vqa.append((preds[rec.id], rec.answer, rec.answer_type))
        elif isinstance(rec, MCQARecord):
            mcqa.append((preds[rec.id], rec.answer, rec.options))
        else:
            unscored.append(rec.id)
    report: dict = {"predictions": predictions, "references": references,
                    "matched": len(vqa) + len(mcqa), "missing_predictions": len(missing),
                    "unreadable_references": len(errors), "unscored_references": len(unscored)}
    if vqa:
        report["vqa"] = vqa_metrics(vqa, read_candidates(candidates) if candidates else None)
    if mcqa:
        report["mcqa"] = mcqa_accuracy(mcqa)
    if errors:
        report["unreadable_examples"] = [str(e) for e in errors[:5]]
        log.warning("%d reference rows could not be read, e.g. %s", len(errors), errors[0])
    if unscored:
        log.warning("%d references have no answer or answer_type to score (e.g. %s)", len(unscored), unscored[:3])
    if missing:
        log.warning("%d references have no prediction (e.g. %s)", len(missing), missing[:3])
    return report


def bar_chart(title: str, values: dict[str, float | None], size=(560, 320)) -> bytes:
    """A labelled bar chart (percentages) drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), title, fill="black")
    items = [(k, v) for k, v in values.items() if v is not None]
    if items:
        slot = (w - 20) / len(items)
        for i, (name, v) in enumerate(items):
            x0 = 10 + i * slot + slot * 0.15
            top = h - 40 - (h - 80) * max(0.0, min(1.0, v))
            draw.rectangle([x0, top, x0 + slot * 0.7, h - 40], fill=(70, 110, 200))
            draw.text((x0, top - 14), f"{100 * v:.1f}%", fill="black")
            draw.text((x0, h - 34), name[:18], fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_report(report: dict, out: str) -> list[str]:
    written = [storage.join(out, "report.json")]
    storage.write_text(written[0], json.dumps(report, indent=2))
    vqa = report.get("vqa")
    if vqa:
        for kind, keys in (("closed", ["closed_accuracy"]), ("open", ["open_recall", "exact_match"])):
            values = {f"{variant}:{k}": vqa[variant].get(k) for variant in ("llava_med", "corrected") for k in keys}
            uri = storage.join(out, f"{kind}.png")
            storage.write_bytes(uri, bar_chart(f"{kind} questions (n={vqa['counts'][kind]})", values))
            written.append(uri)
    if report.get("mcqa"):
        uri = storage.join(out, "mcqa.png")
        storage.write_bytes(uri, bar_chart(f"multiple choice (n={report['mcqa']['count']})",
                                           {"accuracy": report["mcqa"]["accuracy"]}))
        written.append(uri)
    return written
