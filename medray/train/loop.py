"""The one train loop: every Ray Train worker runs `train_worker`, whatever the strategy."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medray import storage
from medray.data import ChatCollator
from medray.models import load_model

from . import checkpoints
from ._data import RecordsDataset, StepSampler
from .config import StageConfig
from .export import export_stage
from .metrics import MetricsLog, peak_flops
from .parts import apply_lora, freeze_all_but
from .strategies import make_strategy

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def build_model(start_uri: str, stage: StageConfig, seed: int, device) -> tuple:
    """The stage's start model with exactly the stage's parameters trainable."""
    quant = None if stage.quantization == "none" else stage.quantization
    # Master weights in fp32; bf16 compute comes from autocast / FSDP / DeepSpeed.
    lm = load_model(start_uri, device=str(device), dtype=torch.float32, quantization=quant)
    model = lm.model
    freeze_all_but(model, lm.family, stage.train)
    if stage.lora is not None:
        torch.manual_seed(seed)  # identical adapter init on every rank
        model = apply_lora(model, lm.family, stage.lora, stage.train)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return lm, model


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _resume_checkpoint(run_dir: str | None, world: int, rank: int):
    """The checkpoint to resume from: the newest complete one in the run's storage, which
    can be newer than the one Ray Train registered (medray.train.checkpoints). Rank 0 picks
    it and tells the others, so every rank loads the same step."""
    import ray.train

    registered = ray.train.get_checkpoint()
    choice = [None]
    if rank == 0 and run_dir:
        found = checkpoints.newest(run_dir, world)
        choice = [found[1] if found else None]
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return registered
    if registered is not None and registered.path.rstrip("/").endswith(choice[0].rstrip("/").split("/")[-1]):
        return registered
    fs, path = storage.default_storage().filesystem_for(choice[0])
    if rank == 0:
        log.info("resuming from %s, newer than Ray Train's registered checkpoint (%s)", choice[0],
                 registered.path if registered is not None else "none")
    return ray.train.Checkpoint(path=path, filesystem=fs)


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker. `config` is built by medray.train.curriculum."""
    import ray.train
    import ray.train.torch

    stage = StageConfig.model_validate(config["stage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = config["seed"]
    seed_everything(seed)

    lm, model = build_model(config["start_model"], stage, seed, device)
    dataset = RecordsDataset(config["records"], stage.data.kind, stage.data.image_root)
    sampler = StepSampler(len(dataset), world=world, micro_batch=stage.micro_batch_size,
                          accum=stage.accum, seed=seed, shuffle=stage.data.shuffle)
    steps_per_epoch = sampler.steps_per_epoch
    total = stage.max_steps or max(1, int(round(stage.epochs * steps_per_epoch)))
    collate = ChatCollator(lm.processor, max_length=stage.max_length)
    strategy = make_strategy(stage, device, total)
    strategy.setup(model)
    n_params = sum(p.numel() for p in strategy.module.parameters())

    step = resumed_from = 0
    metrics = MetricsLog()
    checkpoint = _resume_checkpoint(config.get("run_dir"), world, rank)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            strategy.load(d)
            extra = json.loads(Path(d, f"worker-{rank}.json").read_text())
        step = resumed_from = extra["step"]
        _set_rng_state(extra["rng"])
        metrics.rows = extra["metrics"]
        if rank == 0:
            log.info("stage %s: resumed at step %d/%d", stage.name, step, total)

    def fresh_window() -> dict:
        return {"loss": 0.0, "micro": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}

    window = fresh_window()
    while step < total:
        for micro in range(stage.accum):
            batch = collate([dataset[i] for i in sampler.indices(step, micro, rank)])
            loss = strategy.forward(batch)
            strategy.backward(loss)
            grad_norm = strategy.step(boundary=micro == stage.accum - 1)
            window["loss"] += float(loss.detach())
            window["micro"] += 1
            window["tokens"] += int(batch["attention_mask"].sum())
            window["samples"] += batch["input_ids"].shape[0]
        step += 1

        do_log = step % stage.log_every == 0 or step == total
        do_ckpt = step % stage.checkpoint_every == 0 and step < total
        if do_log:
            loss_sum, micro_n, tokens, samples = _all_reduce(
                [window["loss"], window["micro"], window["tokens"], window["samples"]])
            dt = time.perf_counter() - window["t0"]
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_sum / micro_n,
                   "lr": strategy.lr(), "samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
                   "grad_norm": grad_norm, "resumed_from": resumed_from}
            peak = peak_flops(device)
            if peak:
                # 6 x params x tokens: forward + backward of a dense transformer.
                row["mfu"] = 6 * n_params * tokens / dt / (peak * world)
            metrics.rows.append(row)
            if rank == 0:
                log.info("stage %s step %d/%d loss %.4f lr %.2e %.1f samples/s", stage.name, step, total,
                         row["loss"], row["lr"], row["samples_per_s"])
        saving_started = time.perf_counter()
        if do_ckpt:
            with tempfile.TemporaryDirectory() as d:
                strategy.save(d)
                # Written last, listing the files above: a checkpoint counts as complete only
                # when every rank's list has arrived in storage (medray.train.checkpoints).
                Path(d, f"worker-{rank}.json").write_text(json.dumps(
                    checkpoints.manifest(d, rank, step, {"rng": _rng_state(), "metrics": metrics.rows})))
                ray.train.report({"step": step, **(metrics.rows[-1] if metrics.rows else {})},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
        # Metrics alone are not reported to Ray Train: a report waits for the controller to
        # take the previous one (~1 s here), which made a tiny stage 30x slower than its
        # steps. They go to the log, to metrics.jsonl with the export, and with each checkpoint.
        # Throughput counts training only, not the time spent saving or reporting.
        if do_log:
            window = fresh_window()
        elif do_ckpt:
            window["t0"] += time.perf_counter() - saving_started

    trainable = strategy.trainable_full()
    if rank == 0:
        export_stage(config["start_model"], stage, seed, trainable, config["export_to"], metrics)
    if dist.is_initialized():
        dist.barrier()
    ray.train.report({"step": step, "done": True, **(metrics.rows[-1] if metrics.rows else {})})
