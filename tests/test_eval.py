"""Evaluation against the seeds' own rules.

The `llava_med` figures below are what LLaVA-Med's released `llava/eval/run_eval.py` (tag
v1.0.0, commit b9a98a7, with nltk 3.10 for BLEU) prints for the same three files: they were
produced by running that script on the fixture this module writes, and are kept here as
literals. The files are built in LLaVA-Med's own formats (test.json conversations with
answer_type, answer-file JSONL with question_id/text, candidate.json {"0": [...]}),
independently of medray's readers.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medray.cli import main as cli_main
from medray.data import RecordError, read_records
from medray.eval import (corrected_closed_hit, evaluate, llava_med_scores, mcqa_choice, normalize,
                         normalize_llava_med, yes_no)

# (id, prediction, reference, answer_type): each row exercises one rule of the reference.
VQA = [
    ("c01", "Yes, there is.", "yes", "CLOSED"),
    ("c02", "No.", "yes", "CLOSED"),                        # wrong yes/no: a miss since release #35
    ("c03", "The scan looks normal", "no", "CLOSED"),       # "no" inside "normal": a reference hit
    ("c04", "I can't tell", "no", "CLOSED"),
    ("c05", "not sure", "no", "CLOSED"),                    # "no" inside "not": a reference hit
    ("c06", "Note the effusion.", "yes", "CLOSED"),         # "no" inside "note", "yes" absent: miss
    ("c07", "Left.", "left", "CLOSED"),                     # not yes/no: the reference always misses
    ("c08", "yes: the mass enhances", "yes", "CLOSED"),
    ("c09", "No\u2026 nothing there", "no", "CLOSED"),
    ("c10", "Yes\u2014there is a lesion", "yes", "CLOSED"),
    ("c11", "Yes and no.", "no", "CLOSED"),                 # both: the reference counts a hit
    ("c12", "", "yes", "CLOSED"),                           # empty answer
    ("c13", "CT", "MRI", "CLOSED"),
    ("c14", "The image is an MRI. It shows no bleed.", "mri", "CLOSED"),
    ("c15", "Yes.", "Yes", "CLOSED"),
    ("o01", "left lung", "left lung", "OPEN"),
    ("o02", "the right upper lobe", "right lobe", "OPEN"),
    ("o03", "two", "2", "OPEN"),                            # number words
    ("o04", "mass", "mass in liver", "OPEN"),
    ("o05", "2.", "2", "OPEN"),                             # a period after a digit goes
    ("o06", "At C5.", "c5", "OPEN"),
    ("o07", "Grade 2.", "grade 2", "OPEN"),
    ("o08", "It doesnt enhance", "doesn't enhance", "OPEN"),  # contractions
    ("o09", "", "liver", "OPEN"),                           # empty answer
    ("o10", "The liver. It is enlarged. There is a cyst.", "liver", "OPEN"),  # several sentences
    ("o11", "r\u00e9nal cyst", "r\u00e9nal cyst", "OPEN"),  # Unicode
    ("o12", "3.5 cm", "3.5 cm", "OPEN"),
    ("o13", "1,000 cells", "1000 cells", "OPEN"),
    ("o14", "a." * 40 + " liver", "liver", "OPEN"),         # > 32 periods: two passes differ
    ("o15", "left-sided mass", "left sided mass", "OPEN"),
    ("o16", "(axial) CT", "axial", "OPEN"),
    ("o17", "none", "0", "OPEN"),
    ("o18", "ten lesions", "10", "OPEN"),
    ("o19", "cant see; dont know", "can't", "OPEN"),
    ("o20", "x-ray", "x ray", "OPEN"),
    ("o21", "T2-weighted MRI.", "t2 weighted", "OPEN"),
]
CANDIDATES = ["left lung", "right lobe", "2", "mass in liver", "c5", "grade 2", "doesn't enhance", "liver",
              "r\u00e9nal cyst", "3.5 cm", "1000 cells", "left sided mass", "axial", "0", "10", "can't", "x ray",
              "t2 weighted", "brain"]
# What run_eval.py v1.0.0 printed for these files (percent).
RELEASED = {"exact_match": 73.29931972789116, "f1": 77.22222222222221, "precision": 73.29931972789116,
            "recall": 92.06349206349206, "open_recall": 92.06349206349206, "bleu1": 69.18186869568454,
            "open_accuracy": 90.47619047619048, "closed_accuracy": 60.0}


@pytest.fixture
def files(tmp_path):
    with open(tmp_path / "answers.jsonl", "w") as f:
        for qid, pred, *_ in VQA:
            f.write(json.dumps({"question_id": qid, "prompt": "Q?", "text": pred, "answer_id": "a", "model_id": "m"}) + "\n")
    (tmp_path / "test.json").write_text(json.dumps([
        {"id": qid, "image": f"{qid}.jpg", "answer_type": kind,
         "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": ref}]}
        for qid, _, ref, kind in VQA]))
    (tmp_path / "candidate.json").write_text(json.dumps({"0": CANDIDATES}))
    return tmp_path


def test_llava_med_variant_gives_the_released_scripts_figures(files):
    report = evaluate(str(files / "answers.jsonl"), str(files / "test.json"), candidates=str(files / "candidate.json"))
    assert report["vqa"]["counts"] == {"closed": 15, "open": 21}
    got = {k: v * 100 for k, v in report["vqa"]["llava_med"].items()}
    assert got == pytest.approx(RELEASED, abs=1e-9)


def test_open_accuracy_only_with_a_candidate_file(files):
    report = evaluate(str(files / "answers.jsonl"), str(files / "test.json"))
    assert "open_accuracy" not in report["vqa"]["llava_med"]
    assert report["vqa"]["llava_med"]["closed_accuracy"] == pytest.approx(0.6)


def test_the_reference_normalisation_quirks():
    # glossary.py's period rule strips a period after a digit, at most 32 per pass.
    assert normalize_llava_med("2.") == "2" and normalize_llava_med("grade 2.") == "grade 2"
    assert normalize_llava_med("3.5 cm") == "3.5 cm" and normalize_llava_med("1,000 cells") == "1000 cells"
    once = normalize_llava_med("a." * 40 + " liver")
    assert once == "a" * 33 + ".a" * 7 + ". liver"
    assert normalize_llava_med(once) == "a" * 40 + " liver"
    assert normalize_llava_med("it doesnt enhance") == "it doesn't enhance"
    assert normalize_llava_med("the left-sided, mass.") == "left sided mass"
    assert normalize_llava_med("none") == "0" and normalize_llava_med("(axial) ct") == "axial ct"
    # Unicode marks are not in its list: they stay glued to the word.
    assert normalize_llava_med("no\u2026 nothing") == "no\u2026 nothing"


def test_a_wrong_yes_no_counts_as_a_miss():
    # Release #35: before it, c02 would have been dropped and the accuracy read 1/1.
    assert llava_med_scores([("No.", "yes", "CLOSED")])["closed_accuracy"] == 0.0


def test_corrected_variant_reads_words():
    report = {qid: corrected_closed_hit(p, r) for qid, p, r, t in VQA if t == "CLOSED"}
    assert report == {"c01": 1, "c02": 0, "c03": 0, "c04": 0, "c05": 0, "c06": 0, "c07": 1, "c08": 1,
                      "c09": 1, "c10": 1, "c11": 0, "c12": 0, "c13": 0, "c14": 1, "c15": 1}
    assert yes_no("Yes and no.") is None and yes_no("not sure") is None and yes_no("normal") is None
    assert yes_no("NO!") == "no" and yes_no("\uff39\uff25\uff33") == "yes"  # full-width YES
    assert normalize("The Left-Sided, mass.") == "left sided mass"
    assert normalize("1,000 cells; 3.5 cm") == "1000 cells 3.5 cm" and normalize("doesn\u2019t") == "doesn't"
    assert normalize("At C5.") == "at c5" and normalize("Two lesions") == "2 lesions"


def test_corrected_figures(files):
    fixed = evaluate(str(files / "answers.jsonl"), str(files / "test.json"))["vqa"]["corrected"]
    assert fixed["closed_accuracy"] == pytest.approx(7 / 15)
    # Equal once normalised: o01 o03 o05 o07 o11 o12 o13 o14 (its "a"s are articles) o15 o17 o20.
    assert fixed["exact_match"] == pytest.approx(11 / 21)
    # The one figure a run is named by (the demo's check, the report's "overall"): closed and
    # open weigh the same, whatever the mix.
    assert fixed["overall"] == pytest.approx((7 / 15 + 11 / 21) / 2)


OPTIONS = {"A": "Hepatitis A", "B": "Hepatitis B", "C": "E. coli", "D": "tibia", "E": "none of these"}


@pytest.mark.parametrize("pred,choice", [
    ("B", "B"), ("(b)", "B"), ("b)", "B"), ("\uff22", "B"), ("B. Hepatitis B", "B"), ("B: it is B", "B"),
    ("The answer is D.", "D"), ("Answer: (d) tibia", "D"), ("tibia", "D"),
    ("Hepatitis B", "B"),                 # a name, not the letter B
    ("E. coli is the cause", "C"),        # an abbreviation, not option E
    ("A fracture of the tibia", "D"),     # an article, not option A
    ("A or B", None), ("(A) or (B)", None), ("", None), ("I do not know", None),
])
def test_mcqa_choice(pred, choice):
    assert mcqa_choice(pred, OPTIONS) == choice


def test_pubmedqa_not_sure_is_not_no():
    yn = {"A": "yes", "B": "no", "C": "maybe"}
    assert mcqa_choice("not sure", yn) is None
    assert mcqa_choice("No, it does not.", yn) == "B"
    assert mcqa_choice("Maybe.", yn) == "C" and mcqa_choice("yes or no", yn) is None


def _medmcqa_row(i, cop):
    return {"id": f"m{i}", "question": "Which bone?", "opa": "femur", "opb": "tibia", "opc": "ulna",
            "opd": "radius", "cop": cop, "choice_type": "single"}


def test_medmcqa_cop_base_is_read_per_release(tmp_path):
    # The hub's release (openlifescienceai/medmcqa) is 0-based, a Parquet/JSON export of it.
    hub = tmp_path / "validation.jsonl"
    hub.write_text("".join(json.dumps(_medmcqa_row(i, c)) + "\n" for i, c in enumerate([0, 1, 3])))
    assert [r.answer for r in read_records(str(hub))] == ["A", "B", "D"]
    # The authors' release is 1-based, JSON lines in a file named dev.json.
    own = tmp_path / "dev.json"
    own.write_text("".join(json.dumps(_medmcqa_row(i, c)) + "\n" for i, c in enumerate([1, 2, 4])))
    assert [r.answer for r in read_records(str(own))] == ["A", "B", "D"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(_medmcqa_row(i, c)) + "\n" for i, c in enumerate([0, 4])))
    with pytest.raises(RecordError, match="mixes"):
        read_records(str(mixed))


def test_pubmedqa_hub_layout_and_unreadable_rows_are_reported(tmp_path):
    rows = [{"pubid": 101, "question": "Does X help?", "context": {"contexts": ["a", "b"], "labels": ["x", "y"]},
             "long_answer": "It does.", "final_decision": "yes"},
            {"pubid": 102, "question": "Is Y safe?", "context": {"contexts": ["c"]}, "final_decision": "maybe"},
            {"pubid": 103, "question": "Broken?", "context": {"contexts": []}, "final_decision": "perhaps"}]
    refs = tmp_path / "pqa_labeled.json"
    refs.write_text(json.dumps(rows))
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps({"question_id": str(i), "text": t}) + "\n"
                             for i, t in [(101, "Yes."), (102, "not sure"), (103, "no")]))
    report = evaluate(str(preds), str(refs))
    assert report["mcqa"] == {"count": 2, "accuracy": 0.5, "no_choice": 1}
    assert report["unreadable_references"] == 1 and "row 2" in report["unreadable_examples"][0]
    recs = read_records(str(refs), errors=[])
    assert recs[0].id == "101" and recs[0].context == "a\nb" and recs[0].options["C"] == "maybe"


def test_eval_cli_writes_report_and_charts(files):
    out = files / "report"
    assert cli_main(["eval", "--predictions", str(files / "answers.jsonl"), "--references", str(files / "test.json"),
                     "--candidates", str(files / "candidate.json"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["matched"] == 36 and report["missing_predictions"] == 0
    assert report["vqa"]["llava_med"]["open_accuracy"] * 100 == pytest.approx(RELEASED["open_accuracy"])
    for chart in ("closed.png", "open.png"):
        assert Image.open(out / chart).size == (640, 360)


def test_a_job_s_page_marks_rows_and_scores_those_with_a_reference(tmp_path):
    """A batch job over records with references: its page (GET /v1/jobs/{id}/report) marks
    each answer as the corrected scores read it and gives the same figures medray eval would,
    over the answered rows that have a reference."""
    from medray.data.shards import COLUMNS, write_shard
    from medray.pages import answers_page

    rows = {c: [""] * 5 for c in COLUMNS}
    rows.update(id=["1", "2", "3", "4", "5"], question=["Is there an opacity?"] * 2 + ["Where is it?"] * 2 + ["?"],
                answer=["Yes.", "yes", "left lung", "the right", ""],
                references=[json.dumps(r) for r in ("yes", "no", "left lung", "left lung")] + [json.dumps("no")],
                error=["", "", "", "", "ImageDecodeError: cannot read image x.png"],
                generation=["{}"] * 5, latency_s=[0.0] * 5, completion_tokens=[1] * 5)
    write_shard(rows, output=str(tmp_path / "out"), fmt="jsonl")
    page = answers_page(str(tmp_path / "out"), "job")
    # closed 1 of 2, open 1 of 2: overall 50 %; the failed row is left out, not counted wrong.
    assert "<b>overall 50.0 %</b>: closed accuracy 50.0 %, open exact match 50.0 %, over the 4 answered rows" in page
    assert page.count("✓") == 2 and page.count("✗") == 2
