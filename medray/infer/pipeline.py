"""Offline batch inference over image corpora on Ray Data.

    read tasks: list a key range / read rows of a records file, drop rows already done
    (sources, ledger) -> preprocess: read + decode + prompt (CPU tasks) -> generate + write
    a shard (actor pool) -> the driver: counters, progress, the run's record

Nothing per row lives in the driver: it plans the parts (a bounded number of list requests),
starts the done-index tasks and the ledger, and adds up one small row per shard. A corpus of
ten million images costs it what one of ten thousand does.

Exactly once and resumable: every input row has a stable id. Shards are written
atomically under names derived from the ids they hold, so a retried write replaces its
own shard instead of adding a copy. A rerun indexes the ids the output holds (footers and id
columns, in tasks) and the read tasks drop those rows as they list them. A row whose image
cannot be read is written with its error; it never fails the job.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from medray import provenance
from medray.data.streams import is_records_file
from medray.digests import SetDigest
from medray.provenance import Artifact, OutputConflict, Provenance

from medray.engines import ENGINES, check_adapters, choose
from medray.engines.types import GENERATION_FIELDS, GenerationSettings

from .options import AllRowsFailed, InferConfig, Summary, adapter_role

log = logging.getLogger(__name__)


# The settings that change what an answer says: a rerun into an output made with other values
# refuses (check_output). Sizing (actors, batches, shards) and the shard format do not.
ANSWER_FIELDS = frozenset({"task", "question", "engine", "experts", "max_pixels", *GENERATION_FIELDS})


RECORDS_QUESTION = "question_for_rows_without_one"


def inference_provenance(cfg: InferConfig) -> Provenance:
    """The record of a run (cfg.engine is the engine chosen): the model's and each adapter's and
    expert's digest, the input, and the answer settings. The input's digest (the set digest of
    its rows' ids, image URIs, questions, references and adapters; image bytes are not read
    twice) is added up by the read tasks and filled in when the run finishes."""
    inputs = [Artifact(role="model", uri=cfg.model, digest=provenance.digest_model(cfg.model))]
    inputs += [Artifact(role=adapter_role(name), uri=uri, digest=provenance.digest_model(uri))
               for name, uri in cfg.all_adapters().items()]
    if cfg.experts is not None:
        inputs += [Artifact(role=f"expert:{kind}", uri=uri, digest=provenance.digest_model(uri))
                   for kind, uri in (("radiology", cfg.experts.radiology), ("plot", cfg.experts.plot)) if uri]
    inputs.append(Artifact(role="input", uri=cfg.input))
    settings = cfg.model_dump(mode="json", include=set(ANSWER_FIELDS))
    if is_records_file(cfg.input):
        # Each record is asked its own question (stages.preprocess); the run's question only
        # where a record has none. Recorded as such, not as the question every row was asked.
        settings[RECORDS_QUESTION] = settings.pop("question")
    return Provenance(kind="inference", name=cfg.output.rstrip("/").rsplit("/", 1)[-1], inputs=inputs,
                      settings=settings, settings_hash=provenance.hash_json(settings),
                      output=Artifact(role="answers", uri=cfg.output), made_by=provenance.made_by(),
                      started_at=provenance.now())


def check_output(output: str, record: Provenance) -> Provenance | None:
    """Refuse to add answers to an output whose earlier answers came from another model,
    adapter, expert or answer settings, or from another input: the output would mix them.
    The input is compared by URI: a prefix that gained images since is resumed, not refused.
    Returns the output's record, if it has one."""
    then = provenance.read(output)
    if then is None or then.kind != "inference":
        return None  # a new output (or one written before medray kept records)
    settings = dict(then.settings)
    if RECORDS_QUESTION in record.settings and "question" in settings:
        # Written before a records file's run named its question for what it is: the same setting.
        settings[RECORDS_QUESTION] = settings.pop("question")
    # Written before a generation setting existed: its answers were made as its default makes
    # them (a new setting's default leaves generation as it was: types.GenerationFields).
    settings.update({k: v for k, v in GenerationSettings().model_dump(mode="json").items() if k not in settings})
    if settings != then.settings:
        then = then.model_copy(update={"settings": settings, "settings_hash": provenance.hash_json(settings)})
    diffs = provenance.differences(then, record, by_uri=frozenset({"input"}))
    if diffs:
        raise OutputConflict(f"{output} holds answers made from other inputs or settings than this run's: "
                             + "; ".join(diffs) + ". Write to another --output, or delete that output to "
                             "start over")
    return then


