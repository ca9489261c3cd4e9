"""Running a curriculum: one Ray Train run per stage, each starting from the last result.

Layout under `output` (a directory or s3:// prefix):

    <output>/<stage>/              the stage's model (HF directory, or PEFT adapter directory)
    <output>/<stage>/adapter/      LoRA stages that merge: the adapter as well
    <output>/<stage>/metrics.jsonl, loss.png
    <output>/<stage>/medray_stage.json   written last: the stage is done
    <output>/_data/<stage>/        synthetic corpora, when a stage generates one
    <output>/_ray/<stage>-<hash>/  Ray Train runs and their checkpoints

A stage whose medray_stage.json exists with the same config fingerprint is skipped, so a
rerun of a finished curriculum does no work. An unfinished stage's Ray Train run has a
name derived from that fingerprint: resubmitting the same manifest resumes it from its
latest checkpoint, while a changed manifest starts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from medray import storage
from medray.data.synthetic import write_synthetic
from medray.provenance import (Artifact, Provenance, digest_file, digest_model, hash_json, made_by, now,
                               recorded_digest)

from . import checkpoints
from .config import Curriculum, StageConfig

log = logging.getLogger(__name__)

DONE_MARKER = "medray_stage.json"
KEEP_CHECKPOINTS = 2  # per stage run: the newest two complete ones


class StageConflict(RuntimeError):
    """The output already holds a stage made from a different configuration."""


@dataclass
class StageResult:
    name: str
    model: str
    """URI of the stage's model directory."""
    skipped: bool
    seconds: float
    metrics: dict


def stage_data(cur: Curriculum, stage: StageConfig) -> str:
    """The records URI for a stage, generating the synthetic corpus if the stage asks for one."""
    if stage.data.records:
        return stage.data.records
    syn = stage.data.synthetic
    dest = storage.join(cur.output, "_data", stage.name)
    records = storage.join(dest, "records.jsonl")
    if not storage.exists(records):
        write_synthetic(syn.kind, dest, n=syn.n, seed=syn.seed, image_size=syn.image_size,
                        dicom_fraction=syn.dicom_fraction)
    return records


def _ensure_ray() -> None:
    from medray.raycluster import connect

    # RAY_ADDRESS when set (as under `ray job submit`), else a private local instance.
    connect(log_to_driver=True)


