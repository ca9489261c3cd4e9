"""Offline batch inference over image corpora on Ray Data.

    listing (driver) -> read + decode + preprocess (CPU tasks) -> generate + write shard
                     (actor pool) -> progress and summary (driver)

Exactly once and resumable: every input row has a stable id. Shards are written
atomically under names derived from the ids they hold, so a retried write replaces its
own shard instead of adding a copy. A rerun first reads the ids already in the output
prefix and sends only the missing rows down the pipeline. A row whose image cannot be read
is written with its error; it never fails the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
from pydantic import Field, model_validator

from medray import storage
from medray.config import StrictModel, add_arguments, values_from_args
from medray.data import shards
from medray.data.records import CAPTION_PROMPT

from .engine import MAX_NEW_TOKENS, MAX_TEMPERATURE, GenerationSettings
from .experts import ExpertsConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


class InferConfig(StrictModel):
    """One batch-inference run. The `medray infer` flags are generated from these fields."""

    model: str
    """Model URI: a directory, s3://bucket/prefix or tiny://family."""
    adapter: str | None = None
    """PEFT adapter directory applied on top of the model."""
    input: str
    """A prefix of images (listed recursively) or a JSON / JSONL / Parquet records file (any
    form `medray.data.read_records` reads: LLaVA-Med test.json and question files, VQA, MCQA...)."""
    image_folder: str | None = None
    """Folder that relative image paths in a records file resolve against (LLaVA-Med's
    --image-folder); default: the records file's folder."""
    output: str
    """Prefix that receives the result shards."""
    task: Literal["caption", "vqa", "chat"] = "caption"
    """caption the image; answer a question about it (vqa); or a free prompt (chat)."""
    question: str | None = None
    """vqa: the question for every image (rows may carry their own); chat: the prompt."""
    format: Literal["parquet", "jsonl"] = "parquet"
    """File format of the result shards."""
    include: str | None = None
    """Glob (relative to the input prefix) that images must match."""
    exclude: str | None = None
    """Glob of images to leave out."""
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    """Upper bound on generated tokens per answer."""
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE)
    """0 = greedy, deterministic."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass, used only when sampling."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end an answer (repeatable)."""
    seed: int | None = None
    """Seed for sampling."""
    batch_size: int = Field(8, ge=1)
    """Rows per generate call."""
    min_actors: int = Field(1, ge=1)
    """Generation actors to start with (one model each)."""
    max_actors: int = Field(1, ge=1)
    """Generation actors the pool may grow to."""
    gpus_per_actor: float = Field(0, ge=0)
    """GPUs each generation actor reserves."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """Fractional by default: on a 2-CPU machine whole-CPU actors starve the read tasks."""
    cpus_per_task: float = Field(0.5, gt=0)
    """CPUs each read/decode/preprocess task reserves."""
    rows_per_shard: int = Field(256, ge=1)
    """Rows each generation actor writes as one shard."""
    max_pixels: int = Field(64_000_000, ge=1)
    """Larger images (width x height) fail their row."""
    max_image_bytes: int = Field(512 * 1024 * 1024, ge=1)
    """Larger files fail their row without being read."""
    experts: ExpertsConfig | None = None
    """Visual-experts mode: `model` is a text LLM; each image is routed to an expert whose
    text goes into the LLM's prompt."""

    @model_validator(mode="after")
    def _check(self):
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        if self.task == "chat" and not self.question:
            raise ValueError("task chat needs --question (the prompt)")
        return self

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, stop=tuple(self.stop), seed=self.seed)


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """The `medray infer` / jobs/infer.py flags, generated from InferConfig's fields; the
    experts block gets three flags of its own."""
    add_arguments(parser, InferConfig, exclude=("experts",))
    parser.add_argument("--experts", action="store_true",
                        help="visual-experts mode: --model is a text LLM; images are routed to experts")
    parser.add_argument("--radiology-expert", help="with --experts: captioner URI for radiology images")
    parser.add_argument("--plot-expert", help="with --experts: plot-to-table model URI (default: none)")


def infer_config_from_args(args: argparse.Namespace) -> InferConfig:
    """InferConfig from the flags of `add_infer_arguments` (unset flags keep the defaults)."""
    values = values_from_args(InferConfig, args, exclude=("experts",))
    if args.experts:
        values["experts"] = {"plot": args.plot_expert,
                             **({"radiology": args.radiology_expert} if args.radiology_expert else {})}
    return InferConfig.model_validate(values)