# Ray Data holds a task's output back until it fills a block of target_max_block_size (128 MiB
# by default), in every operator: listed rows of ~200 bytes would all wait for the end of
# their read task (the first answer for the end of the listing), and a read task's rows would
# reach one preprocess task as one block, decoded one after the other. At 128 KiB a read task
# lets its rows go in blocks of a few hundred (one preprocess task each); a packed batch
# (stages.preprocess_packed) is a block of its own.
BLOCK_BYTES = 128 << 10


def _pipeline_context():
    import ray.data

    ctx = ray.data.DataContext.get_current().copy()
    ctx.target_max_block_size = BLOCK_BYTES
    # The run has its own bar (rows done, listed, the total once known); Ray Data's per-operator
    # bars, logged every few seconds when stdout is not a terminal, only repeat it.
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    return ctx


def _dataset(cfg: InferConfig, parts, index, ledger, record: Provenance):
    """read (sources) -> preprocess, a packed row per batch -> Generator, a shard per call."""
    import ray.data

    from .sources import InputSource
    from .stages import PackedGenerator, preprocess_packed

    conf = cfg.model_dump(mode="json")
    # One output block per part, as its task yields it: Ray Data's default would split the few
    # read tasks' output into ~200 blocks.
    ds = ray.data.read_datasource(InputSource(cfg, parts, index.ref, ledger), override_num_blocks=len(parts),
                                  compute=ray.data.TaskPoolStrategy(size=min(cfg.read_tasks, len(parts))),
                                  num_cpus=cfg.cpus_per_read_task)
    # preprocess_concurrency is an upper bound, sized for inputs of many blocks; Ray Data warns,
    # once the input is done, when a small one reached fewer tasks than that. Nothing to do.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    # The read tasks' blocks hold whole batches (sources.read_part_rows), so every batch
    # preprocess makes is a full one; each comes out as one packed row (stages.preprocess_packed).
    ds = ds.map_batches(preprocess_packed, fn_kwargs={"cfg": conf}, batch_size=cfg.batch_size,
                        num_cpus=cfg.cpus_per_task, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=cfg.preprocess_concurrency()))
    return ds.map_batches(
        PackedGenerator, fn_constructor_kwargs={"cfg": conf, "record": record.dump()},
        batch_size=cfg.batches_per_shard(),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.gpus_per_actor or None, num_cpus=cfg.cpus_per_actor,
        # vLLM may live in another Python environment on the nodes (MEDRAY_VLLM_PYTHON).
        # A dead actor is replaced and the rows it held are sent again: Ray Data's own default
        # for actor pools (max_restarts and max_task_retries -1), which medray relies on.
        runtime_env=ENGINES[cfg.engine].runtime_env() or None)


@dataclass(frozen=True)
class Progress:
    """Where a run stands, as the progress bar and the job API show it."""

    rows_done: int
    """Input rows the output holds: earlier runs' and this run's."""
    rows_listed: int
    """Input rows listed (or read) so far."""
    rows_total: int | None
    """Every input row, once the listing has finished; None before."""
    rows_error: int
    """Rows this run wrote with an error."""


def _unwrap(e: BaseException) -> BaseException:
    """The error a user can act on, from the Ray task errors that carry it: a records file or
    a listing that cannot be read fails the run with its own message."""
    from medray.data import RecordError
    from medray.storage import StorageError

    seen = e
    while seen is not None:
        if isinstance(seen, (RecordError, StorageError, PermissionError)):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return e


