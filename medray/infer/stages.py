"""The two stages of the batch pipeline, callable without Ray: `preprocess` (CPU: read,
decode, prompt, processor; errors stay on their row) and `Generator` (one model: generate,
then write the rows as one shard); and their packed forms, which the pipeline runs
(`preprocess_packed`, `PackedGenerator`: one Ray Data row per preprocessed batch)."""

from __future__ import annotations

import functools
import json
import pickle
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import numpy as np

from medray import storage
from medray.storage import dicomweb
from medray.data import shards
from medray.engines import ENGINES
from medray.engines.types import Encoded, Request

from .experts import Experts, encode_for_expert
from .options import InferConfig, adapter_role
from .prompts import messages_for
from .sources import fetch_instances

if TYPE_CHECKING:
    from medray.engines.protocol import BatchEngine

_PROCESSORS: dict = {}
# Rows without an image carry an empty array, so the columns stay tensor columns.
_NO_PIXELS = np.zeros((0, 0, 0, 0), dtype=np.float32)
_NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
# Held while a Generator of this process loads its model on a thread of its own. transformers
# imports its parts lazily, and two threads importing them at once failed ("cannot import
# name 'AutoProcessor'") where Ray Data fused preprocess into the generation actor: there,
# preprocess waits for the load, as it did when the actor loaded before it started.
_LOADING = threading.Lock()


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


class _ListedError(Exception):
    """An error the listing already put on the row (a records row that could not be read)."""


