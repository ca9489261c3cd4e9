"""`medray demo`: the main job, end to end, on an embedded default.

    local S3 endpoint (moto, loopback) or local files + local Ray + tiny LLaVA
    1. a labelled synthetic radiology corpus (opacity in the left lung, the right lung or
       neither; yes/no and open questions; a quarter of the images DICOM)
    2. Ray Train: the two-stage curriculum of manifests/tiny/llava-med.yaml (alignment,
       then instruction tuning)
    3. Ray Data: batch VQA on held-out images, with the untrained and the trained model
    4. evaluation of both runs; the demo fails unless training gained `min_gain`
    5. Ray Serve: the trained model behind the API, one request over HTTP
    6. the whole run copied out to a local directory (./medray-demo), since the loopback store
       lives in memory; its records name the copy, so `medray show` follows it. Then
       `medray report` over the copy, and a Serve config for the trained model (serve.yaml)
    7. a summary of where everything went, as local paths, and the command that serves the
       trained model

Every step is the same code a production run uses; only the sizes are small. Options point
it at a real model, a corpus of your own, or an existing cluster.

What the run leaves behind (its local copy, serve.yaml, the paths the summary names) is
medray.demo_results'.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BUCKET = "medray-demo"
MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "tiny" / "llava-med.yaml"


class DemoFailed(RuntimeError):
    """The run finished but did not show what it exists to show (training must help)."""


@dataclass
class DemoOptions:
    workdir: str = "out/demo"
    """Local working files (cache, and the store itself with local_files)."""
    results: str = "medray-demo"
    """Where the run is copied at the end (corpus, stages, answers, eval, report.html)."""
    model: str = "tiny://llava-mistral"
    """The base model: a directory, s3:// or tiny://."""
    corpus: str | None = None
    """A prefix holding align/, instruct/ and test/ records.jsonl; synthesized there if absent."""
    address: str | None = None
    """An existing Ray cluster (its nodes must reach the same S3 store)."""
    s3_endpoint: str | None = None
    """An S3-compatible endpoint to use instead of starting one on loopback."""
    local_files: bool = False
    """Keep everything in workdir/store instead of S3."""
    manifest: str = str(MANIFEST)
    instruct_steps: int = 400
    """Instruction-tuning steps (the shipped tiny manifest runs 48)."""
    test_images: int = 48
    min_gain: float = 0.3
    """Required accuracy gain of the trained model over the untrained one."""
    timings: dict = field(default_factory=dict)


def _root(opts: DemoOptions, stack: ExitStack) -> tuple[str, dict]:
    """Where the corpus, runs and answers live (s3://medray-demo or workdir/store), and the
    environment Ray's workers need to reach it."""
    from medray import storage
    from medray.storage.local_s3 import LocalS3Server

    work = Path(opts.workdir).resolve()
    os.environ.setdefault("MEDRAY_CACHE_DIR", str(work / "cache"))
    if opts.local_files:
        return str(work / "store"), storage.forwardable_env()
    keys: dict = {}
    if opts.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = opts.s3_endpoint
    elif not os.environ.get("AWS_ENDPOINT_URL") or opts.address is None:
        server = stack.enter_context(LocalS3Server())
        os.environ.update(server.env)
        keys = server.env  # the loopback server's throwaway keys: no secret
        log.info("local S3 endpoint on %s", server.endpoint_url)
    store = storage.default_storage()
    try:
        store.client.create_bucket(Bucket=BUCKET)
    except (store.client.exceptions.BucketAlreadyOwnedByYou, store.client.exceptions.BucketAlreadyExists):
        pass
    return f"s3://{BUCKET}", {**storage.forwardable_env(), **keys}


def _corpus(opts: DemoOptions, root: str) -> dict[str, str]:
    """records.jsonl URIs for align / instruct / test; synthesized where missing."""
    from medray import storage
    from medray.data.synthetic import write_synthetic

    base = opts.corpus or storage.join(root, "corpus")
    # Instruction data in the test's question style: single-turn yes/no and open "where" questions.
    kinds = {"align": ("chest-captions", 64, 1), "instruct": ("chest-vqa", 256, 2),
             "test": ("chest-vqa", opts.test_images, 7)}  # seed 7: images training never saw
    out = {}
    for part, (kind, n, seed) in kinds.items():
        uri = storage.join(base, part, "records.jsonl")
        if not storage.exists(uri):
            write_synthetic(kind, storage.join(base, part), n=n, seed=seed)
        out[part] = uri
    return out


