"""Asynchronous batch jobs behind POST /v1/jobs: durable records, detached runners.

A job is one run of the batch-inference pipeline (medray.infer.run_inference). Its record
is a JSON object under the configured store prefix (S3 in production), never in process
memory, so it outlives the Serve application. The pipeline runs in a detached Ray actor
named after the job: it survives a redeploy or restart of the Serve app and is the only
writer of the record while it lives. Whoever finds a job unfinished with no runner alive
(an ingress replica starting up, a GET) starts a new runner, and the pipeline resumes from
the shards already written.

Cancellation is a marker object beside the record; the runner checks it after every shard.
An unfinished job also has a marker under `open/`, so that a replica's start-up reads the
records of unfinished jobs only, however many finished ones the store holds.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

import ray
from pydantic import Field, create_model

from medray import provenance, storage
from medray.config import StrictModel
from medray.infer import InferConfig
from medray.engines.types import GENERATION_FIELDS

log = logging.getLogger(__name__)

NAMESPACE = "medray-jobs"
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3
"""Runners started for one job before it is failed (a job that kills its runner each time)."""
_ID = re.compile(r"^job-[0-9a-f]{16}$")


# What a client may set in a job: a declared subset of InferConfig, so a pipeline option is
# defined once. Resources (actors, CPUs, batch sizes) stay the server's (JobsConfig), and
# `model` names a served model instead of a URI.
JOB_FIELDS = ("input", "image_folder", "output", "sr_output", "task", "question", *GENERATION_FIELDS, "format", "include", "exclude")
JobRequest = create_model(
    "JobRequest", __base__=StrictModel, __doc__="The body of POST /v1/jobs.",
    model=(str, Field(description="A served model name, or '<model>:<adapter>'.")),
    **{name: (InferConfig.model_fields[name].annotation, InferConfig.model_fields[name]) for name in JOB_FIELDS},
)


class JobCancelled(Exception):
    pass


class JobStore:
    """Job records: `<prefix>/<id>.json`, `<prefix>/<id>.cancel` once cancelling is asked, and
    `<prefix>/open/<id>` while the job is unfinished (`unfinished`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")
        self.open_prefix = storage.join(self.prefix, "open")
        # Written once every unfinished job of the store has its open/ marker: stores written
        # before the markers existed are scanned in full once (`unfinished`).
        self._indexed = storage.join(self.open_prefix, "INDEXED")

    @staticmethod
    def new_id() -> str:
        """16 hex digits that sort newest first: 11 count milliseconds down from 2^44 (the
        year 2527), 5 are random. S3 lists keys in ascending order only, so this is what lets
        GET /v1/jobs read one page of the newest jobs (`list`) instead of every record."""
        countdown = (1 << 44) - 1 - int(time.time() * 1000)
        return f"job-{countdown:011x}{secrets.randbits(20):05x}"

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return bool(_ID.match(job_id))

    def _uri(self, job_id: str, suffix: str = ".json") -> str:
        if not self.valid_id(job_id):  # ids become object keys: no traversal, no surprises
            raise KeyError(job_id)
        return storage.join(self.prefix, job_id + suffix)

    def _marker(self, job_id: str) -> str:
        self._uri(job_id)  # the same id check
        return storage.join(self.open_prefix, job_id)

    def put(self, record: dict) -> None:
        """Write a record. A queued one (a new job) gets its open/ marker first, so a job whose
        record exists always has one until it ends; a finished one loses it after. A marker
        left by a writer that died in between is cleared by `unfinished`."""
        record["updated_at"] = time.time()
        marker = self._marker(record["id"])
        if record["status"] == "queued":
            storage.write_text(marker, "")
        with storage.atomic_writer(self._uri(record["id"]), "w") as f:
            f.write(json.dumps(record, indent=1))
        if record["status"] in TERMINAL:
            storage.delete(marker)

    def get(self, job_id: str) -> dict | None:
        try:
            return json.loads(storage.read_text(self._uri(job_id)))
        except (KeyError, FileNotFoundError):
            return None

    def _ids(self, limit: int, after: str | None) -> tuple[list[str], bool]:
        files = storage.list_files(self.prefix, include="job-*.json", limit=limit + 1,
                                   start_after=self._uri(after) if after else None)
        return [f.uri.rsplit("/", 1)[-1][: -len(".json")] for f in files[:limit]], len(files) > limit

    def list(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        """One page of records, newest first (ids sort so: `new_id`): the `limit` jobs after
        the job `after`, and whether more follow. Reads one listing page and those records,
        however many jobs the store holds. (Ids made by medray before 2026-12 are random: they
        list in id order among the others.)"""
        ids, more = self._ids(limit, after)
        return [r for job_id in ids if (r := self.get(job_id))], more

    def every(self):
        """Every record, page by page."""
        after = None
        while True:
            ids, more = self._ids(500, after)
            yield from (r for job_id in ids if (r := self.get(job_id)))
            if not more:
                return
            after = ids[-1]

    def unfinished(self) -> list[dict]:
        """The records of unfinished jobs, read through their open/ markers: what an ingress
        replica looks at when it starts, which read every record before (seconds per thousand
        jobs on S3, in the replica's constructor). A store without the INDEXED mark (written
        before the markers) is scanned in full once, and its unfinished jobs get markers."""
        if not storage.exists(self._indexed):
            for record in self.every():
                if record["status"] not in TERMINAL:
                    storage.write_text(self._marker(record["id"]), "")
            storage.write_text(self._indexed, str(time.time()))
        found = []
        for marker in storage.list_files(self.open_prefix, recursive=False, include="job-*"):
            job_id = marker.uri.rsplit("/", 1)[-1]
            if not self.valid_id(job_id):
                continue
            record = self.get(job_id)
            if record is None:  # a submission under way (or one that died before its record)
                continue
            if record["status"] in TERMINAL:  # its last writer died before clearing the marker
                storage.delete(marker.uri)
                continue
            found.append(record)
        return found

    def problem(self) -> str | None:
        """Why this store cannot keep job records, in words that say what to configure; None
        when it can (a listing of the prefix works)."""
        try:
            storage.list_files(self.prefix, include="job-*.json", limit=1)
            return None
        except Exception as e:  # no credentials, no endpoint, no bucket: the server's set-up
            where = ("S3 credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for a "
                     "store other than AWS) in the environment where the server runs, for a bucket that exists"
                     if storage.is_s3(self.prefix) else "a directory every replica and job runner can write")
            return (f"batch jobs keep their records in {self.prefix}, which this server cannot use "
                    f"({type(e).__name__}). Configure {where}, or set jobs.store in the Serve config to "
                    "a store it can reach (on one machine, a local directory such as /tmp/medray/jobs)")

    def request_cancel(self, job_id: str) -> None:
        storage.write_text(self._uri(job_id, ".cancel"), str(time.time()))

    def cancel_requested(self, job_id: str) -> bool:
        return storage.exists(self._uri(job_id, ".cancel"))


def new_record(job_id: str, request: JobRequest, infer: dict) -> dict:
    return {"id": job_id, "status": "queued", "request": request.model_dump(), "infer": infer,
            "created_at": time.time(), "started_at": None, "finished_at": None, "attempts": 0,
            "rows_done": 0, "rows_listed": 0, "rows_total": None, "rows_error": 0, "output": request.output, "error": None,
            "summary": None, "provenance": None}


def runner_waits(record: dict, resources: dict[str, float] | None) -> str | None:
    """Why a queued job has not started, when the reason is that no node offers the custom
    resources its runner asks for (JobsConfig.runner_resources); None otherwise. Ray would
    keep such a runner pending without a word, so the job's status says it."""
    return no_node_offers(resources) if record["status"] == "queued" and resources else None


def no_node_offers(resources: dict[str, float]) -> str | None:
    """What to do when no live node of the cluster has `resources`; None when one has."""
    for node in ray.nodes():
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0) >= v for k, v in resources.items()):
            return None
    return (f"no node in the cluster has the resources the job runner asks for ({resources}); the job starts "
            "when one joins (an autoscaler can add it), or set jobs.runner_resources to resources your nodes have")


