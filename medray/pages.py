"""The parts medray's HTML pages share (the style, inline images and thumbnails, answers
marked right or wrong, the lineage tree), and one batch output as a page (a served job's
"report" link). Self-contained pages: images inline as data: URIs, no script.
"""

from __future__ import annotations

import base64
import html
import io
import json

from medray import lineage, storage

THUMBNAIL = 160


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


def img(png: bytes, alt: str, cls: str = "chart") -> str:
    return (f'<img class="{cls}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def thumbnail(uri: str, prefixes: list[str] | None = None, servers: list[str] | None = None) -> str:
    """The image at `uri` as an inline thumbnail; outside `prefixes`, or for a PACS instance on
    none of `servers` (each when given), it is not read: a served job's page must not show
    what its client may not read."""
    from medray.data import load_image
    from medray.storage import dicomweb

    pacs = dicomweb.is_dicomweb(uri)
    if not (_on_allowed_server(uri, servers) if pacs else prefixes is None or storage.within(uri, prefixes)):
        return '<div class="noimg">not shown</div>'
    try:
        data = dicomweb.fetch_instance(uri) if pacs else storage.read_bytes(uri)
        image = load_image(data, uri + ".dcm" if pacs else uri).convert("RGB")  # DICOM: windowed, as the model sees it
    except Exception as e:  # a sample that cannot be shown says so; the page still renders
        return f'<div class="noimg">{html.escape(type(e).__name__)}</div>'
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return img(buf.getvalue(), uri.rsplit("/", 1)[-1], "thumb")


def _on_allowed_server(uri: str, servers: list[str] | None) -> bool:
    from medray.storage import dicomweb

    try:
        dicomweb.check_allowed(uri, servers)
    except (storage.AccessDenied, ValueError):  # another server, or no DICOMweb URI at all
        return False
    return True


def reference_of(row: dict) -> str:
    try:
        value = json.loads(row.get("references") or "null")
    except ValueError:
        value = row.get("references")
    return "" if value is None else str(value)


def mark(answer: str, reference: str) -> str:
    """Right or wrong as the corrected scores read it (medray.eval.answer_right); "?" for an
    answer to a yes/no question that is neither."""
    from medray.eval.metrics import answer_kind, answer_right, yes_no

    if not (answer and reference):
        return ""
    if answer_right(answer, reference):
        return " ✓"
    return " ?" if answer_kind(reference) == "CLOSED" and not yes_no(answer) else " ✗"


def tree_html(uri: str) -> str:
    """`medray show URI` as a <pre> block, or a line saying there is no record."""
    tree = lineage.lineage(uri)
    if not tree.get("kind"):
        return "<p>No medray provenance record at this URI.</p>"
    return f"<pre>{html.escape(chr(10).join(lineage.render_tree(tree)))}</pre>"


def scores_line(rows: list[dict]) -> str:
    """The corrected figures over the rows that have a reference (yes/no ones closed, the
    others open), as the eval report names them; nothing where no row has one."""
    from medray.eval.metrics import answer_kind, corrected_scores

    pairs = [(r.get("answer") or "", ref, answer_kind(ref))
             for r in rows if not r.get("error") and (ref := reference_of(r))]
    if not pairs:
        return ""
    c = corrected_scores(pairs)
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return (f"<p><b>overall {pct(c['overall'])}</b>: closed accuracy {pct(c['closed_accuracy'])}, open exact match "
            f"{pct(c['exact_match'])}, over the {len(pairs)} answered rows with a reference (yes/no references closed, "
            "the others open; overall is the mean of the two, as medray eval reports it)</p>")


def answers_page(output: str, title: str, limit: int = 200, image_prefixes: list[str] | None = None,
                 dicomweb_servers: list[str] | None = None) -> str:
    """One batch-inference output as a page (a served job's "report" link): every row (up to
    `limit`) with its image (only inside `image_prefixes` or on `dicomweb_servers`, when
    given), question, answer or error and reference, and the output's lineage."""
    from medray.data.shards import read_shards

    rows = sorted(read_shards(output), key=lambda r: str(r["id"]))
    cells = []
    for row in rows[:limit]:
        reference = reference_of(row)
        answer = (f'<div class="error">error: {html.escape(row["error"])}</div>' if row.get("error")
                  else f"<div><b>answer:</b> {html.escape(row.get('answer') or '')}"
                       f"{mark(row.get('answer') or '', reference)}</div>")
        cells.append(f'<figure>{thumbnail(row["image"], image_prefixes, dicomweb_servers) if row.get("image") else ""}<figcaption>'
                     f'<div class=q>{html.escape(row.get("question") or "")}</div>{answer}'
                     + (f"<div><b>reference:</b> {html.escape(reference)}</div>" if reference else "")
                     + f'<div class=meta>{html.escape(str(row["id"]))}</div></figcaption></figure>')
    errors = sum(1 for r in rows if r.get("error"))
    more = f" (the first {limit} shown)" if len(rows) > limit else ""
    tree = tree_html(output)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=meta><code>{html.escape(output)}</code>: {len(rows)} rows, "
        f"{errors} errors{more}</p>", scores_line(rows),
        f'<div class="grid">{"".join(cells)}</div>', "<h2>Provenance</h2>", tree, "</body></html>"])
