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

One module, though long: gathering the records and rendering them are one page's two halves,
each section a function of a few lines; the charts themselves live in medray.charts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

from medray import provenance, storage
from medray.provenance import Provenance


SAMPLES = 12
THUMBNAIL = 160


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
def _img(png: bytes, alt: str, cls: str = "chart") -> str:
    return (f'<img class="{cls}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


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
            + _settings_line(provenance.headline_settings("stage", s.record.settings) if s.record else {})
            + _img(curve_png([r["step"] for r in loss], [r["loss"] for r in loss], epochs=epochs,
                             title=f"stage {name}: training loss", ylabel="loss (mean token cross-entropy)"),
                   f"stage {name} training loss")
            + _img(curve_png([r["step"] for r in lr], [r["lr"] for r in lr], epochs=[r.get("epoch") or 0.0 for r in lr],
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
        decoding = ", ".join(f"{k} {v}" for k, v in provenance.headline_settings("inference", ev.settings).items())
        table.append(f"<tr><td>{html.escape(ev.label)}</td><td>{ev.report.get('matched', 0)}</td>"
                     f"<td><b>{pct(corrected.get('overall'))}</b></td>"
                     f"<td>{pct(corrected.get('closed_accuracy'))}</td><td>{pct(corrected.get('open_recall'))}</td>"
                     f"<td>{pct(corrected.get('exact_match'))}</td><td>{pct(mcqa)}</td>"
                     f"<td>{html.escape(decoding)}</td><td><code>{html.escape(ev.uri)}</code></td></tr>")
    table.append("</table>")
    chart = _img(bars_png(groups, title="accuracy per answer type", size=(760, 380)), "accuracy per answer type")
    return chart + "\n" + "\n".join(table) + (
        "<p class=meta>Overall: the mean of closed accuracy and open exact match (the figure <code>medray demo</code> "
        "checks). The corrected figures of <code>medray eval</code>; report.json also holds LLaVA-Med's released "
        "run_eval.py figures.</p>")


def _thumbnail(uri: str, prefixes: list[str] | None = None) -> str:
    """The image at `uri` as an inline thumbnail; outside `prefixes` (when given) it is not
    read: a served job's page must not show what its client may not read."""
    from medray.data import load_image

    if prefixes is not None and not storage.within(uri, prefixes):
        return '<div class="noimg">not shown</div>'
    try:
        image = load_image(storage.read_bytes(uri), uri).convert("RGB")  # DICOM: windowed, as the model sees it
    except Exception as e:  # a sample that cannot be shown says so; the page still renders
        return f'<div class="noimg">{html.escape(type(e).__name__)}</div>'
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _img(buf.getvalue(), uri.rsplit("/", 1)[-1], "thumb")


def _reference(row: dict) -> str:
    try:
        value = json.loads(row.get("references") or "null")
    except ValueError:
        value = row.get("references")
    return "" if value is None else str(value)


def _mark(answer: str, reference: str) -> str:
    """Right or wrong as the corrected scores read it (medray.eval.answer_right); "?" for an
    answer to a yes/no question that is neither."""
    from medray.eval.metrics import answer_kind, answer_right, yes_no

    if not (answer and reference):
        return ""
    if answer_right(answer, reference):
        return " ✓"
    return " ?" if answer_kind(reference) == "CLOSED" and not yes_no(answer) else " ✗"


def _scores_line(rows: list[dict]) -> str:
    """The corrected figures over the rows that have a reference (yes/no ones closed, the
    others open), as the eval report names them; nothing where no row has one."""
    from medray.eval.metrics import answer_kind, corrected_scores

    pairs = [(r.get("answer") or "", ref, answer_kind(ref))
             for r in rows if not r.get("error") and (ref := _reference(r))]
    if not pairs:
        return ""
    c = corrected_scores(pairs)
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return (f"<p><b>overall {pct(c['overall'])}</b>: closed accuracy {pct(c['closed_accuracy'])}, open exact match "
            f"{pct(c['exact_match'])}, over the {len(pairs)} answered rows with a reference (yes/no references closed, "
            "the others open; overall is the mean of the two, as medray eval reports it)</p>")


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
        reference = _reference(row)
        lines = []
        for ev in shown:
            answer = ev.answers.get(i, {})
            text = answer.get("answer") or (f"error: {answer['error']}" if answer.get("error") else "")
            mark = _mark(text, reference)
            lines.append(f"<div><b>{html.escape(ev.label)}:</b> {html.escape(text)}{mark}</div>")
        cells.append(f'<figure>{_thumbnail(row["image"])}<figcaption><div class=q>{html.escape(row["question"])}'
                     f'</div><div><b>reference:</b> {html.escape(reference)}</div>{"".join(lines)}'
                     f'<div class=meta>{html.escape(str(i))}</div></figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def answers_page(output: str, title: str, limit: int = 200, image_prefixes: list[str] | None = None) -> str:
    """One batch-inference output as a page (a served job's "report" link): every row (up to
    `limit`) with its image (only inside `image_prefixes`, when given), question, answer or
    error and reference, and the output's lineage."""
    from medray.data.shards import read_shards

    rows = sorted(read_shards(output), key=lambda r: str(r["id"]))
    cells = []
    for row in rows[:limit]:
        reference = _reference(row)
        answer = (f'<div class="error">error: {html.escape(row["error"])}</div>' if row.get("error")
                  else f"<div><b>answer:</b> {html.escape(row.get('answer') or '')}"
                       f"{_mark(row.get('answer') or '', reference)}</div>")
        cells.append(f'<figure>{_thumbnail(row["image"], image_prefixes) if row.get("image") else ""}<figcaption>'
                     f'<div class=q>{html.escape(row.get("question") or "")}</div>{answer}'
                     + (f"<div><b>reference:</b> {html.escape(reference)}</div>" if reference else "")
                     + f'<div class=meta>{html.escape(str(row["id"]))}</div></figcaption></figure>')
    errors = sum(1 for r in rows if r.get("error"))
    more = f" (the first {limit} shown)" if len(rows) > limit else ""
    lineage = _tree_html(output)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=meta><code>{html.escape(output)}</code>: {len(rows)} rows, "
        f"{errors} errors{more}</p>", _scores_line(rows),
        f'<div class="grid">{"".join(cells)}</div>', "<h2>Provenance</h2>", lineage, "</body></html>"])


def _lineage(run: Run) -> str:
    target = run.evals[-1].uri if run.evals else (run.stages[-1].uri if run.stages else None)
    if target is None:
        return "<p>No medray provenance under this URI.</p>"
    return _tree_html(target)


def _tree_html(uri: str) -> str:
    """`medray show URI` as a <pre> block, or a line saying there is no record."""
    tree = provenance.lineage(uri)
    if not tree.get("kind"):
        return "<p>No medray provenance record at this URI.</p>"
    return f"<pre>{html.escape(chr(10).join(provenance.render_tree(tree)))}</pre>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:0}.meta{color:#666;font-size:.85em}code{font-size:.85em}
img.chart{max-width:100%;margin:.3em .5em .3em 0;border:1px solid #eee}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1em}
figure{margin:0;border:1px solid #ddd;padding:.5em;border-radius:4px}figcaption{font-size:.85em}
img.thumb{display:block;margin:0 auto .4em;max-width:100%}.q{font-style:italic;margin-bottom:.3em}
.noimg{height:80px;background:#f3f3f3;color:#888;text-align:center;line-height:80px}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.8em}.error{color:#a40000}
"""


def render(run: Run, samples: int = SAMPLES) -> str:
    """The page for a gathered run, as one HTML string."""
    title = f"medray report: {run.root}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        # No favicon request: the page is one file, and a missing icon is a console error.
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
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