@dataclass
class Summary:
    rows: int
    """Rows written by this run."""
    errors: int
    skipped: int
    """Rows already in the output from an earlier run."""
    seconds: float
    generated_tokens: int
    output: str
    first_rows_s: float = 0.0
    """Seconds until the first shard was written: start-up (listing, model loads)."""
    first_rows: int = 0
    first_errors: list[str] = field(default_factory=list)
    """"id: error" of the first few rows that failed."""

    @property
    def steady_rows_per_s(self) -> float:
        """Throughput after the first shard, i.e. without start-up."""
        dt = self.seconds - self.first_rows_s
        return (self.rows - self.first_rows) / dt if dt > 0 and self.rows > self.first_rows else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.rows} rows ({self.errors} errors, {self.skipped} already done) in {self.seconds:.1f} s: "
                f"{self.rows_per_s:.2f} rows/s, {self.tokens_per_s:.1f} generated tokens/s -> {self.output}")


class AllRowsFailed(RuntimeError):
    """Every row this run processed failed: the run wrote its errors, and produced nothing else."""

    def __init__(self, summary: Summary):
        self.summary = summary
        super().__init__(f"all {summary.rows} rows failed; first errors: " + "; ".join(summary.first_errors))


# ------------------------------------------------------------------------------ listing
def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".jsonl", ".json", ".parquet"))


def list_rows(cfg: InferConfig) -> list[dict]:
    """Input rows with stable ids: {id, image, question, references, error}.

    A records file is read by `medray.data.read_records`, the reader training and eval use, so
    every form one understands the others do too. A row it cannot read becomes a row with
    its error, under its own id (or its position): it fails alone, and shows in the output.
    """
    if _is_manifest(cfg.input):
        from medray.data import RecordError, read_records

        bad: list[RecordError] = []
        rows = []
        for rec in read_records(cfg.input, image_root=cfg.image_folder, errors=bad):
            question, answer = rec.query()
            rows.append({"id": str(rec.id), "image": rec.image or "", "question": question or "",
                         "references": json.dumps(answer) if answer is not None else "", "error": ""})
        rows += [{"id": e.id, "image": "", "question": "", "references": "", "error": f"RecordError: {e}"}
                 for e in bad]
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{cfg.input}: row ids are not unique (e.g. {dup!r}); give each row an id")
        return rows
    files = storage.list_files(cfg.input, include=cfg.include, exclude=cfg.exclude)
    base = cfg.input.rstrip("/") + "/"
    return [{"id": f.uri[len(base):] if f.uri.startswith(base) else f.uri, "image": f.uri, "question": "",
             "references": "", "error": ""}
            for f in files if f.uri.lower().endswith(IMAGE_SUFFIXES)]


# ------------------------------------------------------------------------------ stages
_PROCESSORS: dict = {}
# Rows without an image carry an empty 4-D array, so the column stays a tensor column.
_NO_PIXELS = np.zeros((0, 0, 0, 0), dtype=np.float32)


def _processor(model_uri: str):
    # One processor per worker process, loaded on first use.
    if model_uri not in _PROCESSORS:
        from medray.models import family_of, load_processor, resolve_model_uri
        from medray.models.loading import adapter_base, read_config

        path = resolve_model_uri(model_uri)
        base = adapter_base(path)
        config_dir = resolve_model_uri(base) if base else path
        family = family_of(read_config(config_dir))
        _PROCESSORS[model_uri] = (load_processor(config_dir, family), family)
    return _PROCESSORS[model_uri]


def messages_for(task: str, family_kind: str, question: str, with_image: bool) -> list[dict]:
    if family_kind == "captioner":  # GIT: the prompt, if any, prefixes the caption
        text = "" if task == "caption" else question
    else:
        text = question or CAPTION_PROMPT if task == "caption" else question
    content = ([{"type": "image"}] if with_image and family_kind == "vlm" else []) + \
        ([{"type": "text", "text": text}] if text or family_kind != "captioner" else [])
    return [{"role": "user", "content": content}]


class _ListedError(Exception):
    """An error the listing already put on the row (a records row that could not be read)."""


