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

from medray import provenance
from medray.data import shards
from medray.provenance import Artifact, OutputConflict, Provenance

from .options import AllRowsFailed, InferConfig, Summary, adapter_role
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


# The settings that change what an answer says: a rerun into an output made with other values
# refuses (check_output). Sizing (actors, batches, shards) and the shard format do not.
ANSWER_FIELDS = frozenset({"task", "question", "max_new_tokens", "temperature", "top_p", "stop", "seed", "engine",
                           "experts", "max_pixels"})


def inference_provenance(cfg: InferConfig, rows: list[dict]) -> Provenance:
    """The record of a run (cfg.engine is the engine chosen): the model's and each adapter's and
    expert's digest, the input with a digest of its listing (ids, image URIs, questions,
    references, adapters; image bytes are not read twice), and the answer settings."""
    inputs = [Artifact(role="model", uri=cfg.model, digest=provenance.digest_model(cfg.model))]
    inputs += [Artifact(role=adapter_role(name), uri=uri, digest=provenance.digest_model(uri))
               for name, uri in cfg.all_adapters().items()]
    if cfg.experts is not None:
        inputs += [Artifact(role=f"expert:{kind}", uri=uri, digest=provenance.digest_model(uri))
                   for kind, uri in (("radiology", cfg.experts.radiology), ("plot", cfg.experts.plot)) if uri]
    listing = sorted([r["id"], r["image"], r["question"], r["references"], r.get("adapter", "")] for r in rows)
    inputs.append(Artifact(role="input", uri=cfg.input, digest=provenance.hash_json(listing)))
    settings = cfg.model_dump(mode="json", include=set(ANSWER_FIELDS))
    return Provenance(kind="inference", name=cfg.output.rstrip("/").rsplit("/", 1)[-1], inputs=inputs,
                      settings=settings, settings_hash=provenance.hash_json(settings),
                      output=Artifact(role="answers", uri=cfg.output), made_by=provenance.made_by(),
                      started_at=provenance.now())


def check_output(output: str, record: Provenance) -> None:
    """Refuse to add answers to an output whose earlier answers came from another model,
    adapter, expert or answer settings, or from another input: the output would mix them.
    The input is compared by URI: a prefix that gained images since is resumed, not refused."""
    then = provenance.read(output)
    if then is None or then.kind != "inference":
        return  # a new output (or one written before medray kept records)
    diffs = provenance.differences(then, record, by_uri=frozenset({"input"}))
    if diffs:
        raise OutputConflict(f"{output} holds answers made from other inputs or settings than this run's: "
                             + "; ".join(diffs) + ". Write to another --output, or delete that output to "
                             "start over")


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
    # A fallback to hf is logged there, by name; the rows record the engine that made them.
    engine, _ = choose_engine(cfg.engine, model=cfg.model, adapter=cfg.adapter, adapters=cfg.adapters,
                              experts=cfg.experts is not None)
    cfg = cfg.model_copy(update={"engine": engine})
    record = inference_provenance(cfg, rows)
    check_output(cfg.output, record)  # before anything is written, finished or not
    if on_progress:
        on_progress(len(rows) - len(todo), len(rows), 0)
    if not todo:
        return Summary(0, 0, len(rows) - len(todo), time.perf_counter() - t0, 0, cfg.output)
    if cfg.adapters:
        check_mixed_adapters(cfg.all_adapters())
    # Written first and unfinished: an output that a crashed or cancelled run left is still
    # known to be this model's; finished_at and the answers' digest come at the end.
    provenance.write(cfg.output, record)
    conf = cfg.model_dump(mode="json")
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // cfg.batch_size, 200)))
    ds = ds.map_batches(preprocess, fn_kwargs={"cfg": conf}, batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_task,
                        batch_format="numpy", concurrency=cfg.preprocess_concurrency())
    ds = ds.map_batches(
        Generator, fn_constructor_kwargs={"cfg": conf, "record": record.dump()}, batch_size=cfg.rows_per_shard,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.gpus_per_actor or None, num_cpus=cfg.cpus_per_actor,
        # vLLM may live in another Python environment on the nodes (MEDRAY_VLLM_PYTHON).
        # A dead actor is replaced and the rows it held are sent again: Ray Data's own default
        # for actor pools (max_restarts and max_task_retries -1), which medray relies on.
        runtime_env=actor_runtime_env() if engine == "vllm" else None)

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
    # The answers' digest is the one `medray eval` records for what it scored: the same answers,
    # the same digest, whichever shards hold them.
    record.output = Artifact(role="answers", uri=cfg.output,
                             digest=provenance.digest_answers(shards.read_answers(cfg.output)))
    record.finished_at = provenance.now()
    provenance.write(cfg.output, record)
    if written and errors == written:
        raise AllRowsFailed(summary)
    return summary
