"""The options of one batch-inference run, their flags, and what a run reports."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from medray.config import StrictModel, add_arguments, values_from_args

from medray.engines.types import DEFAULT_ADAPTER, GenerationFields
from .experts import ExpertsConfig
from medray.engines import EngineName
from medray.engines.vllm_sizing import VLLMOptions
from medray.storage import dicomweb


class InferConfig(StrictModel, GenerationFields):
    """One batch-inference run. The `medray infer` flags are generated from these fields; the
    generation settings (max_new_tokens, temperature, ...: `settings`) are GenerationFields'."""

    model: str
    """Model URI: a directory, s3://bucket/prefix or tiny://family."""
    adapter: str | None = None
    """PEFT adapter directory applied on top of the model (to every row that names none)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """Named PEFT adapters (name -> directory, local or s3://) that rows of a records file
    choose with an `adapter` field: one job mixes them, and rows of different adapters share
    generate calls (PEFT mixed batches on hf, multi-LoRA on vllm). A row naming an adapter
    not listed here fails alone."""
    input: str
    """A prefix of images (listed recursively, by several read tasks at once) or a JSON / JSONL /
    Parquet records file (any form `medray.data.read_records` reads: LLaVA-Med test.json and
    question files, VQA, MCQA...). A manifest of keys (JSONL or Parquet, `image` and `id`
    columns) streams in blocks whatever its size: the answer to a prefix too slow to list."""
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
    engine: EngineName = "hf"
    """Generation engine: hf (transformers' generate, static batches: the default, and it runs
    every model) or vllm (continuous batching: the engine for GPUs). For what vLLM cannot run
    (the visual-experts mode, an adapter with more than LoRA on the LLM), vllm falls back to
    hf and the log says why."""
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    """engine vllm: its sizing (context length, sequences per step, KV-cache budget)."""
    batch_size: int = Field(8, ge=1)
    """Rows per generate call (engine hf; vLLM takes a shard's rows at once)."""
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
    read_tasks: int = Field(2, ge=1)
    """Read tasks (each listing a key range of the input prefix, or reading part of a records
    file) that may run at once. Two list ~50,000 keys a second from S3, far ahead of any model."""
    cpus_per_read_task: float = Field(0.25, gt=0)
    """CPUs each read task reserves: listing waits on the store more than it computes."""
    max_rows_ahead: int = Field(100_000, ge=1)
    """Rows the listing may run ahead of the answers (listed, not yet written): it bounds what
    waits in Ray's object store, whatever the corpus holds. The run's total is known once the
    listing is within this many rows of the end. Never below 4 shards per actor and 20,000,
    which is also the bound until the first shard is written (`rows_ahead_at_start`)."""
    preprocess_tasks: int | None = Field(None, ge=1)
    """Read/decode/preprocess tasks that may run at once. Default: 2 per generation actor
    (max_actors). Uncapped, Ray Data starts one task per free CPU slice as soon as the job
    starts, before the actors are placed; the actors then wait for those CPUs until the
    tasks drain (measured on a 3-node CPU cluster: first shard at 57 s uncapped, 34 s capped)."""
    rows_per_shard: int = Field(256, ge=1)
    """Rows each generation actor writes as one shard: whole batches, rounded up to a multiple
    of batch_size."""
    max_pixels: int = Field(64_000_000, ge=1)
    """Larger images (width x height) fail their row."""
    max_image_bytes: int = Field(512 * 1024 * 1024, ge=1)
    """Larger files fail their row without being read."""
    allowed_image_prefixes: list[str] | None = None
    """When set, an image outside these prefixes fails its row unread. The job API sets its
    allowed input prefixes here: a records file must not name images that the server may
    read and its client may not."""
    sr_output: str | None = None
    """Where each answer of a DICOMweb instance also goes as a DICOM Structured Report: a
    DICOMweb service root (`dicomweb://HOST:PORT/ROOT`, stored with STOW-RS), or a directory or
    s3:// prefix (`<study>/<sop>.dcm`). medray.infer.reports."""
    allowed_dicomweb_servers: list[str] | None = None
    """When set, the DICOMweb service roots (`dicomweb://HOST:PORT/ROOT`) the run may read: an
    input on another server fails at start, an image row naming one fails unread. None: what
    MEDRAY_DICOMWEB_ALLOWED allows where the run's processes run (any server, unset)."""
    experts: ExpertsConfig | None = None
    """Visual-experts mode: `model` is a text LLM; each image is routed to an expert whose
    text goes into the LLM's prompt."""

    @model_validator(mode="after")
    def _check(self):
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        if self.task == "chat" and not self.question:
            raise ValueError("task chat needs --question (the prompt)")
        bad = [n for n in self.adapters if not n or n == DEFAULT_ADAPTER or ":" in n]
        if bad:
            raise ValueError(f"adapter names must be non-empty, without ':', and not {DEFAULT_ADAPTER!r}: {bad}")
        if self.sr_output and dicomweb.is_dicomweb(self.sr_output) and dicomweb.parse(self.sr_output).query:
            raise ValueError("sr_output names a DICOMweb service root (dicomweb://HOST:PORT/ROOT), without a query")
        return self

    def preprocess_concurrency(self) -> int:
        """How many preprocess tasks Ray Data may run at once (see preprocess_tasks)."""
        return self.preprocess_tasks or 2 * self.max_actors

    def rows_ahead(self) -> int:
        """The effective max_rows_ahead: enough rows in flight to fill every actor's next shards
        (Ray Data holds a shard's rows back until it has a whole shard's worth) and what a read
        task holds before it lets a block go (pipeline.BLOCK_BYTES: a few thousand rows)."""
        return max(self.max_rows_ahead, self.rows_ahead_at_start())

    def rows_ahead_at_start(self) -> int:
        """How far the listing may run ahead before the first shard is written: what fills
        the first shards. Listed further, a prefix's pages only compete for the CPUs with the
        run's start (worker processes, model loads), on the nodes that list."""
        return 4 * self.rows_per_shard * self.max_actors + 20_000

    def batches_per_shard(self) -> int:
        """Preprocessed batches (batch_size rows each) that make one shard."""
        return max(1, -(-self.rows_per_shard // self.batch_size))

    def all_adapters(self) -> dict[str, str]:
        """Every adapter of the run by name: the named ones, and `adapter` as DEFAULT_ADAPTER."""
        return {**({DEFAULT_ADAPTER: self.adapter} if self.adapter else {}), **self.adapters}

    def row_adapter(self, name: str | None) -> str | None:
        """The adapter that answers a row naming `name` (None or "": the run's default)."""
        return name or (DEFAULT_ADAPTER if self.adapter else None)


def adapter_role(name: str) -> str:
    """An adapter's role in a run's provenance: `adapter` for the run's --adapter, else `adapter:<name>`."""
    return "adapter" if name == DEFAULT_ADAPTER else f"adapter:{name}"


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """The `medray infer` / jobs/infer.py flags, generated from InferConfig's fields; the
    experts block gets three flags of its own."""
    add_arguments(parser, InferConfig, exclude=("experts", "vllm", "adapters"))
    parser.add_argument("--adapters", type=json.loads, default=None,
                        help='named adapters that records rows choose with an "adapter" field, as JSON: '
                             '\'{"vqa-rad": "s3://bucket/runs/vqa-rad/adapter", "slake": "..."}\'')
    parser.add_argument("--vllm", type=json.loads, default=None,
                        help='engine vllm sizing as JSON, e.g. \'{"max_model_len": 2048, "kv_cache_gib": 8}\'')
    parser.add_argument("--experts", action="store_true",
                        help="visual-experts mode: --model is a text LLM; images are routed to experts")
    parser.add_argument("--radiology-expert", help="with --experts: captioner URI for radiology images")
    parser.add_argument("--plot-expert", help="with --experts: plot-to-table model URI (default: none)")


def infer_config_from_args(args: argparse.Namespace) -> InferConfig:
    """InferConfig from the flags of `add_infer_arguments` (unset flags keep the defaults)."""
    values = values_from_args(InferConfig, args, exclude=("experts", "vllm", "adapters"))
    for name in ("vllm", "adapters"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
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