def preprocess(batch: dict, *, cfg: dict) -> dict:
    """CPU stage: read bytes, decode, render the prompt, run the processor. Errors stay per row."""
    from medray.data import ImageOptions, load_image

    from .engine import Request, encode_request
    from .experts import route

    conf = InferConfig.model_validate(cfg)
    n = len(batch["id"])
    input_ids, pixels, errors, questions, kinds = [], [], [], [], []
    for i in range(n):
        uri, question = str(batch["image"][i]), str(batch["question"][i]) or (conf.question or "")
        if conf.task == "caption":
            question = question or (conf.question or "")
        questions.append(question)
        try:
            if batch["error"][i]:
                raise _ListedError(str(batch["error"][i]))
            if conf.task == "vqa" and not question:
                raise ValueError("no question: give --question or a question per row")
            images = []
            if uri:
                size = storage.default_storage().size(uri)
                if size > conf.max_image_bytes:
                    raise ValueError(f"{uri} is {size} bytes, over the limit of {conf.max_image_bytes}")
                images = [load_image(storage.read_bytes(uri), uri, ImageOptions(max_pixels=conf.max_pixels))]
            kind = ""
            if conf.experts is not None:
                # The generation stage prompts the LLM; here only the expert's input is prepared.
                if not images:
                    raise ValueError("row has no image")
                kind = route(images[0], conf.experts)
                expert = conf.experts.expert_for(kind)
                enc = None
                if expert:
                    processor, family = _processor(expert)
                    enc = encode_request(processor, Request(messages_for("caption", family.kind, "", True), images))
            else:
                processor, family = _processor(conf.model)
                if not images and family.kind != "text":
                    raise ValueError("row has no image")
                enc = encode_request(processor, Request(messages_for(conf.task, family.kind, question, bool(images)),
                                                        images))
            input_ids.append(np.asarray(enc.input_ids if enc else [], dtype=np.int64))
            pixels.append(enc.pixel_values if enc else None)
            errors.append("")
            kinds.append(kind)
        except Exception as e:  # recorded on the row; the job goes on
            input_ids.append(np.zeros(0, dtype=np.int64))
            pixels.append(None)
            errors.append(str(e) if isinstance(e, _ListedError) else f"{type(e).__name__}: {e}")
            kinds.append("")
        if pixels[-1] is None:
            pixels[-1] = _NO_PIXELS
    out = {k: batch[k] for k in ("id", "image", "references")}
    out["question"] = np.array(questions, dtype=object)
    out["input_ids"] = np.array(input_ids + [None], dtype=object)[:-1]  # keep a 1-D object array
    out["pixel_values"] = np.array(pixels + [None], dtype=object)[:-1]
    out["error"] = np.array(errors, dtype=object)
    out["image_type"] = np.array(kinds, dtype=object)
    return out


