"""Typed training/eval records and their readers (JSON, JSONL, Parquet; local or s3://).

Four shapes cover the seeds' datasets. Each record turns into content-part chat messages
(`to_messages`), the one form the collator and the generation engine take:
- ConversationRecord: LLaVA / LLaVA-Med instruction data (`conversations` with human/gpt turns);
- VQARecord: VQA-RAD, SLAKE, PathVQA, in their native fields or LLaVA-Med's test.json form;
- CaptionRecord: figure-caption pairs (PMC-OA, ROCO, LLaVA-Med alignment);
- MCQARecord: MedQA, MedMCQA, PubMedQA multiple choice.

Why one file of this size: the seeds' record shapes and their field aliases are one map;
splitting them by shape would split the alias map.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePosixPath
from typing import Any, Literal, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from medray import storage

IMAGE_TAG = "<image>"
CAPTION_PROMPT = "Describe the image."


def user_message(text: str | None, with_image: bool = False) -> dict:
    """A user turn in content-part form (the one form the engine and the collator take): the
    image placeholder first, as the seeds put it, then the text (none when `text` is None)."""
    parts: list[dict] = [{"type": "image"}] if with_image else []
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, coerce_numbers_to_str=True)

    id: str | None = Field(default=None, validation_alias=AliasChoices("id", "qid", "question_id", "img_id"))
    image: str | None = Field(default=None, validation_alias=AliasChoices(
        "image", "image_name", "img_name", "image_path", "name", "image_uri"))
    adapter: str | None = None
    """Batch inference: which of the run's named adapters answers this row (none: the run's
    default, `adapter`, or the base model)."""

    def images(self) -> list[str]:
        return [self.image] if self.image else []


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    role: Literal["human", "gpt"] = Field(validation_alias=AliasChoices("from", "role"))
    value: str

    @field_validator("role", mode="before")
    @classmethod
    def _norm_role(cls, v: str) -> str:
        return {"user": "human", "assistant": "gpt"}.get(v, v)


class ConversationRecord(_Record):
    """{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}; "<image>" marks the image."""

    kind: Literal["conversation"] = "conversation"
    conversations: list[Turn]

    @model_validator(mode="after")
    def _check(self):
        if not self.conversations or self.conversations[0].role != "human":
            raise ValueError("a conversation must start with a human turn")
        return self

    def query(self) -> tuple[str, str | None]:
        """The first question and the answer that follows it."""
        turns = self.conversations
        answer = turns[1].value if len(turns) > 1 and turns[1].role == "gpt" else None
        return turns[0].value.replace(IMAGE_TAG, "").strip(), answer

    def to_messages(self, with_answer: bool = True) -> list[dict]:
        out = []
        placed = False
        for turn in self.conversations:
            if turn.role == "human":
                # LLaVA moves the image to the front of the turn that mentions it; the
                # first human turn gets it if no turn says "<image>".
                has_tag = IMAGE_TAG in turn.value
                text = turn.value.replace(IMAGE_TAG, "").strip()
                with_image = bool(self.image) and not placed and (has_tag or not any(
                    IMAGE_TAG in t.value for t in self.conversations))
                placed = placed or with_image
                out.append(user_message(text, with_image))
            else:
                out.append(_assistant(turn.value))
        if not with_answer and out and out[-1]["role"] == "assistant":
            out = out[:-1]
        return out


class VQARecord(_Record):
    """One image question with its answer; `answer_type` is OPEN or CLOSED (yes/no)."""

    kind: Literal["vqa"] = "vqa"
    question: str = Field(validation_alias=AliasChoices("question", "text", "query"))
    answer: str | None = Field(default=None, validation_alias=AliasChoices("answer", "gt_answer"))
    answer_type: Literal["OPEN", "CLOSED"] | None = None

    @field_validator("answer_type", mode="before")
    @classmethod
    def _norm_type(cls, v):
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _from_conversation(cls, data: Any):
        # LLaVA-Med's downstream test.json: a two-turn conversation plus answer_type.
        if isinstance(data, dict) and "conversations" in data and "question" not in data:
            turns = data["conversations"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                               for t in turns)):
                raise ValueError("conversations must be a list of {from, value} turns, the question first")
            data = {**data, "question": turns[0]["value"].replace(IMAGE_TAG, "").strip()}
            if len(turns) > 1:
                data["answer"] = turns[1]["value"]
        return data

    def query(self) -> tuple[str, str | None]:
        return self.question, self.answer

    def to_messages(self, with_answer: bool = True) -> list[dict]:
        out = [user_message(self.question, bool(self.image))]
        if with_answer and self.answer is not None:
            out.append(_assistant(self.answer))
        return out


class CaptionRecord(_Record):
    """A figure and its caption; trains as "describe the image" -> caption."""

    kind: Literal["caption"] = "caption"
    caption: str = Field(validation_alias=AliasChoices("caption", "fig_caption", "text_caption"))
    prompt: str = CAPTION_PROMPT

    def query(self) -> tuple[str, str | None]:
        return self.prompt, self.caption

    def to_messages(self, with_answer: bool = True) -> list[dict]:
        out = [user_message(self.prompt, bool(self.image))]
        return out + [_assistant(self.caption)] if with_answer else out


class ImageRecord(_Record):
    """An image alone: a manifest row to caption, or to ask a question given elsewhere."""

    kind: Literal["image"] = "image"

    def query(self) -> tuple[str, str | None]:
        return "", None

    def to_messages(self, with_answer: bool = True) -> list[dict]:
        return [user_message(CAPTION_PROMPT, bool(self.image))]


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
# MedMCQA's `cop` is 1-based in the authors' own release (train/dev/test.json, one object per
# line) and 0-based on the Hugging Face hub (openlifescienceai/medmcqa: the loading script
# subtracts 1, and lm-evaluation-harness indexes with it as it is). `read_records` tells them
# apart per file (see `_medmcqa_cop_base`); a single row assumes the hub's.
MEDMCQA_HF_COP_BASE = 0


def _pubmedqa_answer(row: dict) -> dict:
    decision = str(row.get("final_decision", "")).strip().lower()
    letter = {v: k for k, v in PUBMEDQA_OPTIONS.items()}.get(decision, decision)
    return {"options": dict(PUBMEDQA_OPTIONS), "answer": letter}


class MCQARecord(_Record):
    """A multiple-choice question: options A..E and the letter of the right one."""

    kind: Literal["mcqa"] = "mcqa"
    question: str
    options: dict[str, str]
    answer: str
    """The letter of the correct option."""
    context: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any, info: ValidationInfo):
        if not isinstance(data, dict):
            return data
        d = dict(data)
        if "QUESTION" in d:  # PubMedQA's own release: yes / no / maybe over the abstract's contexts
            d = {"id": d.get("id") or d.get("pmid"), "question": d["QUESTION"],
                 "context": "\n".join(d.get("CONTEXTS", [])), **_pubmedqa_answer(d)}
        elif "final_decision" in d:  # PubMedQA on the Hugging Face hub: pubid, question, context.contexts
            ctx = d.get("context")
            d = {"id": d.get("id") or d.get("pubid"), "question": d.get("question"),
                 "context": "\n".join(ctx.get("contexts", [])) if isinstance(ctx, dict) else ctx,
                 **_pubmedqa_answer(d)}
        elif "opa" in d:  # MedMCQA: opa..opd and the index of the right one in cop
            d["options"] = {k: d[f"op{k.lower()}"] for k in "ABCD"}
            base = (info.context or {}).get("cop_base", MEDMCQA_HF_COP_BASE)
            cop = int(d["cop"])
            if not 0 <= cop - base < 4:
                raise ValueError(f"cop {cop} is not an option index ({base}-based); the hub's test split "
                                 "has no answers (cop -1)")
            d["answer"] = "ABCD"[cop - base]
        elif "answer_idx" in d:  # MedQA (US): options dict + answer_idx letter
            d["answer"] = d["answer_idx"]
        if isinstance(d.get("options"), list):
            d["options"] = {chr(ord("A") + i): o for i, o in enumerate(d["options"])}
        return d

    @model_validator(mode="after")
    def _check(self):
        if self.answer not in self.options:
            raise ValueError(f"answer {self.answer!r} is not one of the options {sorted(self.options)}")
        return self

    def prompt(self) -> str:
        lines = [f"Context: {self.context}"] if self.context else []
        lines.append(f"Question: {self.question}")
        lines += [f"{k}. {v}" for k, v in sorted(self.options.items())]
        lines.append("Answer with the letter of the correct option.")
        return "\n".join(lines)

    def query(self) -> tuple[str, str | None]:
        return self.prompt(), self.answer

    def to_messages(self, with_answer: bool = True) -> list[dict]:
        out = [user_message(self.prompt(), False)]
        if with_answer:
            out.append(_assistant(f"{self.answer}. {self.options[self.answer]}"))
        return out


Record = Union[ConversationRecord, VQARecord, CaptionRecord, MCQARecord, ImageRecord]
RecordKind = Literal["conversation", "vqa", "caption", "mcqa", "image"]
_CLASSES: dict[str, type[_Record]] = {
    "conversation": ConversationRecord, "vqa": VQARecord, "caption": CaptionRecord, "mcqa": MCQARecord,
    "image": ImageRecord,
}
_ID_KEYS = _Record.model_fields["id"].validation_alias.choices
_IMAGE_KEYS = _Record.model_fields["image"].validation_alias.choices
# Keys the seeds' forms are read from before validation (MCQARecord._normalise).
_NORMALISED_KEYS = {"QUESTION", "CONTEXTS", "final_decision", "pmid", "pubid", "opa", "opb", "opc", "opd", "cop",
                    "answer_idx"}


def record_keys() -> frozenset[str]:
    """Every key a record of any kind reads: the columns a Parquet records file is read with
    (a manifest's other columns, embedded images or report text, stay on disk)."""
    keys = set(_NORMALISED_KEYS)
    for cls in _CLASSES.values():
        for name, info in cls.model_fields.items():
            keys.add(name)
            alias = info.validation_alias
            keys.update(getattr(alias, "choices", [alias] if isinstance(alias, str) else []))
    return frozenset(k for k in keys if isinstance(k, str))


class RecordError(ValueError):
    """A records file, or a row in it, does not fit the expected shape (names file and row).

    `row` is the row's position and `id` its id (its own, or the position) when one row is at fault.
    """

    def __init__(self, message: str, *, row: int | None = None, id: str | None = None):
        super().__init__(message)
        self.row, self.id = row, id


def detect_kind(row: dict) -> RecordKind:
    keys = set(row)
    if "conversations" in keys:
        return "vqa" if "answer_type" in keys else "conversation"
    if keys & {"options", "opa", "QUESTION", "answer_idx", "final_decision"}:
        return "mcqa"
    if keys & {"caption", "fig_caption"}:
        return "caption"
    if keys & {"question", "text", "query"}:
        return "vqa"
    if keys & set(_IMAGE_KEYS):
        return "image"
    raise RecordError(f"cannot tell the record kind from keys {sorted(keys)}; pass kind=")


def read_rows(uri: str) -> list[dict]:
    """Raw rows of a .json (list, or dict keyed by id), .jsonl or .parquet file."""
    data = storage.read_bytes(uri)
    suffix = PurePosixPath(uri.split("?")[0]).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if suffix != ".jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # MedMCQA's own release names JSON-lines files train.json / dev.json / test.json.
            first = text.lstrip()[:1]
            if first != "{" or e.msg != "Extra data":
                raise RecordError(f"{uri}: not JSON ({e.msg} at line {e.lineno})") from e
        else:
            if isinstance(obj, dict):  # e.g. PubMedQA's {pmid: {...}}
                return [{"id": k, **v} for k, v in obj.items()]
            return obj
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{uri} line {n}: not JSON ({e.msg})") from e
    return rows


def _medmcqa_cop_base(rows: list[dict], uri: str) -> int:
    return medmcqa_cop_base((r.get("cop") for r in rows if isinstance(r, dict)), uri)


def medmcqa_cop_base(cop_values, uri: str) -> int:
    """0 or 1: which base a MedMCQA file's `cop` uses, read off its values (a 0 only occurs
    0-based, a 4 only 1-based); the hub's 0 when the file does not say."""
    cops = {str(c) for c in cop_values}
    if "0" in cops and "4" in cops:
        raise RecordError(f"{uri}: MedMCQA rows with both cop 0 and cop 4: the file mixes 0- and 1-based releases")
    return 1 if "4" in cops else 0


def read_records(uri: str, kind: RecordKind | Literal["auto"] = "auto",
                 image_root: str | None = None, errors: list[RecordError] | None = None) -> list[Record]:
    """Parse a records file into typed records.

    Relative image paths are resolved against `image_root` (default: the file's folder),
    so a dataset keeps working when its folder is copied to S3, as LLaVA-Med's
    `--image-folder` does. A row that is not a record raises RecordError, or, when an
    `errors` list is given, is appended to it and left out.
    """
    rows = read_rows(uri)
    if not rows:
        return []
    parser = RecordParser(uri, rows[0], kind=kind, image_root=image_root,
                          cop_base=_medmcqa_cop_base(rows, uri) if "cop" in rows[0] else None)
    out = []
    for n, row in enumerate(rows):
        try:
            out.append(parser.parse(row, n))
        except RecordError as err:
            if errors is None:
                raise
            errors.append(err)
    return out


class RecordParser:
    """Turns raw rows of one records file into typed records, one row at a time: what
    `read_records` does to a whole file, for readers that stream a file in blocks.

    The kind is read off the file's first row (or given); `cop_base` is MedMCQA's, read off
    the file's `cop` values (`medmcqa_cop_base`) by whoever can see them all."""

    def __init__(self, uri: str, first_row: dict, *, kind: RecordKind | Literal["auto"] = "auto",
                 image_root: str | None = None, cop_base: int | None = None):
        kind = detect_kind(first_row) if kind == "auto" else kind
        if kind not in _CLASSES:
            raise RecordError(f"unknown record kind {kind!r}; choose one of {sorted(_CLASSES)}")
        self.uri, self.kind, self.cls = uri, kind, _CLASSES[kind]
        self.context = {"cop_base": MEDMCQA_HF_COP_BASE if cop_base is None else cop_base} if kind == "mcqa" else None
        self.root = image_root if image_root is not None else _parent(uri)

    def parse(self, row: dict, n: int) -> Record:
        """Row `n` (its position in the file: the id of a row that has none) as a record;
        RecordError, naming the file, the row and its id, when it is not one."""
        try:
            rec = self.cls.model_validate(row, context=self.context)
        except (ValidationError, KeyError, TypeError, ValueError) as e:
            why = _describe(e) if isinstance(e, ValidationError) else repr(e)
            raw_id = next((row[k] for k in _ID_KEYS if isinstance(row, dict) and row.get(k) is not None), n)
            raise RecordError(f"{self.uri} row {n}: not a {self.kind} record: {why}", row=n, id=str(raw_id)) from e
        if rec.id is None:
            rec.id = f"{n}"
        if rec.image and self.root and not _is_absolute(rec.image):
            rec.image = storage.join(self.root, rec.image)
        return rec


def _describe(e: ValidationError) -> str:
    # One line per problem, "field: what is wrong", instead of pydantic's multi-line report.
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'row'}: {err['msg']}"
                     for err in e.errors())


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _is_absolute(path: str) -> bool:
    return path.startswith(("/", "s3://", "file://"))
