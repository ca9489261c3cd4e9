"""Instances fetched and decoded from a PACS per second: medray's pipeline against a plain loop.
Run by hand: `python bench/dicomweb.py [--instances 2000] [--repeat 3]`.

A local Orthanc (medray.storage.local_pacs) holds `--instances` synthetic CT instances
(`--side`: 512x512 16-bit, a CT slice's size), stored through its REST API. Measured, in turn, `--repeat` times:
- `loop`: what a user would write without medray: dicomweb-client's QIDO-RS search, page by
  page, and for each instance its WADO-RS retrieve and pydicom's pixel_array, one at a time;
- `loop, uncompressed`: the same, asking for uncompressed answers as medray does (dicomweb-client
  asks for gzip, and Orthanc's gzip of the pixels is most of its CPU per instance);
- `medray, N read tasks`: the pipeline's own parts of the search (infer.sources.plan_parts and
  RowMaker, N parts read side by side on Ray Data) and its decode stage's fetch (a batch's
  instances at once, sources.fetch_instances) and decode (medray.data.load_image), with no model:
  generation is left out, so this is the input side's speed.
Printed: instances/s of each, and each medray setting's ratio to the loop run by run, so it
shows how the ratio grows with the read tasks. Goal (issue #41): >= 2x on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _stats import add_repeat, record, spread

USER, PASSWORD = "bench", "bench-secret"


def instance(study: str, series: str, number: int, side: int) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = study, series, "BENCH", "CT"
    ds.InstanceNumber, ds.Rows, ds.Columns = number, side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.random.default_rng(number).integers(0, 4096, (side, side), dtype=np.uint16)).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def loop(root_url: str, side: int, plain: bool = False) -> int:
    """The plain client: search a page, fetch and decode each instance, one at a time. `plain`:
    asking for uncompressed HTTP answers, as medray does (dicomweb-client asks for gzip, as
    requests does by default), to show what of the ratio that choice is."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(USER, PASSWORD)
    if plain:
        session.headers["Accept-Encoding"] = "identity"
    client = DICOMwebClient(url=root_url, session=session)
    done, offset = 0, 0
    while True:
        page = client.search_for_instances(search_filters={"Modality": "CT"}, limit=100, offset=offset)
        for item in page:
            ds = client.retrieve_instance(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0],
                                          item["00080018"]["Value"][0])
            assert ds.pixel_array.shape == (side, side)
            done += 1
        if len(page) < 100:
            return done
        offset += 100


def fetch_and_decode(batch: dict) -> dict:
    from medray.data import load_image
    from medray.infer.sources import fetch_instances

    fetched = fetch_instances([str(u) for u in batch["image"]], None)
    failed = [f for f in fetched.values() if isinstance(f, Exception)]
    if failed:  # a row that fails in a run fails the bench: the rates are of whole fetches
        raise failed[0]
    sizes = [load_image(fetched[str(u)], str(u) + ".dcm").size[0] for u in batch["image"]]
    return {"width": np.array(sizes)}


def medray_pipeline(uri: str, tasks: int) -> int:
    import ray

    from medray.infer import InferConfig
    from medray.infer import sources

    cfg = InferConfig(model="m", task="caption", input=uri, output="unused")
    parts = sources.plan_parts(cfg, max_parts=tasks)
    maker = sources.RowMaker(cfg)
    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    ds = ds.flat_map(lambda row: [r for page in maker.pages(row["part"]) for r in page],
                     compute=ray.data.TaskPoolStrategy(size=len(parts)))
    ds = ds.map_batches(fetch_and_decode, batch_size=16, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=tasks))
    return sum(len(b["width"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--side", type=int, default=512, help="rows and columns of each instance (a CT slice: 512)")
    parser.add_argument("--tasks", default="1,2,4,8", help="read tasks to try, comma-separated")
    add_repeat(parser)
    args = parser.parse_args()
    os.environ["MEDRAY_DICOMWEB_USER"], os.environ["MEDRAY_DICOMWEB_PASSWORD"] = USER, PASSWORD
    from pydicom.uid import generate_uid

    from medray.raycluster import connect
    from medray.storage import local_pacs

    pacs = local_pacs.start(Path(tempfile.mkdtemp(prefix="medray-pacs-")), USER, PASSWORD)
    try:
        studies = [(generate_uid(), generate_uid()) for _ in range(20)]  # 20 studies of a series each
        for n in range(args.instances):
            pacs.store(instance(*studies[n % 20], n, args.side))
        env = {k: v for k, v in os.environ.items() if k.startswith("MEDRAY_")}
        connect("local", local={"num_cpus": 2, "include_dashboard": False}, log_to_driver=False,
                runtime_env={"env_vars": env})
        uri = pacs.root + "?Modality=CT"
        tasks = [int(t) for t in args.tasks.split(",")]
        got: dict[str, list[float]] = {}
        for r in range(args.repeat):
            for name in ["loop", "loop, uncompressed"] + [f"medray, {t} read tasks" for t in tasks]:  # in turn
                t0 = time.perf_counter()
                n = (loop(f"{pacs.http}/dicom-web", args.side, plain="uncompressed" in name) if name.startswith("loop")
                     else medray_pipeline(uri, int(name.split()[1])))
                if n != args.instances:
                    raise SystemExit(f"{name}: {n} instances, not {args.instances}")
                got.setdefault(name, []).append(n / (time.perf_counter() - t0))
                print(f"run {r + 1} {name}: {got[name][-1]:.1f} instances/s", flush=True)
    finally:
        pacs.stop()
    lines = [f"{args.instances} CT instances ({args.side}x{args.side}, 16-bit) from Orthanc on loopback, fetched "
             "(WADO-RS) and decoded; generation left out:"]
    for name, values in got.items():
        ratio = "" if name == "loop" else ", " + spread([v / b for v, b in zip(values, got["loop"])]) + "x the loop"
        lines.append(f"{name}: {spread(values, '{:.1f}')} instances/s{ratio}")
    print("\n".join("- " + line for line in lines))
    if not args.no_record:
        record("dicomweb", lines, threads=None)


if __name__ == "__main__":
    main()
