"""Eval numbers on a small crafted set, worked out by hand (see the comments)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from medray.cli import main as cli_main
from medray.eval import evaluate, normalize

# (id, prediction, reference, answer_type)
VQA = [
    ("c1", "Yes, there is.", "yes", "CLOSED"),          # both variants: hit
    ("c2", "No.", "yes", "CLOSED"),                     # LLaVA-Med: left out (contains "no", ref not in it)
    ("c3", "The scan looks normal", "no", "CLOSED"),    # LLaVA-Med: hit ("no" in "normal"); corrected: miss
    ("c4", "I can't tell", "no", "CLOSED"),             # both: miss
    ("o1", "left lung", "left lung", "OPEN"),
    ("o2", "the right upper lobe", "right lobe", "OPEN"),
    ("o3", "two", "2", "OPEN"),                         # number words map to digits
    ("o4", "mass", "mass in liver", "OPEN"),
]
MCQA = [  # (id, prediction, correct letter)
    ("m1", "B", "B"),
    ("m2", "tibia", "B"),           # the option's text
    ("m3", "I think C", "A"),
    ("m4", "unsure", "D"),
]
OPTIONS = {"A": "femur", "B": "tibia", "C": "ulna", "D": "radius"}


@pytest.fixture
def files(tmp_path):
    preds = [{"question_id": i, "text": p} for i, p, *_ in VQA] + [{"question_id": i, "text": p} for i, p, _ in MCQA]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    refs = [{"id": i, "image": f"{i}.jpg", "answer_type": t,
             "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": r}]}
            for i, _, r, t in VQA]
    (tmp_path / "test.json").write_text(json.dumps(refs))
    mc = [{"id": i, "question": "Which bone?", "options": OPTIONS, "answer_idx": a} for i, _, a in MCQA]
    (tmp_path / "mcqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    return tmp_path


def test_normalisation_matches_llava_med():
    assert normalize("The Left-Sided, mass.") == "left sided mass"
    assert normalize("none") == "0" and normalize("Two lesions") == "2 lesions"
    assert normalize("1,000 cells") == "1000 cells" and normalize("3.5 cm") == "3.5 cm"


def test_vqa_metrics_both_variants(files):
    report = evaluate(str(files / "answers.jsonl"), str(files / "test.json"))
    vqa = report["vqa"]
    assert vqa["counts"] == {"closed": 4, "open": 4, "llava_med_closed_counted": 3}
    llava, fixed = vqa["llava_med"], vqa["corrected"]
    # Closed: LLaVA-Med counts c1 (1), c3 (1), c4 (0) and drops c2 -> 2/3; corrected: only c1 -> 1/4.
    assert llava["closed_accuracy"] == pytest.approx(2 / 3)
    assert fixed["closed_accuracy"] == pytest.approx(1 / 4)
    # Open recall per question: 1, 1, 1, 1/3.
    assert llava["open_recall"] == pytest.approx((3 + 1 / 3) / 4)
    assert fixed["open_recall"] == pytest.approx((3 + 1 / 3) / 4)
    # F1: 1, 0.8 (p 2/3, r 1), 1, 0.5 (p 1, r 1/3).
    assert llava["f1"] == pytest.approx((1 + 0.8 + 1 + 0.5) / 4)
    assert llava["precision"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
    # LLaVA-Med's "exact match" = distinct reference words found / prediction words: 1, 2/3, 1, 1.
    assert llava["exact_match"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
    assert fixed["exact_match"] == pytest.approx(2 / 4)  # o1 and o3 only
    # BLEU-1: 1, 2/3, 1, and for o4 a brevity penalty exp(1 - 3/1) on precision 1.
    assert llava["bleu1"] == pytest.approx((1 + 2 / 3 + 1 + math.exp(-2)) / 4)


def test_mcqa_accuracy(files):
    report = evaluate(str(files / "answers.jsonl"), str(files / "mcqa.jsonl"))
    assert report["mcqa"] == {"count": 4, "accuracy": pytest.approx(0.5)}


def test_eval_cli_writes_report_and_charts(files, capsys):
    out = files / "report"
    assert cli_main(["eval", "--predictions", str(files / "answers.jsonl"),
                     "--references", str(files / "test.json"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["matched"] == 8 and report["missing_predictions"] == 0
    for chart in ("closed.png", "open.png"):
        assert Image.open(out / chart).size == (560, 320)
