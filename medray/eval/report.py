"""`medray eval`: join predictions to references by id, compute metrics, write a report."""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath

from medray import provenance, storage
from medray.data import MCQARecord, RecordError, VQARecord, read_records
from medray.data.shards import read_answers
from medray.provenance import Artifact, Provenance

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
    report["provenance"] = eval_provenance(predictions, preds, references, candidates).dump()
    made = provenance.read(predictions)  # what answered, kept with the score: outputs move
    if made is not None:
        report["predictions_provenance"] = made.dump()
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


def eval_provenance(predictions: str, answers: dict[str, str], references: str,
                    candidates: str | None) -> Provenance:
    """What a report scored: the predictions by the digest of their answers (the digest that
    `medray infer` records for its output, so `medray show` follows a report to the model that
    answered), and the references and candidates by their bytes."""
    inputs = [Artifact(role="predictions", uri=predictions, digest=provenance.digest_answers(answers)),
              Artifact(role="references", uri=references, digest=provenance.digest_file(references))]
    if candidates:
        inputs.append(Artifact(role="candidates", uri=candidates, digest=provenance.digest_file(candidates)))
    return Provenance(kind="eval", name=PurePosixPath(predictions.rstrip("/")).name or "eval", inputs=inputs,
                      made_by=provenance.made_by(), started_at=provenance.now())


def write_report(report: dict, out: str) -> list[str]:
    written = [storage.join(out, "report.json")]
    text = json.dumps(report, indent=2)
    storage.write_text(written[0], text)
    if report.get("provenance"):  # beside the report, with the report's own digest: `medray show OUT`
        record = Provenance.model_validate(report["provenance"])
        record.name = PurePosixPath(out.rstrip("/")).name or record.name  # the report's own directory
        record.output = Artifact(role="report", uri=written[0], digest=provenance.hash_bytes(text.encode()))
        record.finished_at = provenance.now()
        written.append(provenance.write(out, record))
    for name, png in charts(report).items():
        uri = storage.join(out, name)
        storage.write_bytes(uri, png)
        written.append(uri)
    return written


# The figures a chart shows per answer type: (label, key) in each variant's scores.
CHART_METRICS = {"closed": [("accuracy", "closed_accuracy")],
                 "open": [("recall", "open_recall"), ("exact match", "exact_match")]}


def charts(report: dict) -> dict[str, bytes]:
    """The report's charts as PNG bytes by file name: per answer type, LLaVA-Med's figures and
    the corrected ones side by side; multiple-choice accuracy."""
    from medray.charts import bars_png

    out = {}
    vqa = report.get("vqa")
    if vqa:
        for kind, metrics in CHART_METRICS.items():
            groups = {label: {variant: vqa[variant].get(key) for variant in ("llava_med", "corrected")}
                      for label, key in metrics}
            out[f"{kind}.png"] = bars_png(groups, title=f"{kind} questions (n={vqa['counts'][kind]})")
    if report.get("mcqa"):
        out["mcqa.png"] = bars_png({"accuracy": {"answers": report["mcqa"]["accuracy"]}},
                                   title=f"multiple choice (n={report['mcqa']['count']})")
    return out
