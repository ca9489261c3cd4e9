"""The curriculum manifest: typed, validated, one YAML file per model x method.

A manifest is a `Curriculum` loaded by `load_manifest(path, overrides)`; unknown keys are
errors that name the key. `--set key=value` overrides use dotted paths, where a stage is
addressed by name or index: `output=/tmp/run`, `stages.align.max_steps=5`, `stages.0.lr=1e-3`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from medray.config import StrictModel

Part = Literal["vision", "projector", "llm"]


class TrainArgs(StrictModel):
    """What `medray train` and jobs/train.py take."""

    manifest: str
    """Manifest YAML (local or s3://)."""
    set: list[str] = Field(default_factory=list)
    """Override a manifest value, e.g. output=/tmp/run or stages.align.max_steps=5 (repeatable)."""


class SyntheticData(StrictModel):
    """A labelled corpus generated at run time (see medray.data.synthetic)."""

    kind: Literal["chest-vqa", "chest-captions", "chest-conversations", "text-qa", "mcqa"]
    """Which generator: chest images with VQA / captions / 2-turn chats, or text-only QA."""
    n: int = Field(64, ge=1, le=100_000)
    """Number of records."""
    seed: int = 0
    """Generator seed; records and images are a function of it."""
    image_size: int = Field(64, ge=16, le=1024)
    """Side of the synthetic images in pixels."""
    dicom_fraction: float = Field(0.25, ge=0, le=1)
    """Share of images written as DICOM instead of PNG."""


class DataConfig(StrictModel):
    """Where a stage's records come from: a records file, or a synthetic corpus."""

    records: str | None = None
    """Records file (JSON / JSONL / Parquet), local or s3://."""
    kind: Literal["auto", "conversation", "vqa", "caption", "mcqa"] = "auto"
    """Record shape; auto-detected from the first row by default."""
    image_root: str | None = None
    """Prefix for relative image paths; default: the records file's folder."""
    synthetic: SyntheticData | None = None
    """Generate the data instead of reading it (tiny manifests, demos, tests)."""
    shuffle: bool = True
    """Shuffle each epoch (seeded: a resumed run sees the same order)."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.records is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data.records or data.synthetic")
        return self


class LoraSpec(StrictModel):
    """LoRA adapters (PEFT). `target_parameters` reaches fused MoE experts."""

    r: int = Field(8, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(16, ge=1)
    """Scaling numerator (usually 2 x r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names, or one regex over full module paths (use a regex to keep LoRA out of
    the CLIP tower, which also has q_proj/v_proj)."""
    target_parameters: list[str] = Field(default_factory=list)
    """Parameter names for LoRA on nn.Parameters, e.g. Mixtral's fused experts
    `experts.gate_up_proj`, `experts.down_proj`."""
    merge: bool = True
    """Also write base + adapter merged into a plain HF model at the stage directory."""


class StageConfig(StrictModel):
    """One stage of a curriculum."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Stage name; its result goes to <output>/<name>/."""
    model: str | None = None
    """Start from this model URI instead of the previous stage's result (or base_model)."""
    data: DataConfig
    train: list[Part] = Field(default_factory=list)
    """Parts trained in full: vision, projector, llm (text models: llm)."""
    lora: LoraSpec | None = None
    """LoRA adapters, trained besides the parts in `train`."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Load the frozen base in 4-bit nf4 or 8-bit (QLoRA); needs `lora`."""
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"
    """Data-parallel strategy across workers."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states in CPU memory (uses DeepSpeedCPUAdam)."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision; master weights stay fp32. bf16 needs a GPU."""
    micro_batch_size: int = Field(1, ge=1)
    """Examples per worker per forward pass."""
    grad_accum: int | None = Field(None, ge=1)
    """Micro-batches per optimizer step; derived from global_batch_size if that is given."""
    global_batch_size: int | None = Field(None, ge=1)
    """Examples per optimizer step over all workers (= micro_batch_size x grad_accum x workers)."""
    lr: float = Field(2e-5, gt=0, le=1)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup (to 0 for cosine and linear)."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Warmup as a share of all optimizer steps."""
    epochs: float = Field(1, gt=0)
    """Passes over the data; max_steps wins if set."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    max_length: int = Field(2048, ge=16)
    """Token budget per example; truncation never cuts image tokens."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping (None: off)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int = Field(50, ge=1)
    """Save a resumable checkpoint every this many optimizer steps."""
    log_every: int = Field(10, ge=1)
    """Log metrics every this many optimizer steps."""
    workers: int = Field(1, ge=1)
    """Ray Train workers (one process each)."""
    gpus_per_worker: float = Field(0, ge=0)
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs reserved per worker."""
    max_failures: int = Field(2, ge=-1)
    """Worker-group restarts after failures (-1: unlimited); each resumes from the last checkpoint."""
    seed: int | None = None
    """Seed for this stage; default: the curriculum's."""

    @model_validator(mode="after")
    def _check(self):
        if not self.train and self.lora is None:
            raise ValueError(f"stage {self.name!r} trains nothing: set `train` and/or `lora`")
        if self.quantization != "none" and self.lora is None:
            raise ValueError(f"stage {self.name!r}: quantized weights cannot train; add `lora` (QLoRA)")
        if self.quantization != "none" and self.strategy != "ddp":
            raise ValueError(f"stage {self.name!r}: bitsandbytes quantization works with strategy ddp only")
        if self.quantization != "none" and self.train:
            raise ValueError(f"stage {self.name!r}: with quantization only LoRA trains; "
                             f"remove {self.train} from `train`")
        if self.offload_params and self.strategy != "deepspeed_zero3":
            raise ValueError("offload_params needs strategy deepspeed_zero3")
        if self.offload_optimizer and not self.strategy.startswith("deepspeed"):
            raise ValueError("offload_optimizer needs a deepspeed strategy")
        if self.global_batch_size is not None:
            per_step = self.micro_batch_size * self.workers
            if self.global_batch_size % per_step:
                raise ValueError(f"stage {self.name!r}: global_batch_size {self.global_batch_size} is not a "
                                 f"multiple of micro_batch_size x workers = {per_step}")
            derived = self.global_batch_size // per_step
            if self.grad_accum is not None and self.grad_accum != derived:
                raise ValueError(f"stage {self.name!r}: grad_accum {self.grad_accum} contradicts "
                                 f"global_batch_size (which implies {derived})")
        return self

    @property
    def accum(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size // (self.micro_batch_size * self.workers)
        return self.grad_accum or 1

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch_size * self.accum * self.workers


class Curriculum(StrictModel):
    """A base model, an output location and the ordered stages that adapt it."""

    base_model: str
    """Model URI: a directory, s3://bucket/prefix, or tiny://family."""
    output: str
    """Directory or s3:// prefix; stage results go to <output>/<stage>/."""
    seed: int = 0
    """Default seed for every stage."""
    stages: list[StageConfig] = Field(min_length=1)
    _source: dict | None = PrivateAttr(None)
    """Set by load_manifest: the manifest's URI, its digest and the --set overrides (provenance)."""

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        for prev, stage in zip(self.stages, self.stages[1:]):
            if stage.model is None and prev.lora is not None and not prev.lora.merge:
                raise ValueError(f"stage {stage.name!r} starts from {prev.name!r}, a LoRA stage with "
                                 "merge: false; set merge: true there or give this stage a `model`")
        return self

    def stage_seed(self, stage: StageConfig) -> int:
        return self.seed if stage.seed is None else stage.seed

    def fingerprint(self, index: int) -> str:
        """Hash of everything that determines stage `index`'s result (itself and its inputs)."""
        payload = {"base": self.base_model, "seed": self.seed,
                   "stages": [s.model_dump(mode="json") for s in self.stages[: index + 1]]}
        for s in payload["stages"]:
            # Bookkeeping that does not change the result.
            for k in ("checkpoint_every", "log_every", "max_failures", "cpus_per_worker"):
                s.pop(k, None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file and the key."""


def _parse_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw != "" else ""


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw manifest dict (stages by name or index)."""
    if "=" not in assignment:
        raise ManifestError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, key)
        else:
            if part not in node or not isinstance(node[part], (dict, list)):
                node[part] = {} if part not in node else node[part]
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        raise ManifestError(f"--set {key}: cannot replace a whole stage")
    node[last] = _parse_value(raw)


def _list_item(items: list, part: str, key: str):
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    raise ManifestError(f"--set {key}: no stage {part!r}")


def _describe(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}")
        else:
            lines.append(f"{loc or 'manifest'}: {err['msg']}")
    return f"{source}: " + "; ".join(lines)


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> Curriculum:
    """Read, override and validate a curriculum manifest (local path or s3:// URI)."""
    from medray import storage

    text = storage.read_text(str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a mapping with base_model, output and stages")
    for o in overrides or []:
        apply_override(data, o)
    try:
        cur = Curriculum.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_describe(e, str(path))) from e
    cur._source = {"uri": str(path), "digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
                   "overrides": list(overrides or [])}
    return cur