def run_inference(cfg: InferConfig, *, progress: bool = True,
                  on_progress: Callable[[Progress], None] | None = None) -> Summary:
    """Run the pipeline to completion. `on_progress(Progress)` is called once the run has
    started and after every shard; raising from it stops the run (a cancellation), and a
    later run resumes where this one stopped.

    Raises AllRowsFailed (after writing every row with its error) when no row this run
    processed succeeded: such a run is a failure, whatever caused it.
    """
    import ray
    import ray.data

    from medray.raycluster import connect

    from .ledger import build_done_index, start_ledger
    from .sources import check_input, plan_parts

    connect(log_to_driver=False)  # RAY_ADDRESS when set (as under `ray job submit`), else a local Ray
    t0 = time.perf_counter()
    # A fallback to hf is logged there, by name; the rows record the engine that made them.
    engine, _ = choose(cfg.engine, model=cfg.model, adapter=cfg.adapter, adapters=cfg.adapters,
                       experts=cfg.experts is not None)
    cfg = cfg.model_copy(update={"engine": engine})
    ENGINES[engine].check_options_of(cfg.model, cfg)
    record = inference_provenance(cfg)
    then = check_output(cfg.output, record)  # before anything is written, finished or not
    if cfg.adapters:  # rows of different adapters share generate calls; one adapter alone runs
        check_adapters(cfg.all_adapters(), cfg.model, engine, alone="Run each alone (--adapter), a run of its own. ")
    parts = plan_parts(cfg)
    check_input(cfg, parts)
    index = build_done_index(cfg.output)
    if index.legacy_shards:
        log.info("%s: %d shards written before shards carried their digest were read in full once", cfg.output,
                 index.legacy_shards)
    if then is not None and then.output and then.output.digest and not provenance.is_set_digest(then.output.digest):
        log.info("%s: %s", cfg.output, provenance.LEGACY_ANSWERS_NOTE)
    # Written first and unfinished: an output that a crashed or cancelled run left is still
    # known to be this model's; the digests and finished_at come at the end.
    provenance.write(cfg.output, record)
    ledger = start_ledger(len(parts), cfg.rows_ahead_at_start(), cfg.rows_ahead())
    with ray.data.DataContext.current(_pipeline_context()):
        ds = _dataset(cfg, parts, index, ledger, record)
    tally = _Tally(ledger, SetDigest.parse(index.answers), progress, on_progress)
    try:
        tally.report(force=True)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            tally.add(batch, time.perf_counter() - t0)
            tally.report()
        tally.finish()
    except Exception as e:
        tally.close()
        cause = _unwrap(e)
        if cause is e:
            raise
        raise cause from None
    summary = Summary(tally.written, tally.errors, tally.snap["skipped"], time.perf_counter() - t0, tally.tokens,
                      cfg.output, tally.first_s, tally.first_rows, tally.first_errors)
    # The answers' digest is the one `medray eval` records for what it scored: the same answers,
    # the same digest, whichever shards hold them; summed from the shards' own, not read again.
    record.inputs[-1].digest = tally.snap["listing"]
    record.output = Artifact(role="answers", uri=cfg.output, digest=str(tally.answers))
    record.finished_at = provenance.now()
    provenance.write(cfg.output, record)
    if tally.written and tally.errors == tally.written:
        raise AllRowsFailed(summary)
    return summary


class _Tally:
    """The driver's side of a run: counters from one row per shard, the ledger's counts, the
    progress bar and callback. O(1) state."""

    POLL_S = 0.5  # the ledger is asked at most this often; its counts move page by page

    def __init__(self, ledger, answers: SetDigest, bar: bool, on_progress):
        self.ledger, self.answers, self.on_progress = ledger, answers, on_progress
        self.written = self.errors = self.tokens = 0
        self.first_s, self.first_rows, self.first_errors = 0.0, 0, []
        self.snap = {"listed": 0, "skipped": 0, "complete": False, "listing": ""}
        self.polled = 0.0
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=None, desc="medray infer", unit="row")

    def add(self, batch: dict, elapsed: float) -> None:
        import json

        for i in range(len(batch["rows"])):
            n = int(batch["rows"][i])
            if not self.written:
                self.first_s, self.first_rows = elapsed, n
            self.written += n
            self.ledger.wrote.remote(n)
            self.errors += int(batch["errors"][i])
            self.tokens += int(batch["tokens"][i])
            self.answers.merge(str(batch["answers"][i]))
            if len(self.first_errors) < 5:
                self.first_errors += json.loads(str(batch["first_errors"][i]))[:5 - len(self.first_errors)]
            if self.bar is not None:
                self.bar.update(n)

    def report(self, force: bool = False) -> None:
        import ray

        if force or time.monotonic() - self.polled >= self.POLL_S:
            self.snap = ray.get(self.ledger.snapshot.remote())
            self.polled = time.monotonic()
            if self.bar is not None:
                todo = self.snap["listed"] - self.snap["skipped"]
                self.bar.total = todo if self.snap["complete"] else None
                self.bar.set_postfix_str(f"listed {self.snap['listed']}" + ("" if self.snap["complete"] else "+")
                                         + f", {self.snap['skipped']} done before", refresh=True)
        if self.on_progress:
            self.on_progress(Progress(self.snap["skipped"] + self.written, self.snap["listed"],
                                      self.snap["listed"] if self.snap["complete"] else None, self.errors))

    def finish(self) -> None:
        self.report(force=True)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