def _curriculum(opts: DemoOptions, root: str, corpus: dict[str, str]):
    from medray import storage
    from medray.train import load_manifest

    # The shipped tiny recipe, run longer on one worker per stage: on 2 CPUs one process
    # steps several times faster than two sharing them. Measured in one process: the answer
    # format is learnt in ~50 steps at batch 16, answers that depend on the image only after
    # ~200 (accuracy 0.63 at 150 steps, 0.81 at 400).
    one_worker = ["workers=1", "cpus_per_worker=1", "micro_batch_size=16", "global_batch_size=16"]
    return load_manifest(opts.manifest, [
        f"base_model={opts.model}",
        f"output={storage.join(root, 'runs', 'demo')}",
        f"stages.align.data={{records: {corpus['align']}}}",
        "stages.align.max_steps=20",
        f"stages.instruct.data={{records: {corpus['instruct']}}}",
        f"stages.instruct.max_steps={opts.instruct_steps}",
        f"stages.instruct.checkpoint_every={max(opts.instruct_steps // 2, 1)}",
        "stages.instruct.schedule=constant",
    ] + [f"stages.{stage}.{o}" for stage in ("align", "instruct") for o in one_worker])


def _batch_vqa(model: str, test_records: str, output: str):
    from medray.infer import InferConfig, run_inference

    return run_inference(InferConfig(model=model, input=test_records, output=output, task="vqa",
                                     max_new_tokens=6, batch_size=16, rows_per_shard=16), progress=False)


def _score(report: dict) -> float:
    """One number per run, the report's "overall" (medray.eval.corrected_scores)."""
    return report["vqa"]["corrected"]["overall"] or 0.0


def _example(test_records: str, answers: str):
    """A held-out DICOM record for the served request and the summary's example: one the
    trained model answered right in the batch run, where there is one (a newcomer asks it
    next, in the web page)."""
    from medray.data import read_records
    from medray.data.shards import read_shards
    from medray.eval import answer_right

    got = {str(r["id"]): r.get("answer") or "" for r in read_shards(answers)}
    dicoms = [r for r in read_records(test_records) if str(r.image).endswith(".dcm")]
    right = [r for r in dicoms if answer_right(got.get(str(r.id), ""), r.answer)]
    return (right or dicoms)[0]


def _serve_one(model: str, record) -> dict:
    import httpx
    from ray import serve

    from medray import storage
    from medray.serve import build_app
    from medray.storage.local_s3 import free_port

    image = storage.read_bytes(record.image)
    key = "sk-demo-" + secrets.token_hex(8)  # a throwaway key: the API never runs open
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"name": "demo", "uri": model, "cpus_per_replica": 0.5}],
                         "api_keys": [key]}), name="demo", route_prefix="/")
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {key}"}, timeout=120, json={
                                  "model": "demo", "max_tokens": 6, "messages": [{"role": "user", "content": [
                                      {"type": "image_url", "image_url": {
                                          "url": "data:application/dicom;base64," + base64.b64encode(image).decode()}},
                                      {"type": "text", "text": record.question}]}]})
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
    finally:
        # Not waited for: under Serve's HAProxy mode a deleted ingress keeps answering for 30 s
        # (so that load balancers notice), and nothing here needs it gone before the summary.
        serve.delete("demo", _blocking=False)
    return {"image": record.image, "question": record.question, "answer": answer, "reference": record.answer}