class Generator:
    """Actor stage: one model per actor; generates over the preprocessed rows, then writes them
    as one shard.

    Writing from the actor instead of a separate task stage is deliberate: on small machines
    the extra stage of short tasks stalled the stream (measured 4-7x fewer rows/s, see
    bench/infer.py). A retried call sees the same rows, so it rewrites the same shard name.
    """

    def __init__(self, cfg: dict):
        from medray.models import load_model

        from .engine import GenerationEngine

        self.cfg = InferConfig.model_validate(cfg)
        self.engine = GenerationEngine(load_model(self.cfg.model, adapter=self.cfg.adapter))
        self.experts = {}
        if self.cfg.experts is not None:
            for kind in ("radiology", "plot"):
                uri = self.cfg.experts.expert_for(kind)
                if uri:
                    self.experts[kind] = GenerationEngine(load_model(uri))
        self.generation = json.dumps({"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                                      "top_p": self.cfg.top_p, "stop": self.cfg.stop, "seed": self.cfg.seed})

    def _encoded(self, batch: dict, i: int):
        from .engine import Encoded

        pixels = batch["pixel_values"][i]
        return Encoded(batch["input_ids"][i].tolist(), np.array(pixels) if pixels.size else None)

    def _expert_texts(self, batch: dict, ok: list[int]) -> list[str]:
        from .engine import GenerationSettings

        texts = [""] * len(batch["id"])
        settings = GenerationSettings(max_new_tokens=self.cfg.experts.max_expert_tokens)
        for kind, engine in self.experts.items():
            rows = [i for i in ok if batch["image_type"][i] == kind]
            for start in range(0, len(rows), self.cfg.batch_size):
                chunk = rows[start: start + self.cfg.batch_size]
                for i, r in zip(chunk, engine.generate_encoded([self._encoded(batch, i) for i in chunk], settings)):
                    texts[i] = r.text
        return texts

    def __call__(self, batch: dict) -> dict:
        return _write_batch(self.generate(batch), output=self.cfg.output, fmt=self.cfg.format)

    def generate(self, batch: dict) -> dict:
        from .engine import Request
        from .experts import llm_prompt

        n = len(batch["id"])
        answers = [""] * n
        completion = np.zeros(n, dtype=np.int64)
        latency = np.zeros(n, dtype=np.float64)
        ok = [i for i in range(n) if not batch["error"][i]]
        expert_texts = self._expert_texts(batch, ok) if self.cfg.experts is not None else [""] * n
        for start in range(0, len(ok), self.cfg.batch_size):
            chunk = ok[start: start + self.cfg.batch_size]
            t0 = time.perf_counter()
            if self.cfg.experts is not None:
                prompts = [llm_prompt(str(batch["question"][i]) or "Describe the findings.", expert_texts[i],
                                      str(batch["image_type"][i])) for i in chunk]
                encoded = [self.engine.encode(Request([{"role": "user", "content": [{"type": "text", "text": p}]}]))
                           for p in prompts]
            else:
                encoded = [self._encoded(batch, i) for i in chunk]
            results = self.engine.generate_encoded(encoded, self.cfg.settings)
            dt = time.perf_counter() - t0
            for i, r in zip(chunk, results):
                answers[i], completion[i], latency[i] = r.text, r.completion_tokens, dt
        return {
            "id": batch["id"], "image": batch["image"], "question": batch["question"],
            "answer": np.array(answers, dtype=object), "references": batch["references"],
            "model": np.array([self.cfg.model] * n, dtype=object),
            "generation": np.array([self.generation] * n, dtype=object),
            "latency_s": latency, "completion_tokens": completion, "error": batch["error"],
            "image_type": batch["image_type"], "expert_text": np.array(expert_texts, dtype=object),
        }


def _write_batch(batch: dict, *, output: str, fmt: str) -> dict:
    """Write a generated batch as one shard (medray.data.shards); returns what the driver counts."""
    shards.write_shard({c: [x.item() if hasattr(x, "item") else x for x in batch[c]] for c in shards.COLUMNS},
                       output=output, fmt=fmt)
    return {"id": batch["id"], "error": batch["error"], "completion_tokens": batch["completion_tokens"]}


# ------------------------------------------------------------------------------ driver
def run_inference(cfg: InferConfig, *, progress: bool = True,
                  on_progress: Callable[[int, int, int], None] | None = None) -> Summary:
    """Run the pipeline to completion. `on_progress(rows_done, rows_total, errors)` is called
    once the input is listed and after every shard; raising from it stops the run (a
    cancellation), and a later run resumes where this one stopped.

    Raises AllRowsFailed (after writing every row with its error) when no row this run
    processed succeeded: such a run is a failure, whatever caused it.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    t0 = time.perf_counter()
    rows = list_rows(cfg)
    done = shards.written_ids(cfg.output)
    todo = [r for r in rows if r["id"] not in done]
    log.info("%d input rows, %d already written, %d to do", len(rows), len(rows) - len(todo), len(todo))
    if on_progress:
        on_progress(len(rows) - len(todo), len(rows), 0)
    if not todo:
        return Summary(0, 0, len(rows) - len(todo), time.perf_counter() - t0, 0, cfg.output)

    conf = cfg.model_dump(mode="json")
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // cfg.batch_size, 200)))
    ds = ds.map_batches(preprocess, fn_kwargs={"cfg": conf}, batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_task,
                        batch_format="numpy")
    ds = ds.map_batches(
        Generator, fn_constructor_kwargs={"cfg": conf}, batch_size=cfg.rows_per_shard, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.gpus_per_actor or None, num_cpus=cfg.cpus_per_actor,
        # A dead actor is replaced and the rows it held are sent again.
        max_restarts=-1, max_task_retries=-1)

    written = errors = tokens = 0
    first_s, first_rows = 0.0, 0
    first_errors: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="medray infer", unit="row")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["id"])
        if not written:
            first_s, first_rows = time.perf_counter() - t0, n
        written += n
        errors += int(sum(1 for e in batch["error"] if e))
        first_errors += [f"{i}: {e}" for i, e in zip(batch["id"], batch["error"]) if e][:5 - len(first_errors)]
        tokens += int(np.sum(batch["completion_tokens"]))
        if bar:
            bar.update(n)
        if on_progress:
            on_progress(len(rows) - len(todo) + written, len(rows), errors)
    if bar:
        bar.close()
    summary = Summary(written, errors, len(rows) - len(todo), time.perf_counter() - t0, tokens, cfg.output,
                      first_s, first_rows, first_errors)
    if written and errors == written:
        raise AllRowsFailed(summary)
    return summary
