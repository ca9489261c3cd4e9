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

import logging
import time
from typing import Callable

import numpy as np

from medray.data import shards

from .options import AllRowsFailed, InferConfig, Summary
from .rows import list_rows
from .stages import Generator, preprocess
from .vllm_engine import actor_runtime_env, choose_engine

log = logging.getLogger(__name__)


def check_mixed_adapters(adapters: dict[str, str]) -> None:
    """Refuse, before any row runs, adapters that cannot share generate calls: PEFT mixes
    LoRA layers only (vLLM's LoRA loads the LLM's linear layers only; such an adapter already
    sent the run to hf). One adapter alone still runs: give it as --adapter in a run of its own."""
    from medray.models.loading import adapter_extras, read_adapter_config

    problems = [f"{name} ({uri}) {extras}" for name, uri in adapters.items()
                if (extras := adapter_extras(read_adapter_config(uri)))]
    if problems:
        raise ValueError("these adapters cannot answer rows mixed with other adapters' in one run: "
                         + "; ".join(problems) + ". Run each alone (--adapter), or use the stage's merged export "
                         "(lora.merge: true) as --model")


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

    from medray.raycluster import connect

    connect(log_to_driver=False)  # RAY_ADDRESS when set (as under `ray job submit`), else a local Ray
    t0 = time.perf_counter()
    rows = list_rows(cfg)
    done = shards.written_ids(cfg.output)
    todo = [r for r in rows if r["id"] not in done]
    log.info("%d input rows, %d already written, %d to do", len(rows), len(rows) - len(todo), len(todo))
    if on_progress:
        on_progress(len(rows) - len(todo), len(rows), 0)
    if not todo:
        return Summary(0, 0, len(rows) - len(todo), time.perf_counter() - t0, 0, cfg.output)

    # A fallback to hf is logged there, by name; the rows record the engine that made them.
    engine, _ = choose_engine(cfg.engine, model=cfg.model, adapter=cfg.adapter, adapters=cfg.adapters,
                              experts=cfg.experts is not None)
    if cfg.adapters:
        check_mixed_adapters(cfg.all_adapters())
    cfg = cfg.model_copy(update={"engine": engine})
    conf = cfg.model_dump(mode="json")
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // cfg.batch_size, 200)))
    ds = ds.map_batches(preprocess, fn_kwargs={"cfg": conf}, batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_task,
                        batch_format="numpy")
    ds = ds.map_batches(
        Generator, fn_constructor_kwargs={"cfg": conf}, batch_size=cfg.rows_per_shard, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.gpus_per_actor or None, num_cpus=cfg.cpus_per_actor,
        # vLLM may live in another Python environment on the nodes (MEDRAY_VLLM_PYTHON).
        **({"runtime_env": actor_runtime_env()} if engine == "vllm" else {}),
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
