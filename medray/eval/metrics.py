"""VQA and multiple-choice metrics.

Two families of VQA numbers are reported side by side:

- `llava_med`: LLaVA-Med's released `llava/eval/run_eval.py` (tag v1.0.0, commit b9a98a7),
  reproduced figure for figure so numbers compare with published ones. Everything that makes
  its numbers what they are is kept, including its accidents:
  - answers are lower-cased and normalised with the VQA tools' rules (its `glossary.py`):
    punctuation, number words ("none" -> "0"), articles, contractions ("doesnt" -> "doesn't");
  - its period pattern was meant to keep a period after a digit but does not ("2." -> "2"),
    and because `re.UNICODE` lands in `re.sub`'s count argument, one pass strips at most 32
    periods;
  - exact match and F1 normalise an answer a second time (so a second batch of periods goes);
  - closed questions are *substring* tests: a prediction containing "yes" or "no" anywhere
    ("normal", "note", "know") is a hit when the reference is a substring of it, and a miss
    otherwise (release #35 made a wrong yes/no a miss; before it, it was dropped);
  - "exact match" is distinct reference words found / prediction words, BLEU-1 is nltk's
    sentence_bleu with weights (1, 0, 0, 0), and open accuracy (only with a candidate file)
    picks the candidate answer sharing the most words with the prediction.
- `corrected`: what the numbers are meant to say. Unicode punctuation of any kind is a word
  boundary ("yes:", "no…", "Yes—there"), a closed answer is read as whole words ("normal" is
  not "no", "not sure" is neither), an answer holding both "yes" and "no" is a miss, closed
  questions that are not yes/no ("left or right?") score when the reference's words appear in
  order in the prediction, and open exact match is equality of the normalised answers.

Why one file of this size: both VQA variants and the MCQA reader share the normalisation
tables, and the reproduced script's rules read best side by side with the corrected ones.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

# --- the VQA tools' answer normalisation, as LLaVA-Med's run_eval.py applies it -----------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Written-without-apostrophe forms and their spelling (the VQA evaluation tools' table; its
# capitalised keys can never match lower-cased text, so they are left out).
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
    "howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll "
    "let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've "
    "mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock "
    "oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
    "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll "
    "somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've "
    "someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've "
    "something'dve:something'd've somethingll:something'll thats:that's thered:there'd "
    "thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd "
    "theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
    "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't "
    "whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd "
    "wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll "
    "whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've "
    "wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll "
    "y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd "
    "youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've").split())
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The reference pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead for the
# text "<=digit", which never follows a period, so only "not before a digit" is in force.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_PERIODS_PER_PASS = 32  # re.UNICODE (== 32) passed where re.sub takes its count


def normalize_llava_med(text: str) -> str:
    """One pass of run_eval.py's `normalize_word` (its caller lower-cases first)."""
    out = text
    for p in _VQA_PUNCT:
        # Next to a space (or anywhere in a text with a 1,000-style number) a mark is removed;
        # inside a word it becomes a space ("left-sided" -> "left sided").
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out, count=_VQA_PERIODS_PER_PASS)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _word_counts(text: str) -> Counter:
    return Counter(text.lower().split())


def llava_exact_match(pred: str, ref: str) -> float:
    """run_eval.py's "exact match" of once-normalised answers: it normalises both again, then
    divides the distinct reference words found in the prediction by the prediction's words."""
    p, r = _word_counts(normalize_llava_med(pred)), _word_counts(normalize_llava_med(ref))
    total = sum(p.values())
    return 0.0 if total == 0 else sum(1 for w in r if w in p) / total


def llava_f1(pred: str, ref: str) -> tuple[float, float, float]:
    """(F1, precision, recall) over word counts of once-normalised answers, normalised again."""
    p, r = _word_counts(normalize_llava_med(pred)), _word_counts(normalize_llava_med(ref))
    if not p or not r:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in p.items() if w in r)
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp = sum(c for w, c in p.items() if w not in r)
    fn = sum(c for w, c in r.items() if w not in p)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def bleu1(hypothesis: list[str], reference: list[str]) -> float:
    """nltk's sentence_bleu with weights (1, 0, 0, 0): brevity penalty x clipped unigram precision."""
    if not hypothesis:
        return 0.0
    ref_counts = Counter(reference)
    clipped = sum(min(c, ref_counts[w]) for w, c in Counter(hypothesis).items())
    if clipped == 0:
        return 0.0
    bp = 1.0 if len(hypothesis) > len(reference) else math.exp(1 - len(reference) / len(hypothesis))
    return bp * clipped / len(hypothesis)