def run_demo(opts: DemoOptions | None = None) -> str:
    """Run the demo; returns the summary table (the CLI prints it). Raises DemoFailed when the
    trained model does not beat the untrained one by `min_gain`."""
    import ray

    from medray import storage
    from medray.eval import evaluate, write_report
    from medray.raycluster import connect
    from medray import demo_results as results_of
    from medray.report import write_html_report
    from medray.train import run_curriculum

    opts = opts or DemoOptions()
    t_start = time.perf_counter()
    t = opts.timings
    with ExitStack() as stack:
        root, env = _root(opts, stack)
        connect(opts.address, local={"num_cpus": 2, "include_dashboard": False},
                runtime_env={"env_vars": env}, log_to_driver=False)
        stack.callback(ray.shutdown)

        t0 = time.perf_counter()
        corpus = _corpus(opts, root)
        t["corpus"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        before = _batch_vqa(opts.model, corpus["test"], storage.join(root, "answers", "untrained"))
        t["vqa untrained"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stages = run_curriculum(_curriculum(opts, root, corpus))
        trained = stages[-1].model
        t["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        after = _batch_vqa(trained, corpus["test"], storage.join(root, "answers", "trained"))
        t["vqa trained"] = time.perf_counter() - t0

        reports = {}
        for name, summary in (("untrained", before), ("trained", after)):
            reports[name] = evaluate(summary.output, corpus["test"])
            write_report(reports[name], storage.join(root, "eval", name))
        scores = {name: _score(r) for name, r in reports.items()}

        t0 = time.perf_counter()
        served = _serve_one(trained, _example(corpus["test"], after.output))
        t["serve"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = results_of.copy_out(root, opts.results)
        # From the copy, whose records name the copy: the page names paths that stay. Its
        # sample images are read while the store is still up.
        write_html_report(results)
        serve_config = results_of.write_serve_config(results, results_of.local_path(trained, root, results))
        t["report"] = time.perf_counter() - t0

    gain = scores["trained"] - scores["untrained"]
    local = lambda uri: results_of.local_path(uri, root, results)  # noqa: E731  where the copy holds it
    rows = [
        ("corpus", local(opts.corpus or storage.join(root, "corpus")), "align / instruct / test records + images"),
        *[(f"stage {s.name}", local(s.model), f"{'skipped (done)' if s.skipped else f'{s.seconds:.0f} s'}")
          for s in stages],
        ("answers untrained", local(before.output), f"{before.rows + before.skipped} rows"),
        ("answers trained", local(after.output), f"{after.rows + after.skipped} rows"),
        ("eval untrained", local(storage.join(root, "eval", "untrained")), _describe(reports["untrained"])),
        ("eval trained", local(storage.join(root, "eval", "trained")), _describe(reports["trained"])),
        ("served once", "the trained model, through the Serve app over HTTP (stopped since)",
         f"{served['question']} -> {served['answer']!r} (reference {served['reference']!r})"),
        ("report", str(Path(results) / "report.html"), "curves, accuracy before/after, samples, provenance"),
        ("lineage", f"{results_of.medray_command()} show {local(after.output)}",
         "what made the trained answers, down to the base model"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"medray demo: done in {time.perf_counter() - t_start:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in t.items())})"]
    lines += [f"  {name:<{width}}  {where}\n  {'':<{width}}    {what}" for name, where, what in rows]
    lines.append(f"  overall accuracy {scores['untrained']:.2f} untrained -> {scores['trained']:.2f} trained "
                 f"(gain {gain:+.2f}, required {opts.min_gain:+.2f}; overall: the mean of closed accuracy and "
                 "open exact match)")
    example = local(served["image"])
    lines += ["", "Serve the trained model (Ctrl-C stops it):",
              f"  MEDRAY_API_KEYS=sk-local {results_of.medray_command()} serve {serve_config}",
              "then open http://127.0.0.1:8000/ with the API key sk-local, or use any OpenAI client, and ask about",
              f"a DICOM of the held-out images, e.g. {example}: {served['question']!r} (reference "
              f"{served['reference']!r})."]
    summary = "\n".join(lines)
    if gain < opts.min_gain:
        raise DemoFailed(summary + "\n  training did not improve the model enough")
    return summary


def _describe(report: dict) -> str:
    c = report["vqa"]["corrected"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"overall {fmt(c['overall'])}: closed accuracy {fmt(c['closed_accuracy'])}, open exact match "
            f"{fmt(c['exact_match'])} ({report['matched']} questions)")
