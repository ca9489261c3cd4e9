"""VQA and multiple-choice metrics.

Two families of VQA numbers are reported side by side:

- `llava_med`: LLaVA-Med's `llava/eval/run_eval.py`, reproduced with its quirks so numbers
  compare with published ones. Answers are normalised (lowercase, punctuation stripped,
  articles dropped, number words mapped to digits, including "none" -> "0"). Closed (yes/no)
  questions use *substring* tests: a prediction that contains "yes" or "no" anywhere
  ("normal", "note", "know") scores 1 when the reference is a substring of it, and when it
  is not, the question is *left out* of the denominator. Only a prediction with neither
  substring counts as a miss. Open questions: recall of reference tokens, token-count F1 /
  precision / recall, its "exact match" (distinct reference words found / prediction
  words), and BLEU-1.
- `corrected`: token-level matching for both answer types. A closed prediction is "yes" or
  "no" only if that token (and not the other) occurs, and every closed question counts.
  Open recall is computed over tokens, and exact match is equality of the normalised
  answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point


def normalize(text: str) -> str:
    """LLaVA-Med's answer normalisation (the VQA evaluation's, as run_eval.py applies it)."""
    out = text
    for p in _PUNCT:
        # Punctuation next to a space (or any text with a 1,000-style number) is removed;
        # inside a word it becomes a space ("left-sided" -> "left sided").
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def _counts(text: str) -> Counter:
    return Counter(text.lower().split())


def f1_precision_recall(pred: str, ref: str) -> tuple[float, float, float]:
    """Token-count F1, precision and recall of normalised answers (run_eval.py's calculate_f1score)."""
    p, r = _counts(normalize(pred)), _counts(normalize(ref))
    if not p or not r:
        return 0.0, 0.0, 0.0
    tp = sum(p[w] for w in p if w in r)
    fp = sum(p[w] for w in p if w not in r)
    fn = sum(r[w] for w in r if w not in p)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_exact_match(pred: str, ref: str) -> float:
    """run_eval.py's "exact match": distinct reference words found in the prediction / prediction words."""
    p, r = _counts(normalize(pred)), _counts(normalize(ref))
    total = sum(p.values())
    return 0.0 if total == 0 else sum(1 for w in r if w in p) / total


def bleu1(pred: str, ref: str) -> float:
    """Sentence BLEU with weights (1, 0, 0, 0): brevity penalty x clipped unigram precision."""
    hyp, refs = pred.lower().split(), ref.lower().split()
    if not hyp or not refs:
        return 0.0
    ref_counts = Counter(refs)
    clipped = sum(min(c, ref_counts[w]) for w, c in Counter(hyp).items())
    if clipped == 0:
        return 0.0
    bp = 1.0 if len(hyp) > len(refs) else math.exp(1 - len(refs) / len(hyp))
    return bp * clipped / len(hyp)


def llava_closed_hit(pred: str, ref: str) -> int | None:
    """1 / 0 as LLaVA-Med scores a yes/no question; None where it leaves the question out."""
    p, r = normalize(pred.lower()), normalize(ref.lower())
    if "yes" in p or "no" in p:
        return 1 if r in p else None
    return 0


def yes_no(pred: str) -> str | None:
    tokens = set(normalize(pred).split())
    if ("yes" in tokens) == ("no" in tokens):
        return None  # neither, or both: no answer
    return "yes" if "yes" in tokens else "no"


def corrected_closed_hit(pred: str, ref: str) -> int:
    return int(yes_no(pred) == normalize(ref).strip())


def open_recall(pred: str, ref: str) -> float:
    """Share of the reference's tokens that occur among the prediction's tokens."""
    p, r = set(normalize(pred).split()), normalize(ref).split()
    return sum(1 for w in r if w in p) / len(r) if r else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def vqa_metrics(pairs: list[tuple[str, str, str]]) -> dict:
    """Metrics over (prediction, reference, answer_type) triples; answer_type OPEN or CLOSED."""
    closed = [(p, r) for p, r, t in pairs if t == "CLOSED"]
    open_ = [(p, r) for p, r, t in pairs if t == "OPEN"]
    llava_closed = [h for h in (llava_closed_hit(p, r) for p, r in closed) if h is not None]
    f1s = [f1_precision_recall(p, r) for p, r in open_]
    return {
        "counts": {"closed": len(closed), "open": len(open_), "llava_med_closed_counted": len(llava_closed)},
        "llava_med": {
            "closed_accuracy": _mean(llava_closed),
            "open_recall": _mean([x[2] for x in f1s]),
            "exact_match": _mean([llava_exact_match(p, r) for p, r in open_]),
            "f1": _mean([x[0] for x in f1s]),
            "precision": _mean([x[1] for x in f1s]),
            "recall": _mean([x[2] for x in f1s]),
            "bleu1": _mean([bleu1(normalize(p), normalize(r)) for p, r in open_]),
        },
        "corrected": {
            "closed_accuracy": _mean([corrected_closed_hit(p, r) for p, r in closed]),
            "open_recall": _mean([open_recall(p, r) for p, r in open_]),
            "exact_match": _mean([float(normalize(p) == normalize(r)) for p, r in open_]),
        },
    }


_LETTER = re.compile(r"\b([A-E])\b")


def mcqa_choice(pred: str, options: dict[str, str]) -> str | None:
    """The option a free-text answer picks: a standalone letter first, else an option's text."""
    m = _LETTER.search(pred.strip())
    if m and m.group(1) in options:
        return m.group(1)
    text = normalize(pred)
    hits = [k for k, v in options.items() if normalize(v) and normalize(v) in text]
    return hits[0] if len(hits) == 1 else None


def mcqa_accuracy(pairs: list[tuple[str, str, dict[str, str]]]) -> dict:
    """Accuracy over (prediction, correct letter, options); unparseable answers are wrong."""
    hits = [int(mcqa_choice(p, opts) == ans) for p, ans, opts in pairs]
    return {"count": len(hits), "accuracy": _mean(hits)}