def preprocess(batch: dict, *, cfg: dict) -> dict:
    """CPU stage: read bytes, decode, render the prompt, run the processor. Errors stay per row."""
    from medray.data import ImageOptions, load_image

    # Imported here, with torch: a preprocess task handed an empty block (every row of a rerun
    # done) then starts without importing it, which was a second of such a rerun.
    from medray.engines.encoding import encode_request

    with _LOADING:  # free, unless a model loads in this very process (see _LOADING)
        pass
    conf = InferConfig.model_validate(cfg)
    expand = ENGINES[conf.engine].expands_images  # the run's engine, as chosen: its prompt form
    n = len(batch["id"])
    # A PACS answers each WADO-RS request in its own time: the batch's instances are asked for
    # at once, so a task waits on the server once per batch, not once per row.
    fetched = fetch_instances([str(u) for u in batch["image"] if dicomweb.is_dicomweb(str(u))],
                              conf.allowed_dicomweb_servers)
    input_ids, pixels, errors, questions, kinds, prepared, image_kwargs = [], [], [], [], [], [], []
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
            if uri and dicomweb.is_dicomweb(uri):
                pass  # checked against the allowed servers as it was fetched (fetch_instances)
            elif uri and conf.allowed_image_prefixes is not None and not storage.within(uri, conf.allowed_image_prefixes):
                raise PermissionError(f"{uri} is outside the allowed input prefixes {conf.allowed_image_prefixes}")
            if uri and dicomweb.is_dicomweb(uri):  # fetched for the whole batch at once, above
                data = fetched[uri]
                if isinstance(data, Exception):
                    raise data
                if len(data) > conf.max_image_bytes:
                    raise ValueError(f"{uri} is {len(data)} bytes, over the limit of {conf.max_image_bytes}")
                images = [load_image(data, uri + ".dcm", ImageOptions(max_pixels=conf.max_pixels))]
            elif uri:
                size = storage.default_storage().size(uri)
                if size > conf.max_image_bytes:
                    raise ValueError(f"{uri} is {size} bytes, over the limit of {conf.max_image_bytes}")
                images = [load_image(storage.read_bytes(uri), uri, ImageOptions(max_pixels=conf.max_pixels))]
            kind = ""
            if conf.experts is not None:
                # The generation stage prompts the LLM; here only the expert's input is prepared.
                if not images:
                    raise ValueError("row has no image")
                kind, enc = encode_for_expert(images[0], conf.experts, _processor)
            else:
                processor, family = _processor(conf.model)
                if not images and family.kind != "text":
                    raise ValueError("row has no image")
                enc = encode_request(processor, Request(messages_for(conf.task, family.kind, question, bool(images)),
                                                        images), expand=expand)
            input_ids.append(np.asarray(enc.input_ids if enc else [], dtype=np.int64))
            pixels.append(enc.pixel_values if enc else None)
            prepared.append(enc.images[0] if enc and enc.images else None)
            image_kwargs.append(json.dumps(enc.image_kwargs) if enc and enc.image_kwargs else "")
            errors.append("")
            kinds.append(kind)
        except Exception as e:  # recorded on the row; the job goes on
            input_ids.append(np.zeros(0, dtype=np.int64))
            pixels.append(None)
            prepared.append(None)
            image_kwargs.append("")
            errors.append(str(e) if isinstance(e, _ListedError) else f"{type(e).__name__}: {e}")
            kinds.append("")
        if pixels[-1] is None:
            pixels[-1] = _NO_PIXELS
        if prepared[-1] is None:
            prepared[-1] = _NO_IMAGE
    out = {k: batch[k] for k in ("id", "image", "references")}
    out["adapter"] = batch["adapter"] if "adapter" in batch else np.array([""] * n, dtype=object)
    out["question"] = np.array(questions, dtype=object)
    out["input_ids"] = np.array(input_ids + [None], dtype=object)[:-1]  # keep a 1-D object array
    out["pixel_values"] = np.array(pixels + [None], dtype=object)[:-1]
    out["image_rgb"] = np.array(prepared + [None], dtype=object)[:-1]
    out["image_kwargs"] = np.array(image_kwargs, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    out["image_type"] = np.array(kinds, dtype=object)
    return out


class Generator:
    """Actor stage: one model per actor; generates over the preprocessed rows, then writes them
    as one shard.

    Writing from the actor instead of a separate task stage is deliberate: on small machines
    the extra stage of short tasks stalled the stream (measured 4-7x fewer rows/s, see
    bench/infer.py). A retried call sees the same rows, so it rewrites the same shard name.

    `engine_for(model, adapter)` makes the engines (the LLM's and the experts'; with
    `adapters=` when the run names adapters); tests pass their own, and Ray Data uses the
    registry's loader for the run's engine (medray.engines.ENGINES).
    """

    def __init__(self, cfg: dict, engine_for: Callable[..., BatchEngine] | None = None,
                 record: dict | None = None):
        self.cfg = InferConfig.model_validate(cfg)
        # The run's provenance (medray.provenance): its digests go into every row, and the
        # whole record into every Parquet shard's metadata.
        self.record = record
        entry = ENGINES[self.cfg.engine]
        if engine_for is None:
            engine_for = functools.partial(entry.load_batch(), options=entry.options_of(self.cfg))

        def load():
            engine = engine_for(self.cfg.model, self.cfg.adapter,
                                **({"adapters": self.cfg.adapters} if self.cfg.adapters else {}))
            return engine, Experts(self.cfg.experts, engine_for) if self.cfg.experts is not None else None

        if entry.loads_in_start:  # on the actor's own thread (vLLM is tested to start so)
            self._loaded: Future = Future()
            self._loaded.set_result(load())
        else:
            # Loaded beside the actor's start, not before it counts as started: Ray Data sends
            # an actor even an empty block (a rerun with every row done), and waiting seconds
            # for a model to answer nothing was most of such a rerun. The first batch waits
            # for the load; a load that fails raises there, in every call.
            _LOADING.acquire()  # here, so that no preprocess of this process can start before it

            def load_then_release():
                try:
                    return load()
                finally:
                    _LOADING.release()

            pool = ThreadPoolExecutor(1, thread_name_prefix="medray-load")
            self._loaded = pool.submit(load_then_release)
            pool.shutdown(wait=False)  # its one thread ends with the load
        # What made each answer: the decoding settings, the engine, and the model and adapter
        # (by URI, and by digest where the run recorded them).
        adapters = self.cfg.all_adapters()
        digests = {a["role"]: a["digest"] for a in (record or {}).get("inputs", [])}
        self.generation = {name: json.dumps({**self.cfg.settings.model_dump(mode="json"), "engine": self.cfg.engine,
                                             "adapter": adapters.get(name), "model_digest": digests.get("model"),
                                             "adapter_digest": digests.get(adapter_role(name)) if name else None})
                           for name in [None, *adapters]}

    @property
    def engine(self) -> BatchEngine:
        return self._loaded.result()[0]

    @property
    def experts(self) -> Experts | None:
        return self._loaded.result()[1]

    @staticmethod
    def _encoded(batch: dict, i: int) -> Encoded:
        pixels, image = batch["pixel_values"][i], batch["image_rgb"][i]
        kwargs = str(batch["image_kwargs"][i])
        return Encoded(batch["input_ids"][i].tolist(), np.array(pixels) if pixels.size else None,
                       [np.asarray(image)] if image.size else None, json.loads(kwargs) if kwargs else None)

    def __call__(self, batch: dict) -> dict:
        generated = self.generate(batch)
        if self.cfg.sr_output:  # before the shard: a row in the output has its SR (reports.py)
            self.reports(generated)
        return _write_batch(generated, output=self.cfg.output, fmt=self.cfg.format,
                            metadata={shards.PROVENANCE_KEY: json.dumps(self.record)} if self.record else None)

    def reports(self, batch: dict) -> None:
        """The batch's answers as DICOM SRs; a row whose SR failed keeps its answer and says so."""
        from .reports import write_reports

        digest = next((a["digest"] for a in (self.record or {}).get("inputs", []) if a["role"] == "model"), "")
        rows = [{c: str(batch[c][i]) for c in ("id", "image", "question", "answer", "error")}
                for i in range(len(batch["id"]))]
        failed = write_reports(rows, sr_output=self.cfg.sr_output, model=self.cfg.model, model_digest=digest or "",
                               run=self.cfg.output)
        if failed:
            batch["error"] = np.array([failed.get(str(i), e) for i, e in zip(batch["id"], batch["error"])],
                                      dtype=object)

    def generate(self, batch: dict) -> dict:
        n = len(batch["id"])
        answers = [""] * n
        completion = np.zeros(n, dtype=np.int64)
        latency = np.zeros(n, dtype=np.float64)
        errors = np.array(batch["error"], dtype=object)
        ok = [i for i in range(n) if not errors[i]]
        expert_texts = [""] * n
        encoded_of = lambda i: self._encoded(batch, i)  # noqa: E731
        if self.experts is not None:
            for i, text in self.experts.read(batch["image_type"], encoded_of, ok, self.cfg.batch_size).items():
                expert_texts[i] = text
            encoded_of = lambda i: self.engine.encode(self.experts.llm_request(  # noqa: E731
                str(batch["question"][i]), expert_texts[i], str(batch["image_type"][i])))
        # vLLM takes the shard's rows at once and batches them step by step itself.
        size = max(1, len(ok)) if self.engine.continuous else self.cfg.batch_size
        names = [self.cfg.row_adapter(str(batch["adapter"][i]) if "adapter" in batch else None) for i in range(n)]
        for start in range(0, len(ok), size):
            chunk = ok[start: start + size]
            t0 = time.perf_counter()
            # Named per row when the run names adapters: rows of different adapters (and the
            # base model's) share the call. Otherwise the engine's one adapter answers all.
            results = self.engine.generate_encoded([encoded_of(i) for i in chunk], self.cfg.settings,
                                                   **({"adapters": [names[i] for i in chunk]}
                                                      if self.cfg.adapters else {}))
            dt = time.perf_counter() - t0
            for i, r in zip(chunk, results):
                if isinstance(r, Exception):  # a row the engine refused (RequestRejected): it fails alone
                    errors[i] = f"{type(r).__name__}: {r}"
                    continue
                answers[i], completion[i], latency[i] = r.text, r.completion_tokens, dt
        uids = [dicomweb.uids_of(str(uri)) for uri in batch["image"]]  # a PACS instance's study, series
        return shards.block(
            id=batch["id"], image=batch["image"], question=batch["question"],
            answer=np.array(answers, dtype=object), references=batch["references"],
            model=np.array([self.cfg.model] * n, dtype=object),
            generation=np.array([self.generation.get(name, self.generation[None]) for name in names],
                                dtype=object),  # a row naming an unknown adapter failed alone
            latency_s=latency, completion_tokens=completion, error=errors,
            image_type=batch["image_type"], expert_text=np.array(expert_texts, dtype=object),
            study_uid=np.array([u[0] for u in uids], dtype=object),
            series_uid=np.array([u[1] for u in uids], dtype=object),
        )


def _write_batch(batch: dict, *, output: str, fmt: str, metadata: dict[str, str] | None = None) -> dict:
    """Write a generated batch as one shard (medray.data.shards); returns one row that says what
    it holds, all the driver counts: rows, errors, generated tokens, the answers' set digest and
    the first few errors."""
    info = shards.write_shard({c: [x.item() if hasattr(x, "item") else x for x in batch[c]] for c in shards.COLUMNS},
                              output=output, fmt=fmt, metadata=metadata)
    failed = [f"{i}: {e}" for i, e in zip(batch["id"], batch["error"]) if e]
    return {"rows": np.array([len(info.ids)]), "errors": np.array([len(failed)]),
            "tokens": np.array([int(np.sum(batch["completion_tokens"]))]),
            "answers": np.array([info.answers], dtype=object),
            "first_errors": np.array([json.dumps(failed[:5])], dtype=object)}


# Ray Data cuts a task's output into blocks by bytes, not rows: preprocessed rows of a few KB
# came out of a task in blocks of 8-12, and the actor's bundles of rows_per_shard + a few
# became a full generate call and a call of the few (measured: the pipeline at half the
# bare loop's rate). Packed, one preprocessed batch is one row, which Ray Data never cuts:
# every generate call gets the batch preprocess made, and every actor call a whole shard.
def preprocess_packed(batch: dict, *, cfg: dict) -> dict:
    """`preprocess`, its output as one row: {"rows": n, "packed": the batch, pickled}."""
    out = preprocess(batch, cfg=cfg)
    return {"rows": np.array([len(out["id"])]),
            "packed": np.array([pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)], dtype=object)}


def unpack(packed: dict) -> dict:
    """The rows of packed batches, as one batch (columns concatenated)."""
    parts = [pickle.loads(p) for p in packed["packed"]]
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class PackedGenerator(Generator):
    """Generator over packed batches: each call's packed rows make one shard."""

    def __call__(self, packed: dict) -> dict:
        return super().__call__(unpack(packed))