def view(record: dict, *, cancel_requested: bool = False, waiting: str | None = None) -> dict:
    """The client's view of a record (the internal pipeline config stays inside). `waiting`:
    why a queued job has not started (runner_waits)."""
    return {"id": record["id"], "object": "job", "status": record["status"], "model": record["request"]["model"],
            "created_at": record["created_at"], "started_at": record["started_at"],
            "finished_at": record["finished_at"], "request": record["request"],
            "progress": {"rows_done": record["rows_done"], "rows_listed": record.get("rows_listed", 0),
                         "rows_total": record["rows_total"], "rows_error": record["rows_error"]},
            "output": record["output"], "error": record["error"], "summary": record["summary"],
            "provenance": record.get("provenance"), "cancel_requested": cancel_requested, "waiting": waiting}


@ray.remote(num_cpus=0, max_restarts=0)
class JobRunner:
    """Runs one job's pipeline and keeps its record current. Detached: outlives the Serve app."""

    def run(self, store_prefix: str, job_id: str) -> None:
        from medray.infer import InferConfig, run_inference

        store = JobStore(store_prefix)
        record = store.get(job_id)
        if record is None or record["status"] in TERMINAL:
            ray.actor.exit_actor()
        record.update(status="running", started_at=record["started_at"] or time.time(),
                      attempts=record["attempts"] + 1)
        store.put(record)

        def progress(p) -> None:  # medray.infer.pipeline.Progress: rows_total stays None while listing
            if store.cancel_requested(job_id):
                raise JobCancelled()
            record.update(rows_done=p.rows_done, rows_listed=p.rows_listed, rows_total=p.rows_total,
                          rows_error=p.rows_error)
            store.put(record)

        try:
            if store.cancel_requested(job_id):
                raise JobCancelled()
            summary = run_inference(InferConfig.model_validate(record["infer"]), progress=False,
                                    on_progress=progress)
            record.update(status="succeeded", summary=summary.line())
        except JobCancelled:
            record.update(status="cancelled")
        except Exception as e:  # the job fails with a message; the runner never takes others down
            log.exception("job %s failed", job_id)
            record.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        try:  # what made the output (medray.provenance), as the pipeline wrote it beside the shards
            made = provenance.read(record["output"])
            record["provenance"] = made.dump() if made else None
        except Exception as e:  # the job's outcome stands without it
            log.warning("job %s: no provenance (%s)", job_id, type(e).__name__)
        record["finished_at"] = time.time()
        store.put(record)
        # The record is final: the detached actor has nothing more to do, so it ends itself
        # rather than linger.
        ray.actor.exit_actor()