def llava_open_hit(pred: str, ref: str, candidates: list) -> float:
    """run_eval.py's open accuracy: the candidate answer holding the largest share of the
    prediction's distinct words (first on ties) must equal the reference."""
    words = set(normalize_llava_med(pred).lower().split())
    best, best_score = None, -1.0
    for cand in candidates:
        cand = normalize_llava_med(str(cand))
        cand_words = set(cand.lower().split())
        score = sum(1 for w in words if w in cand_words) / len(cand_words) if cand_words else 0.0
        if score > best_score:
            best, best_score = cand, score
    return float(best == normalize_llava_med(ref))


def llava_closed_hit(pred: str, ref: str) -> int:
    """Substring rule on once-normalised answers: needs "yes" or "no" somewhere, then the reference."""
    return int(("yes" in pred or "no" in pred) and ref in pred)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def llava_med_scores(pairs: list[tuple[str, str, str]], candidates: list | None = None) -> dict:
    """run_eval.py's figures over (prediction, reference, answer_type) triples, as fractions."""
    closed, open_, f1s, hits = [], [], [], []
    for pred, ref, kind in pairs:
        p, r = normalize_llava_med(pred.lower()), normalize_llava_med(ref.lower())
        if kind == "CLOSED":
            closed.append(llava_closed_hit(p, r))
        elif kind == "OPEN":
            f1s.append(llava_f1(p, r))
            open_.append((p, r))
            if candidates is not None:
                hits.append(llava_open_hit(p, r, candidates))
    out = {
        "closed_accuracy": _mean(closed),
        "open_recall": _mean([x[2] for x in f1s]),
        "exact_match": _mean([llava_exact_match(p, r) for p, r in open_]),
        "f1": _mean([x[0] for x in f1s]),
        "precision": _mean([x[1] for x in f1s]),
        "recall": _mean([x[2] for x in f1s]),
        "bleu1": _mean([bleu1(p.lower().split(), r.lower().split()) for p, r in open_]),
    }
    if candidates is not None:
        out["open_accuracy"] = _mean(hits)
    return out


# --- the corrected variant ----------------------------------------------------------------

def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def answer_words(text: str) -> list[str]:
    """An answer as words: NFKC (full-width forms, ligatures), lower case, every Unicode
    punctuation mark or symbol a word boundary except a decimal point ("3.5"), a thousands
    comma ("1,000") and an apostrophe inside a word ("doesn't"); then numbers, articles and
    contractions as the VQA tools map them."""
    t = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    chars = []
    for i, ch in enumerate(t):
        prev, nxt = t[i - 1] if i else "", t[i + 1] if i + 1 < len(t) else ""
        if ch in ".," and prev.isdigit() and nxt.isdigit():
            chars.append("." if ch == "." else "")
        elif ch == "'" and prev.isalpha() and nxt.isalpha():
            chars.append(ch)
        else:
            chars.append(" " if _is_mark(ch) else ch)
    words = [_NUMBER_WORDS.get(w, w) for w in "".join(chars).split()]
    return [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]


def normalize(text: str) -> str:
    """The corrected variant's normal form of an answer (see `answer_words`)."""
    return " ".join(answer_words(text))


def yes_no(pred: str) -> str | None:
    """"yes" or "no" when exactly one of them is a word of the answer; None for neither or both."""
    words = set(answer_words(pred))
    if ("yes" in words) == ("no" in words):
        return None
    return "yes" if "yes" in words else "no"


def _contains_run(words: list[str], run: list[str]) -> bool:
    n = len(run)
    return n > 0 and any(words[i:i + n] == run for i in range(len(words) - n + 1))


def corrected_closed_hit(pred: str, ref: str) -> int:
    """Yes/no references: the answer says that word and not the other. Other closed references
    ("left", "ct"): the reference's words appear in order, as whole words, in the answer."""
    r = answer_words(ref)
    if r in (["yes"], ["no"]):
        return int(yes_no(pred) == r[0])
    return int(_contains_run(answer_words(pred), r))


def open_recall(pred: str, ref: str) -> float:
    """Share of the reference's words that are words of the prediction."""
    p, r = set(answer_words(pred)), answer_words(ref)
    return sum(1 for w in r if w in p) / len(r) if r else 0.0


