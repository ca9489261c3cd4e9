"""The input of a batch run as Ray Data read tasks: listed and read inside the pipeline.

The driver only plans the parts (`plan_parts`: a bounded number of list requests, or a
Parquet footer), whatever the corpus holds. Each read task then, for its part:
- lists its key range of an image prefix, or reads its rows of a records file, a page at a
  time (medray.storage.list_range, medray.data.streams);
- turns each page into input rows with stable ids (`RowMaker`: the prefix-relative key of
  an image, the id of a record, or its position in the file);
- drops the rows the output already holds (the done index, medray.infer.ledger) and tells
  the ledger what it listed, skipped and the listing's digest;
- waits while the rows listed and not yet answered reach InferConfig.max_rows_ahead (a
  smaller bound until the first shard is written: `ledger.may_list`): what waits in the
  object store stays bounded, however far ahead a fast listing could run;
- yields the rest, a page at a time, so preprocessing starts on the first pages while the
  rest of the corpus is still being listed (pipeline.BLOCK_BYTES says how Ray Data cuts them).

A PACS search is paged the same way (QIDO-RS, `SearchPart`); its instances are fetched later,
by the decode tasks, a batch's at once (`fetch_instances`, WADO-RS).

A row a records file cannot describe (not JSON, not a record, an unknown adapter) stays a
row, with its error: it fails alone, in the output.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medray import storage
from medray.storage import dicomweb
from medray.data.records import RecordError
from medray.data.streams import FilePart, is_records_file, read_part, split_records_file
from medray.digests import SetDigest

from .options import InferConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
COLUMNS = ("id", "image", "question", "references", "adapter", "error")
# A row's part of the input's digest: what it asks of the model (image bytes are not read twice).
LISTING_FIELDS = ("id", "image", "question", "references", "adapter")
# Parts a run's input is read in: key ranges listed side by side, or runs of Parquet row groups.
MAX_PARTS = 32
AHEAD_WAIT_S = 0.2
# A read task's tables stay under this (in whole batches): Ray Data joins them up to
# pipeline.BLOCK_BYTES (128 KiB) and cuts a block over 1.5 times that at any row.
CHUNK_BYTES = 40 << 10


@dataclass(frozen=True)
class SearchPart:
    """Every `of`-th page of a DICOMweb search (QIDO-RS `offset`/`limit`), from page `first`:
    the parts of a search read its pages side by side, and a page shorter than PAGE ends each
    part, so the driver never lists the matches (a server tells no count up front)."""

    uri: str
    first: int
    of: int


DICOMWEB_PAGE = 100
DICOMWEB_PARTS = 8


@dataclass(frozen=True)
class Part:
    """One read task's share of the input: a key range of a prefix, part of a records file, or
    pages of a DICOMweb search."""

    index: int
    keys: storage.KeyRange | None = None
    file: FilePart | None = None
    search: SearchPart | None = None


def plan_parts(cfg: InferConfig, max_parts: int = MAX_PARTS) -> list[Part]:
    """The parts of the run's input: the driver's whole share of the listing."""
    if cfg.sr_output and dicomweb.is_dicomweb(cfg.sr_output):  # SRs go only where a PACS is allowed
        dicomweb.check_allowed(cfg.sr_output, cfg.allowed_dicomweb_servers)
    if dicomweb.is_dicomweb(cfg.input):
        dicomweb.check_allowed(cfg.input, cfg.allowed_dicomweb_servers)
        dicomweb.check_access(cfg.input)  # a refused credential fails the run here, naming the server
        n = min(max_parts, DICOMWEB_PARTS)
        return [Part(i, search=SearchPart(cfg.input, i, n)) for i in range(n)]
    if is_records_file(cfg.input):
        return [Part(i, file=f) for i, f in enumerate(split_records_file(cfg.input, max_parts))]
    return [Part(i, keys=r) for i, r in enumerate(storage.split_prefix(cfg.input, max_parts))]


def _error_row(id_: str, error: str) -> dict:
    return {"id": id_, "image": "", "question": "", "references": "", "adapter": "", "error": error}


class RowMaker:
    """Pages of input rows ({COLUMNS}) from one part."""

    def __init__(self, cfg: InferConfig):
        self.cfg = cfg

    def pages(self, part: Part) -> Iterator[list[dict]]:
        if part.search is not None:
            service, page = dicomweb.parse(part.search.uri), part.search.first
            while True:
                found = dicomweb.search_instances(service, page * DICOMWEB_PAGE, DICOMWEB_PAGE)
                # The instance's SOP Instance UID is its id; the row's image, its WADO-RS URI. A
                # multi-frame instance is one row: its middle frame (medray.data.images' DICOM rule).
                rows = [{"id": i.sop_uid, "image": i.uri(service), "question": "", "references": "",
                         "adapter": "", "error": ""} for i in found]
                if rows:
                    yield rows
                if len(found) < DICOMWEB_PAGE:
                    return
                page += part.search.of
        if part.keys is not None:
            for files in storage.list_range(part.keys, include=self.cfg.include, exclude=self.cfg.exclude):
                rows = [self._image_row(f.uri) for f in files if f.uri.lower().endswith(IMAGE_SUFFIXES)]
                if rows:
                    yield rows
            return
        parser = None
        for page in read_part(part.file):
            if parser is None:
                parser = self._parser(part.file, page[0][1])
            yield [self._record_row(parser, n, raw) for n, raw in page]

    def _image_row(self, uri: str) -> dict:
        # The id as listings always gave it: the key relative to the input prefix.
        base = self.cfg.input.rstrip("/") + "/"
        return {"id": uri[len(base):] if uri.startswith(base) else uri, "image": uri, "question": "",
                "references": "", "adapter": "", "error": ""}

    def _parser(self, part: FilePart, first_row):
        from medray.data.records import RecordParser
        from medray.data.streams import cop_base

        parser = RecordParser(part.uri, first_row if isinstance(first_row, dict) else {}, image_root=self.cfg.image_folder)
        if parser.kind == "mcqa" and isinstance(first_row, dict) and "cop" in first_row:
            parser.context = {"cop_base": cop_base(part)}
        return parser

    def _record_row(self, parser, n: int, raw) -> dict:
        if isinstance(raw, RecordError):  # a line that is not JSON
            return _error_row(str(n), f"RecordError: {raw}")
        try:
            rec = parser.parse(raw, n)
        except RecordError as e:
            return _error_row(e.id or str(n), f"RecordError: {e}")
        question, answer = rec.query()
        error = ""
        if rec.adapter and rec.adapter not in self.cfg.adapters:
            error = (f"the row names adapter {rec.adapter!r}, which this run does not have; its named "
                     f"adapters: {sorted(self.cfg.adapters) or 'none'} (--adapters)")
        return {"id": str(rec.id), "image": rec.image or "", "question": question or "",
                "references": json.dumps(answer) if answer is not None else "", "adapter": rec.adapter or "",
                "error": error}


def check_input(cfg: InferConfig, parts: list[Part]) -> None:
    """Fail before anything runs on an input that cannot be read at all: a records file whose
    first row is no record of any kind, or that is not there. Reads the first page only."""
    first = next((p for p in parts if p.file is not None), None)
    if first is None:
        return
    try:
        page = next(iter(read_part(first.file)), [])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the input {cfg.input} does not exist") from e
    if page:
        if not isinstance(page[0][1], dict):  # the first line is not JSON: not a records file at all
            raise page[0][1] if isinstance(page[0][1], Exception) else RecordError(
                f"{cfg.input}: its first row is {type(page[0][1]).__name__}, not an object")
        RowMaker(cfg)._parser(first.file, page[0][1])  # raises RecordError: the kind cannot be told


def read_part_rows(part: Part, *, cfg: dict, index_ref, ledger) -> Iterator:
    """The body of one read task: the part's rows that the output does not hold yet, in
    blocks of whole batches, with the ledger told about every page."""
    import ray

    from .ledger import contains, id_keys, load_index

    conf = InferConfig.model_validate(cfg)
    index = load_index(index_ref)
    ledger.begin.remote(part.index)
    chunks = _Chunker(conf.batch_size)
    for rows in RowMaker(conf).pages(part):
        while not ray.get(ledger.may_list.remote()):
            time.sleep(AHEAD_WAIT_S)
        digest = SetDigest().update([r[k] for k in LISTING_FIELDS] for r in rows)
        done = contains(index, id_keys(r["id"] for r in rows)) if len(index) else None
        kept = rows if done is None else [r for r, d in zip(rows, done) if not d]
        ledger.add.remote(part.index, len(rows), len(rows) - len(kept), str(digest))
        yield from chunks.add(kept)
    yield from chunks.flush()
    # Waited on: the ledger has every count of this part before the task ends, so once the
    # stream has ended the driver reads final numbers.
    ray.get(ledger.finish.remote(part.index))


class _Chunker:
    """Rows into tables of whole batches (batch_size rows, a multiple of it), each under
    CHUNK_BYTES: Ray Data joins a task's tables into blocks of pipeline.BLOCK_BYTES and
    would cut a larger one at any row, leaving a batch split in two; a part's last table
    may hold a partial batch."""

    def __init__(self, batch_size: int):
        self.batch_size, self.rows = batch_size, []

    def add(self, rows: list[dict]) -> Iterator:
        self.rows += rows
        if len(self.rows) < self.batch_size:
            return
        size = sum(len(str(r["id"])) + len(r["image"]) + len(r["question"]) + len(r["references"]) + 16
                   for r in self.rows[:self.batch_size])
        per = self.batch_size * max(1, CHUNK_BYTES // max(1, size))
        whole = len(self.rows) - len(self.rows) % self.batch_size
        for start in range(0, whole, per):
            yield _table(self.rows[start:min(start + per, whole)])
        self.rows = self.rows[whole:]

    def flush(self) -> Iterator:
        if self.rows:
            yield _table(self.rows)
        self.rows = []


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({c: [r[c] for r in rows] for c in COLUMNS})


class InputSource(Datasource):
    """The run's input for ray.data.read_datasource: one read task per part (read_part_rows)."""

    def __init__(self, cfg: InferConfig, parts: list[Part], index_ref, ledger):
        self.conf, self.parts, self.index_ref, self.ledger = cfg.model_dump(mode="json"), parts, index_ref, ledger

    def estimate_inmemory_data_size(self):
        return None  # unknown until listed: that is the point

    def get_name(self) -> str:
        return "MedrayInput"

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(functools.partial(read_part_rows, part, cfg=self.conf, index_ref=self.index_ref,
                                           ledger=self.ledger), meta) for part in self.parts]


FETCH_THREADS = 8


def fetch_instances(uris: list[str], allowed: list[str] | None) -> dict:
    """uri -> the instance's bytes, or the exception that fetching it raised (its row fails
    alone); an instance on a server not `allowed` is not asked for."""
    if not uris:
        return {}

    def fetch(uri):
        try:
            dicomweb.check_allowed(uri, allowed)
            return dicomweb.fetch_instance(uri)
        except Exception as e:
            return e

    return dict(zip(uris, _fetch_pool().map(fetch, uris)))


@functools.cache
def _fetch_pool() -> ThreadPoolExecutor:
    # Kept for the process: its threads keep their HTTP sessions (dicomweb._session), and with
    # them their connections to the PACS, from batch to batch.
    return ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="dicomweb-fetch")
