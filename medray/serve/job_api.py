"""What the batch-job routes do, apart from the routes: `JobApi` checks a job request against
the server's prefixes and limits, stores it and starts its runner (medray.serve.jobs), and
reads jobs back. Every store call runs off the event loop (S3 and the GCS), which moves every
request of the ingress replica. Runs, and is tested, without Serve.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from medray import storage
from medray.storage import dicomweb

from .config import ServeConfig
from .images import read_image
from .jobs import TERMINAL, JobRequest, JobStore, ensure_runner, new_record, no_node_offers, recover, runner_waits, view
from .openai_api import ApiError

log = logging.getLogger(__name__)


class JobApi:
    def __init__(self, config: ServeConfig, model):
        self.config = config
        self.model = model  # a client's model name -> (spec, adapter), or a 404 (Chat.model)
        self.jobs = JobStore(config.jobs.store) if config.jobs else None
        if self.jobs:
            try:  # jobs left unfinished by an earlier deployment continue
                n = recover(self.jobs, config.jobs.runner_resources)
                if n:
                    log.info("looked after %d unfinished jobs", n)
            except Exception:
                log.exception("job recovery failed; GET /v1/jobs/{id} retries it per job")

    def store(self) -> JobStore:
        if self.jobs is None:
            raise ApiError(404, "batch jobs are not configured on this server (set `jobs` in the config)")
        return self.jobs

    def _ensure_runner(self, record: dict) -> dict:
        return ensure_runner(self.store(), record, self.config.jobs.runner_resources)

    def _job(self, job_id: str) -> dict:
        record = self.store().get(job_id)
        if record is None:
            raise ApiError(404, f"job {job_id!r} does not exist; GET /v1/jobs lists them", param="id")
        return record

    async def submit(self, body: JobRequest) -> dict:
        store, jobs = self.store(), self.config.jobs
        spec, adapter = self.model(body.model)
        for field, side in (("input", "input"), ("image_folder", "input"), ("output", "output"),
                            ("sr_output", "output")):
            uri = getattr(body, field)
            if field in ("input", "sr_output") and uri and dicomweb.is_dicomweb(uri):  # a PACS: by server
                try:
                    dicomweb.check_allowed(uri, jobs.allowed_dicomweb_servers)
                except (storage.AccessDenied, ValueError) as e:  # AccessDenied names the server, what is allowed
                    raise ApiError(403 if isinstance(e, storage.AccessDenied) else 400, f"input: {e}", param=field,
                                   kind="permission_error") from None
                continue
            if uri is not None and not storage.within(uri, getattr(jobs, f"allowed_{side}_prefixes")):
                raise ApiError(403, f"{field} {uri} is outside the allowed {side} prefixes", param=field,
                               kind="permission_error")
        if body.max_new_tokens > jobs.max_new_tokens:
            raise ApiError(400, f"max_new_tokens may be at most {jobs.max_new_tokens}", param="max_new_tokens")
        records = body.input.lower().endswith((".jsonl", ".json", ".parquet"))
        if records and not await asyncio.to_thread(storage.exists, body.input):
            raise ApiError(404, f"input manifest {body.input} does not exist", param="input")
        from medray.infer import InferConfig

        try:
            # A job runs on its model's engine, sized as the model is. Rows of a records file
            # may name any of the model's adapters (an `adapter` field), as requests do.
            infer = InferConfig(model=spec.uri, adapter=spec.adapters[adapter] if adapter else None,
                                adapters=spec.adapters if records else {}, engine=spec.engine, vllm=spec.vllm,
                                allowed_image_prefixes=jobs.allowed_input_prefixes,
                                allowed_dicomweb_servers=jobs.allowed_dicomweb_servers,
                                **body.model_dump(exclude={"model"}), **jobs.pipeline_resources())
        except ValidationError as e:
            raise ApiError(400, f"invalid job: {e.errors()[0]['msg']}") from None
        record = new_record(store.new_id(), body, infer.model_dump(mode="json"))

        def submit() -> dict:
            store.put(record)
            started = self._ensure_runner(record)
            return view(started, waiting=runner_waits(started, jobs.runner_resources))

        return await asyncio.to_thread(submit)

    async def health(self) -> dict:
        """Whether batch jobs can run here, and if not, what to configure: the web page asks
        this first, so a server without a usable job store says why instead of failing."""
        if self.jobs is None:
            return {"available": False, "store": None,
                    "problem": "batch jobs are not configured on this server (set `jobs` in the Serve config)"}
        problem = await asyncio.to_thread(self.jobs.problem)
        return {"available": problem is None, "store": self.jobs.prefix, "problem": problem}

    async def studies(self, url: str, limit: int, offset: int) -> dict:
        """A page of the studies a PACS query finds (QIDO-RS, on a server jobs may read): what
        the web page lists, to submit a job over the query narrowed to the studies picked."""
        self.store()  # a 404 where jobs are not configured: the list is for submitting one
        try:
            service = dicomweb.check_allowed(url, self.config.jobs.allowed_dicomweb_servers)
        except storage.AccessDenied as e:
            raise ApiError(403, f"url: {e}", param="url", kind="permission_error") from None
        except ValueError as e:
            raise ApiError(400, f"url: {e}", param="url") from None
        try:  # one more than the page: whether there is a next one
            found = await asyncio.to_thread(dicomweb.search_studies, service, offset, limit + 1)
        except (dicomweb.DicomwebError, storage.AccessDenied) as e:  # the PACS refused or failed medray
            raise ApiError(502, f"url: {e}", kind="server_error") from None
        return {"object": "list", "input": url, "has_more": len(found) > limit,
                "data": [{"study_uid": s.uid, "date": s.date, "description": s.description,
                          "modalities": list(s.modalities), "instances": s.instances, "accession": s.accession}
                         for s in found[:limit]]}

    async def answers(self, job_id: str) -> Response:
        """The job's output rows as JSON lines (a download: a person opens it, a script reads it)."""
        from medray.data.shards import as_values, read_shards

        record = await asyncio.to_thread(self._job, job_id)
        rows = await asyncio.to_thread(read_shards, record["output"])
        body = "".join(json.dumps(as_values(r)) + "\n" for r in sorted(rows, key=lambda r: str(r["id"])))
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-answers.jsonl"'})

    async def report(self, job_id: str) -> HTMLResponse:
        """The job's output as a page: each row's image, question and answer, and its lineage."""
        from medray.pages import answers_page

        record = await asyncio.to_thread(self._job, job_id)
        page = await asyncio.to_thread(answers_page, record["output"], f"medray job {job_id}",
                                       image_prefixes=self.config.jobs.allowed_input_prefixes,
                                       dicomweb_servers=self.config.jobs.allowed_dicomweb_servers)
        return HTMLResponse(page)

    async def preview(self, url: str) -> Response:
        """The image as the server decodes it for the model (a DICOM windowed, a TIFF read), as
        PNG: what a browser cannot draw itself, the page shows from here."""
        image = await asyncio.to_thread(read_image, url, "url", self.config)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    async def list(self, limit: int, after: str | None) -> dict:
        """The newest jobs first, a page at a time, as OpenAI's list routes page: `limit`, and
        `after` the last id of the page before (`last_id`) while `has_more`."""
        store = self.store()
        if after is not None and not store.valid_id(after):
            raise ApiError(400, f"after must be a job id from an earlier page's last_id, not {after[:40]!r}",
                           param="after")
        records, more = await asyncio.to_thread(store.list, limit, after)
        resources = self.config.jobs.runner_resources
        waiting = no_node_offers(resources) if resources and any(r["status"] == "queued" for r in records) else None
        return {"object": "list", "data": [view(r, waiting=waiting if r["status"] == "queued" else None)
                                           for r in records],
                "first_id": records[0]["id"] if records else None,
                "last_id": records[-1]["id"] if records else None, "has_more": more}

    async def get(self, job_id: str) -> dict:
        store = self.store()

        def read() -> dict:
            record = self._ensure_runner(self._job(job_id))  # a job whose runner was lost goes on
            return view(record, cancel_requested=store.cancel_requested(job_id),
                        waiting=runner_waits(record, self.config.jobs.runner_resources))

        return await asyncio.to_thread(read)

    async def cancel(self, job_id: str) -> dict:
        store = self.store()

        def cancel() -> dict:
            record = self._job(job_id)
            if record["status"] in TERMINAL:
                raise ApiError(409, f"job {job_id} has already finished ({record['status']}); nothing to cancel",
                               code="job_finished")
            store.request_cancel(job_id)
            record = self._ensure_runner(record)  # without a live runner, this marks it cancelled
            return view(record, cancel_requested=True)

        return await asyncio.to_thread(cancel)