def _runtime_env(stage: StageConfig) -> dict:
    # Workers need the driver's S3 endpoint and cache settings; credentials are never passed
    # along (storage.forwardable_env): a cluster's nodes have their own.
    env = storage.forwardable_env()
    env.update({k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HOME") if k in os.environ})
    if stage.gpus_per_worker == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU workers: gloo comms, CPU ops
    return {"env_vars": env}


def run_stage(cur: Curriculum, index: int, start_model: str) -> tuple[dict, str | None]:
    """Train stage `index` from `start_model`; returns its last metrics row and its output's
    digest (taken by rank 0 at export, in medray_digest.json)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_worker

    stage = cur.stages[index]
    use_gpu = stage.gpus_per_worker > 0
    resources = {"CPU": stage.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = stage.gpus_per_worker
    fs, path = storage.default_storage().filesystem_for(storage.join(cur.output, "_ray"))
    run_name = f"{stage.name}-{cur.fingerprint(index)}"
    run_dir = storage.join(cur.output, "_ray", run_name)
    if not storage.is_s3(cur.output):
        os.makedirs(path, exist_ok=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "stage": stage.model_dump(mode="json"), "start_model": start_model,
            "records": stage_data(cur, stage), "seed": cur.stage_seed(stage),
            "export_to": storage.join(cur.output, stage.name), "run_dir": run_dir,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=stage.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=FailureConfig(max_failures=stage.max_failures),
            worker_runtime_env=_runtime_env(stage),
        ),
    )
    trainer.fit()
    # A failed attempt's checkpoints, newer than any Ray Train registered, are not Ray's to delete.
    checkpoints.prune(run_dir, stage.workers, keep=KEEP_CHECKPOINTS)
    # The run's own metrics belong to its last checkpoint; the stage's final row is in
    # the metrics.jsonl that rank 0 exported with the model.
    rows = storage.read_text(storage.join(cur.output, stage.name, "metrics.jsonl")).splitlines()
    metrics = json.loads(rows[-1]) if rows else {}
    return metrics, recorded_digest(storage.join(cur.output, stage.name))


def _inputs(cur: Curriculum, stage: StageConfig, start: str, start_digest: str | None) -> list[Artifact]:
    """What a stage is made from: its start model and data with their digests, and the
    manifest it came from when it came from one."""
    records = stage_data(cur, stage)
    inputs = [Artifact(role="start_model", uri=start, digest=start_digest or digest_model(start)),
              Artifact(role="data", uri=records, digest=digest_file(records))]
    if cur._source:
        inputs.append(Artifact(role="manifest", uri=cur._source["uri"], digest=cur._source["digest"]))
    return inputs


def _changed_inputs(done: Provenance, inputs: list[Artifact]) -> list[str]:
    """The inputs (start model, data) whose content differs from what the stage was made from."""
    out = []
    for current in inputs:
        then = done.input(current.role)
        if current.role != "manifest" and then is not None and then.digest and then.digest != current.digest:
            out.append(f"{current.role} {current.uri}: {then.digest} then, {current.digest} now")
    return out


def run_curriculum(cur: Curriculum) -> list[StageResult]:
    """Run every stage not yet done; returns what each stage produced."""
    _ensure_ray()
    results = []
    previous, previous_digest = cur.base_model, None
    for index, stage in enumerate(cur.stages):
        dest = storage.join(cur.output, stage.name)
        marker = storage.join(dest, DONE_MARKER)
        fingerprint = cur.fingerprint(index)
        start = stage.model or previous
        # The previous stage's output digest is in its record: its S3 output is not fetched back.
        inputs = _inputs(cur, stage, start, previous_digest if start == previous else None)
        if storage.exists(marker):
            done = json.loads(storage.read_text(marker))
            if done.get("fingerprint") != fingerprint:
                raise StageConflict(
                    f"{dest} holds stage {stage.name!r} trained from a different configuration; "
                    "use another output, or delete that stage (and the ones after it) to retrain")
            record = Provenance.model_validate(done["provenance"]) if "provenance" in done else None
            changed = _changed_inputs(record, inputs) if record else []
            if changed:
                raise StageConflict(
                    f"{dest} holds stage {stage.name!r} made from other inputs than this run's: "
                    + "; ".join(changed) + ". Use another output, or delete that stage (and the ones after it) "
                    "to retrain")
            log.info("stage %s: done already (%s), skipping", stage.name, dest)
            results.append(StageResult(stage.name, dest, True, 0.0, done.get("metrics", {})))
            previous, previous_digest = dest, record.output.digest if record and record.output else None
            continue
        log.info("stage %s: %s from %s on %d worker(s)", stage.name, stage.strategy, start, stage.workers)
        started = now()
        t0 = time.perf_counter()
        metrics, output_digest = run_stage(cur, index, start)
        seconds = time.perf_counter() - t0
        config = stage.model_dump(mode="json")
        record = Provenance(
            kind="stage", name=stage.name, inputs=inputs,
            settings={**config, "seed": cur.stage_seed(stage), "world_size": stage.workers,
                      "overrides": (cur._source or {}).get("overrides", [])},
            settings_hash=hash_json(config), output=Artifact(role="model", uri=dest, digest=output_digest),
            made_by=made_by(), started_at=started, finished_at=now())
        storage.write_text(marker, json.dumps({
            "stage": stage.name, "fingerprint": fingerprint, "start_model": start,
            "config": config, "seconds": round(seconds, 1),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
            "provenance": record.dump(),
        }, indent=2))
        results.append(StageResult(stage.name, dest, False, seconds, metrics))
        previous, previous_digest = dest, output_digest
    return results
