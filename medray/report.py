"""`medray report URI`: a curriculum run, or a demo run, as one self-contained HTML page.

What it gathers under URI (local or s3://), by the records medray writes (medray.provenance):
stage directories (`medray_stage.json`: their metrics.jsonl drawn as loss and learning-rate
curves), eval reports (`report.json` and its record) and the answers they scored. An eval
is labelled by what answered, followed through the records: the base model the first stage
started from ("before training"), or a stage of this run ("after"). The page shows:

    the loss and learning-rate curves of every stage
    accuracy per answer type, before against after (the corrected figures; see medray.eval)
    a grid of sample images with their question, the reference and each model's answer
    the provenance tree of the last evaluation (or the last stage)

Self-contained: charts and thumbnails are inline data: URIs, the style is inline, and there
is no script, so the file opens anywhere, from disk, a bucket or an e-mail.

The charts are medray.charts'; the parts it shares with a batch output's page, medray.pages'.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

from medray import lineage, pages, provenance, storage
from medray.provenance import Provenance


SAMPLES = 12


@dataclass
class Stage:
    uri: str
    record: Provenance | None
    rows: list[dict]
    marker: dict


@dataclass
class Evaluation:
    uri: str
    report: dict
    record: Provenance | None
    label: str = ""
    answers: dict[str, dict] = field(default_factory=dict)
    """id -> answer row (image, question, answer, references), from the predictions it scored."""
    settings: dict = field(default_factory=dict)
    """The settings the scored answers were made with (their inference record)."""


@dataclass
class Run:
    root: str
    stages: list[Stage]
    evals: list[Evaluation]


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def gather(root: str) -> Run:
    """Every stage and eval report under `root`, stages in the order they ran."""
    root = str(root).rstrip("/")
    files = [f.uri for f in storage.list_files(root)]
    stages = []
    for marker_uri in (u for u in files if u.endswith("/" + provenance.STAGE_FILE) and "/_ray/" not in u):
        directory = _parent(marker_uri)
        marker = json.loads(storage.read_text(marker_uri))
        metrics = storage.join(directory, "metrics.jsonl")
        rows = [json.loads(line) for line in storage.read_text(metrics).splitlines() if line.strip()] \
            if metrics in files else []
        stages.append(Stage(directory, provenance.read(directory), rows, marker))
    stages.sort(key=lambda s: (s.record.started_at if s.record else "", s.uri))
    evals = []
    for report_uri in (u for u in files if u.endswith("/report.json")):
        report = json.loads(storage.read_text(report_uri))
        if not isinstance(report, dict) or not ({"vqa", "mcqa"} & set(report)):
            continue  # not an eval report
        directory = _parent(report_uri)
        record = provenance.read(directory)
        if record is None and report.get("provenance"):
            record = Provenance.model_validate(report["provenance"])
        evals.append(Evaluation(directory, report, record))
    _label(stages, evals)
    return Run(root, stages, evals)


def _label(stages: list[Stage], evals: list[Evaluation]) -> None:
    """Name each eval by the model that answered, through the answers' record: the first
    stage's start model is "before training", a stage's output is "after <stage>"."""
    base = stages[0].record.input("start_model").digest if stages and stages[0].record else None
    outputs = {s.record.output.digest: s.uri.rsplit("/", 1)[-1] for s in stages if s.record and s.record.output}
    for ev in evals:
        ev.label = ev.uri.rsplit("/", 1)[-1]
        predictions = ev.record.input("predictions") if ev.record else None
        made = _read_quietly(predictions.uri) if predictions else None
        model = made.input("model") if made else None
        if model and model.digest:
            if model.digest == base:
                ev.label = f"before training (base model {model.uri})"
            elif model.digest in outputs:
                ev.label = f"after stage {outputs[model.digest]}"
        ev.settings = made.settings if made else {}
    evals.sort(key=lambda e: (0 if e.label.startswith("before training") else 1 if e.label.startswith("after") else 2,
                              e.uri))


def _read_quietly(uri: str) -> Provenance | None:
    try:
        return provenance.read(uri)
    except (OSError, ValueError, storage.StorageError):
        return None


# ----------------------------------------------------------------------------- sections
def _curves(stages: list[Stage]) -> str:
    from medray.charts import curve_png

    if not stages:
        return "<p>No training stages under this URI.</p>"
    parts = []
    for s in stages:
        name = s.uri.rsplit("/", 1)[-1]
        loss = [r for r in s.rows if r.get("loss") is not None]
        lr = [r for r in s.rows if r.get("lr") is not None]
        epochs = [r.get("epoch") or 0.0 for r in loss]
        last = f"{loss[-1]['loss']:.4f} at step {loss[-1]['step']}" if loss else "n/a"
        parts.append(
            f"<h3>stage {html.escape(name)}</h3><p class=meta>{len(loss)} logged steps; final loss {last}; "
            f"{html.escape(str(s.marker.get('seconds', '?')))} s; <code>{html.escape(s.uri)}</code></p>"
            + _settings_line(lineage.headline_settings("stage", s.record.settings) if s.record else {})
            + pages.img(curve_png([r["step"] for r in loss], [r["loss"] for r in loss], epochs=epochs,
                             title=f"stage {name}: training loss", ylabel="loss (mean token cross-entropy)"),
                   f"stage {name} training loss")
            + pages.img(curve_png([r["step"] for r in lr], [r["lr"] for r in lr], epochs=[r.get("epoch") or 0.0 for r in lr],
                             title=f"stage {name}: learning rate", ylabel="learning rate"),
                   f"stage {name} learning rate"))
    return "\n".join(parts)


def _settings_line(settings: dict) -> str:
    if not settings:
        return ""
    return "<p class=meta>" + "; ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in settings.items()) + "</p>"


def _accuracy(evals: list[Evaluation]) -> str:
    from medray.charts import bars_png

    if not evals:
        return "<p>No evaluation reports under this URI.</p>"
    groups: dict[str, dict[str, float | None]] = {}
    table = ["<table><tr><th>evaluation</th><th>answers</th><th>overall</th><th>closed accuracy</th><th>open recall</th>"
             "<th>open exact match</th><th>multiple choice</th><th>decoding</th><th>report</th></tr>"]
    for ev in evals:
        corrected = (ev.report.get("vqa") or {}).get("corrected") or {}
        counts = (ev.report.get("vqa") or {}).get("counts") or {}
        mcqa = (ev.report.get("mcqa") or {}).get("accuracy")
        figures = {f"closed accuracy (n={counts.get('closed', 0)})": corrected.get("closed_accuracy"),
                   f"open recall (n={counts.get('open', 0)})": corrected.get("open_recall"),
                   f"open exact match (n={counts.get('open', 0)})": corrected.get("exact_match")}
        if mcqa is not None:
            figures["multiple choice"] = mcqa
        for key, value in figures.items():
            groups.setdefault(key, {})[ev.label] = value
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        decoding = ", ".join(f"{k} {v}" for k, v in lineage.headline_settings("inference", ev.settings).items())
        table.append(f"<tr><td>{html.escape(ev.label)}</td><td>{ev.report.get('matched', 0)}</td>"
                     f"<td><b>{pct(corrected.get('overall'))}</b></td>"
                     f"<td>{pct(corrected.get('closed_accuracy'))}</td><td>{pct(corrected.get('open_recall'))}</td>"
                     f"<td>{pct(corrected.get('exact_match'))}</td><td>{pct(mcqa)}</td>"
                     f"<td>{html.escape(decoding)}</td><td><code>{html.escape(ev.uri)}</code></td></tr>")
    table.append("</table>")
    chart = pages.img(bars_png(groups, title="accuracy per answer type", size=(760, 380)), "accuracy per answer type")
    return chart + "\n" + "\n".join(table) + (
        "<p class=meta>Overall: the mean of closed accuracy and open exact match (the figure <code>medray demo</code> "
        "checks). The corrected figures of <code>medray eval</code>; report.json also holds LLaVA-Med's released "
        "run_eval.py figures.</p>")


def _samples(evals: list[Evaluation], n: int) -> str:
    from medray.data.shards import read_shards
    shown = [ev for ev in evals if ev.record and ev.record.input("predictions")]
    for ev in shown:
        try:
            ev.answers = {r["id"]: r for r in read_shards(ev.record.input("predictions").uri)}
        except (OSError, ValueError, storage.StorageError):
            ev.answers = {}
    shown = [ev for ev in shown if ev.answers]
    if not shown:
        return "<p>No answers to show.</p>"
    ids = sorted(i for i in shown[-1].answers if shown[-1].answers[i].get("image"))
    if not ids:
        return "<p>No sample images: these answers have none.</p>"
    # Spread over the ids (sorted), not the first n: a corpus sorted by class shows every class.
    picked = [ids[round(k * (len(ids) - 1) / max(1, n - 1))] for k in range(min(n, len(ids)))]
    cells = []
    for i in dict.fromkeys(picked):
        row = shown[-1].answers[i]
        reference = pages.reference_of(row)
        lines = []
        for ev in shown:
            answer = ev.answers.get(i, {})
            text = answer.get("answer") or (f"error: {answer['error']}" if answer.get("error") else "")
            mark = pages.mark(text, reference)
            lines.append(f"<div><b>{html.escape(ev.label)}:</b> {html.escape(text)}{mark}</div>")
        cells.append(f'<figure>{pages.thumbnail(row["image"])}<figcaption><div class=q>{html.escape(row["question"])}'
                     f'</div><div><b>reference:</b> {html.escape(reference)}</div>{"".join(lines)}'
                     f'<div class=meta>{html.escape(str(i))}</div></figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _lineage(run: Run) -> str:
    target = run.evals[-1].uri if run.evals else (run.stages[-1].uri if run.stages else None)
    if target is None:
        return "<p>No medray provenance under this URI.</p>"
    return pages.tree_html(target)


def render(run: Run, samples: int = SAMPLES) -> str:
    """The page for a gathered run, as one HTML string."""
    title = f"medray report: {run.root}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        # No favicon request: the page is one file, and a missing icon is a console error.
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title><style>{pages.STYLE}</style></head><body>",
        f"<h1>medray report</h1><p class=meta><code>{html.escape(run.root)}</code>: {len(run.stages)} stages, "
        f"{len(run.evals)} evaluations; made {provenance.now()} by medray {provenance.made_by().medray}</p>",
        "<h2>Training curves</h2>", _curves(run.stages),
        "<h2>Accuracy before and after training</h2>", _accuracy(run.evals),
        "<h2>Samples</h2>", _samples(run.evals, samples),
        "<h2>Provenance</h2>", _lineage(run),
        "</body></html>"])


def write_html_report(root: str, out: str | None = None, samples: int = SAMPLES) -> str:
    """Gather `root` and write its page to `out` (default: <root>/report.html); returns `out`."""
    out = out or storage.join(str(root).rstrip("/"), "report.html")
    storage.write_text(out, render(gather(root), samples))
    return out
