"""`medray demo`: the main job on an embedded default, with what medray has so far.

Local S3 endpoint + local Ray + tiny LLaVA: the model and a few images (PNG and DICOM)
go to S3; Ray workers load the model from s3:// (through the ETag cache) and answer a
question about each image. Later stages (training, batch inference, serving) join here
as they land.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

log = logging.getLogger(__name__)

BUCKET = "medray-demo"


def _answer_in_ray(model_uri: str, image_uri: str, question: str) -> dict:
    """Runs on a Ray worker: load the model (cached per worker process) and answer."""
    from medray import storage
    from medray.data import load_image
    from medray.infer.engine import GenerationEngine, GenerationSettings, Request
    from medray.models import load_model

    t0 = time.perf_counter()
    engine = _ENGINES.get(model_uri)
    if engine is None:
        engine = _ENGINES[model_uri] = GenerationEngine(load_model(model_uri))
    image = load_image(storage.read_bytes(image_uri), image_uri)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    answer = engine.generate([Request(messages, [image])], GenerationSettings(max_new_tokens=8))[0]
    return {"image": image_uri, "question": question, "answer": answer.text,
            "seconds": round(time.perf_counter() - t0, 2)}


_ENGINES: dict = {}


def run_demo(workdir: str = "out/demo", s3_endpoint: str | None = None,
             model: str = "tiny://llava-mistral") -> str:
    """Run the demo; returns the summary table (the CLI prints it)."""
    import ray
    from pydicom.data import get_testdata_file

    from medray import storage
    from medray.data.synthetic import chest_image, png_bytes
    from medray.models import resolve_model_uri
    from medray.storage.local_s3 import LocalS3Server

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with ExitStack() as stack:
        if s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
        else:
            server = stack.enter_context(LocalS3Server())
            os.environ.update(server.env)
            log.info("local S3 endpoint on %s", server.endpoint_url)
        os.environ.setdefault("MEDRAY_CACHE_DIR", str(work / "cache"))
        store = storage.default_storage()
        try:
            store.client.create_bucket(Bucket=BUCKET)
        except store.client.exceptions.BucketAlreadyOwnedByYou:
            pass

        model_uri = f"s3://{BUCKET}/models/demo-model"
        store.upload_dir(resolve_model_uri(model), model_uri)
        images = {}
        for side in ("left", "right", "none"):
            uri = f"s3://{BUCKET}/images/chest-{side}.png"
            store.write_bytes(uri, png_bytes(chest_image(side)))
            images[uri] = "Is there an opacity?"
        dcm = f"s3://{BUCKET}/images/CT_small.dcm"
        store.write_bytes(dcm, Path(get_testdata_file("CT_small.dcm")).read_bytes())
        images[dcm] = "What modality is this?"

        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MEDRAY_"))}
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False)
        stack.callback(ray.shutdown)
        answer = ray.remote(num_cpus=1)(_answer_in_ray)
        rows = ray.get([answer.remote(model_uri, uri, q) for uri, q in images.items()])

    lines = [
        "medray demo: done in %.1f s" % (time.perf_counter() - t_start),
        f"  model     {model} -> {model_uri} (loaded by Ray workers through the S3 cache)",
        f"  cache     {os.environ['MEDRAY_CACHE_DIR']}",
    ]
    for r in rows:
        lines.append(f"  {r['image']:<40} {r['question']:<24} -> {r['answer']!r} ({r['seconds']} s)")
    lines.append("  (a random-init model answers noise; training arrives with `medray train`)")
    return "\n".join(lines)