def _runner_alive(job_id: str) -> bool:
    try:
        ray.get_actor(f"medray-job-{job_id}", namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def ensure_runner(store: JobStore, record: dict, resources: dict[str, float] | None = None) -> dict:
    """Start a runner for an unfinished job that has none; returns the (maybe updated) record.
    `resources`: the custom resources the runner needs (JobsConfig.runner_resources)."""
    if record["status"] in TERMINAL or _runner_alive(record["id"]):
        return record
    if store.cancel_requested(record["id"]):
        record.update(status="cancelled", finished_at=time.time())
        store.put(record)
        return record
    if record["attempts"] >= MAX_ATTEMPTS:
        record.update(status="failed", finished_at=time.time(),
                      error=f"the job's runner died {record['attempts']} times; see the Ray logs")
        store.put(record)
        return record
    try:
        runner = JobRunner.options(name=f"medray-job-{record['id']}", namespace=NAMESPACE,
                                   lifetime="detached", resources=resources or {}).remote()
    except ValueError:  # another replica started it a moment ago
        return record
    runner.run.remote(store.prefix, record["id"])  # fire and forget: the record reports
    log.info("started a runner for %s (attempt %d)", record["id"], record["attempts"] + 1)
    return record


def recover(store: JobStore, resources: dict[str, float] | None = None) -> int:
    """Start runners for every unfinished job without one; returns how many were looked at."""
    unfinished = store.unfinished()
    for record in unfinished:
        try:
            ensure_runner(store, record, resources)
        except Exception:
            log.exception("could not recover job %s", record["id"])
    return len(unfinished)