def corrected_scores(pairs: list[tuple[str, str, str]]) -> dict:
    closed = [(p, r) for p, r, t in pairs if t == "CLOSED"]
    open_ = [(p, r) for p, r, t in pairs if t == "OPEN"]
    scores = {
        "closed_accuracy": _mean([corrected_closed_hit(p, r) for p, r in closed]),
        "open_recall": _mean([open_recall(p, r) for p, r in open_]),
        "exact_match": _mean([float(open_hit(p, r)) for p, r in open_]),
    }
    # One figure per run, the one `medray demo` checks and the report shows as "overall": the
    # mean of closed accuracy and open exact match (of those the run has), each kind of
    # question weighing the same whatever the mix.
    parts = [v for v in (scores["closed_accuracy"], scores["exact_match"]) if v is not None]
    scores["overall"] = sum(parts) / len(parts) if parts else None
    return scores


def open_hit(pred: str, ref: str) -> bool:
    """An open answer is right when its words are the reference's (the corrected exact match)."""
    return answer_words(pred) == answer_words(ref)


def answer_kind(ref: str) -> str:
    """CLOSED for a yes/no reference, OPEN otherwise: the kind of a row whose record gives none."""
    return "CLOSED" if answer_words(ref) in (["yes"], ["no"]) else "OPEN"


def answer_right(pred: str, ref: str) -> bool:
    """Right as the corrected scores read it: by the closed score for a yes/no reference, by
    open exact match otherwise."""
    return bool(corrected_closed_hit(pred, ref)) if answer_kind(ref) == "CLOSED" else open_hit(pred, ref)


def vqa_metrics(pairs: list[tuple[str, str, str]], candidates: list | None = None) -> dict:
    """Both variants over (prediction, reference, answer_type) triples; answer_type OPEN or CLOSED.

    `candidates`: LLaVA-Med's candidate answers (its candidate file's list), for open accuracy.
    """
    return {
        "counts": {"closed": sum(t == "CLOSED" for *_, t in pairs), "open": sum(t == "OPEN" for *_, t in pairs)},
        "llava_med": llava_med_scores(pairs, candidates),
        "corrected": corrected_scores(pairs),
    }


# --- multiple choice ------------------------------------------------------------------------

# Ways an answer names an option by its letter. Each needs a marker that an article ("A
# fracture"), a name ("Hepatitis B") or an abbreviation ("E. coli") does not have.
_LETTER_MARKS = [
    re.compile(r"^\s*\(?([A-Ea-e])\)?\s*[.:)]?\s*$"),                       # "B", "(b)", "B."
    re.compile(r"\(([A-Ea-e])\)"),                                           # "(b) tibia", "is (B)"
    re.compile(r"(?:^|\s)([A-Ea-e])\)"),                                     # "b) tibia"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*\(?([A-E])\b(?![.'’]\s*[a-z])"),
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*\(?([a-e])\b(?!\s*[a-z])"),
]
_LEADING_LETTER = re.compile(r"^\s*([A-E])\s*([.:])\s*(.*)$", re.S)        # "B. tibia", "B: ..."


def _letters_named(text: str, options: dict[str, str]) -> set[str]:
    found = {m.group(1).upper() for pat in _LETTER_MARKS for m in pat.finditer(text)}
    lead = _LEADING_LETTER.match(text)
    if lead and lead.group(1) in options:
        letter, mark, rest = lead.groups()
        # "B: ...", "B. tibia" and "B. The tibia..." name B; "E. coli" is an abbreviation.
        if mark == ":" or not rest[:1].islower() or _contains_run(answer_words(rest), answer_words(options[letter])):
            found.add(letter)
    return {x for x in found if x in options}


def mcqa_choice(pred: str, options: dict[str, str]) -> str | None:
    """The option a free-text answer picks, or None when it picks none or more than one.

    A letter named with a marker ("B", "(b)", "B.", "answer is B") wins; full-width letters
    count (NFKC). Otherwise the option whose text appears as whole words; when one option's
    text holds another's ("hepatitis b" and "b"), the longer one is meant.
    """
    text = unicodedata.normalize("NFKC", pred).strip()
    letters = _letters_named(text, options)
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None  # "A or B": ambiguous
    words = answer_words(text)
    hits = [k for k, v in options.items() if _contains_run(words, answer_words(v))]
    hits = [k for k in hits if not any(k != o and _contains_run(answer_words(options[o]), answer_words(options[k]))
                                       for o in hits)]
    return hits[0] if len(hits) == 1 else None


def mcqa_accuracy(pairs: list[tuple[str, str, dict[str, str]]]) -> dict:
    """Accuracy over (prediction, correct letter, options); an answer that picks nothing is wrong."""
    picks = [mcqa_choice(p, opts) for p, _, opts in pairs]
    return {"count": len(pairs), "accuracy": _mean([int(c == a) for c, (_, a, _) in zip(picks, pairs)]),
            "no_choice": sum(c is None for c in picks)}
