"""Losing a whole node, as a preempted spot instance or an OOM-killed raylet does: batch
inference and serving on a head and two worker nodes (tests/_raycluster.py), each node one
`ray start` process group, killed at once mid-work."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from medray import storage
from medray.data.shards import read_shards
from medray.data.synthetic import chest_image, png_bytes, write_synthetic
from medray.raycluster import SERVE_FAST_PATH_ENV

from _raycluster import BIN, NodeCluster, listeners, wait_for

REPO = Path(__file__).resolve().parents[1]
BUCKET = "nodeloss"
KEY = "sk-node-loss"


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (1 CPU: drivers, Serve's controller) and two 2-CPU worker nodes, with the S3
    store's keys, the API key and Serve's mode in the nodes' environment, as the README says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MEDRAY_API_KEYS"] = KEY
    env.update(SERVE_FAST_PATH_ENV)  # the README's nodes: Serve's HAProxy ingress
    c = NodeCluster(env)
    c.env["MEDRAY_CACHE_DIR"] = os.path.join(c.root, "cache")
    try:
        c.start_head(num_cpus=1, resources='{"head": 1}')
        c.add_node(num_cpus=2)
        c.add_node(num_cpus=2)
        c.wait_alive(3)
        storage.default_storage().client.create_bucket(Bucket=BUCKET)
        yield c
    finally:
        c.shutdown()


@pytest.fixture(autouse=True)
def _left_as_found(cluster, request):
    """A test that fails leaves the next what it found: no job of it still running (holding
    the CPUs the next one needs), and as many worker nodes. A test that passes restores its
    nodes itself, as part of what it checks."""
    failed, workers = request.session.testsfailed, len(cluster.workers)
    yield
    if request.session.testsfailed == failed or not cluster.alive():
        return
    for job in cluster.api("/api/jobs/") or []:
        if job.get("status") in ("PENDING", "RUNNING"):
            subprocess.run([str(BIN / "ray"), "job", "stop", f"--address={cluster.dashboard}", job["submission_id"]],
                           env=cluster.env, capture_output=True, timeout=120)
    for _ in range(workers - len(cluster.workers)):
        cluster.add_node(num_cpus=2)


def _submit(cluster, entrypoint: list[str]) -> subprocess.Popen:
    """`ray job submit`, so the driver runs on the head node, which stays."""
    return subprocess.Popen([str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard}", "--", *entrypoint],
                            env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _shard_names(prefix: str) -> set[str]:
    return {f.uri for f in storage.list_files(prefix) if "/part-" in f.uri}


def test_batch_inference_loses_a_node_and_every_row_lands_exactly_once(cluster):
    corpus = f"s3://{BUCKET}/corpus"
    write_synthetic("chest-vqa", corpus, n=96, seed=21, dicom_fraction=0.25)
    good = png_bytes(chest_image("left", 64))
    bad = {"bad-truncated.png": good[:80], "bad-text.png": b"not an image", "bad-empty.jpg": b"",
           "bad-garbage.dcm": b"\x00" * 128 + b"DICM" + b"\x11" * 40}
    for name, data in bad.items():
        storage.write_bytes(f"{corpus}/images/{name}", data)
    images = sorted(f.uri.rsplit("/", 1)[1] for f in storage.list_files(f"{corpus}/images"))
    assert len(images) == 100
    out = f"s3://{BUCKET}/answers"
    # One generation actor per worker node (1.5 of its 2 CPUs), so the lost node takes one
    # actor and the rows it held with it; the other node's actor goes on.
    cmd = ["python", str(REPO / "jobs/infer.py"), "--model", "tiny://llava-mistral", "--task", "vqa",
           "--question", "Is there an opacity?", "--input", f"{corpus}/images", "--output", out,
           "--max-new-tokens", "16", "--batch-size", "4", "--rows-per-shard", "4", "--min-actors", "2",
           "--max-actors", "2", "--cpus-per-actor", "1.5", "--cpus-per-task", "0.25", "--format", "jsonl"]
    t0 = time.monotonic()
    job = _submit(cluster, cmd)
    try:
        before = wait_for(lambda: len(s := _shard_names(out)) >= 3 and s, 300, "the first shards", every=0.5)
        written_before = {r["id"] for r in read_shards(out)}
        assert len(written_before) < len(images), "the job finished before the node could be lost"
        cluster.kill(cluster.workers[-1])
        killed_at = time.monotonic() - t0
        log, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    rows = read_shards(out)
    ids = Counter(r["id"] for r in rows)
    assert sorted(ids) == images and set(ids.values()) == {1}  # every row, exactly once
    assert before <= _shard_names(out)  # what the lost node's actor had written stays written
    assert written_before <= set(ids)
    errors = {r["id"] for r in rows if r["error"]}
    assert errors == set(bad)
    assert all(r["answer"] for r in rows if not r["error"])
    print(f"\nbatch inference: node lost at {killed_at:.1f} s, job done at {time.monotonic() - t0:.1f} s")
    cluster.add_node(num_cpus=2)  # the next test starts from three nodes again
    cluster.wait_alive(3)


TRAIN_STEPS, EVERY = 16, 4


def _manifest(path: Path, output: str) -> None:
    """A 2-worker stage, one worker per worker node (1.5 of its 2 CPUs), checkpoints in S3."""
    path.write_text(yaml.safe_dump({
        "base_model": "tiny://llava-mistral", "output": output, "seed": 0,
        "stages": [{"name": "s", "data": {"synthetic": {"kind": "chest-conversations", "n": 64, "seed": 2}},
                    "train": ["projector", "llm"], "strategy": "ddp", "lr": 2e-3, "micro_batch_size": 4,
                    "global_batch_size": 8, "max_steps": TRAIN_STEPS, "max_length": 160,
                    "checkpoint_every": EVERY, "log_every": EVERY, "workers": 2, "cpus_per_worker": 1.5,
                    "max_failures": 2}]}))


def _train(cluster, manifest: Path):
    return _submit(cluster, ["python", str(REPO / "jobs/train.py"), str(manifest)])


def _weights(output: str) -> dict:

    from safetensors.torch import load

    return load(storage.read_bytes(f"{output}/s/model.safetensors"))


def test_training_loses_a_workers_node_and_redoes_at_most_one_interval(cluster, tmp_path):
    import json

    import torch

    from medray.train import checkpoints

    clean, lossy = f"s3://{BUCKET}/train-clean", f"s3://{BUCKET}/train-lossy"
    _manifest(tmp_path / "clean.yaml", clean)
    _manifest(tmp_path / "lossy.yaml", lossy)
    t0 = time.monotonic()
    out, _ = _train(cluster, tmp_path / "clean.yaml").communicate(timeout=900)
    clean_s = time.monotonic() - t0
    assert "succeeded" in out.lower(), out[-3000:]

    job = _train(cluster, tmp_path / "lossy.yaml")
    try:
        t0 = time.monotonic()
        run_dir = wait_for(lambda: next((f.uri.rsplit("/", 2)[0] for f in storage.list_files(f"{lossy}/_ray")
                                         if f.uri.endswith("worker-1.json")), None), 600, "a first checkpoint")
        done = wait_for(lambda: (c := checkpoints.complete(run_dir, 2)) and c[-1][0] >= 2 * EVERY and c,
                        600, "two complete checkpoints", every=0.5)
        last_before = done[-1][0]
        assert last_before < TRAIN_STEPS, "the stage ended before the node could be lost"
        cluster.kill(cluster.workers[0])
        killed_at = time.monotonic() - t0
        # The machine's replacement joins, as an autoscaler's would: a fixed-size group of two
        # 1.5-CPU workers needs two worker nodes.
        cluster.add_node(num_cpus=2)
        out, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    lossy_s = time.monotonic() - t0
    assert job.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
    rows = [json.loads(x) for x in storage.read_text(f"{lossy}/s/metrics.jsonl").splitlines()]
    resumed = max(r["resumed_from"] for r in rows)
    assert resumed >= last_before, (resumed, last_before)  # at most one interval redone
    a, b = _weights(clean), _weights(lossy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    rel = [f.uri[len(run_dir) + 1:] for f in storage.list_files(run_dir)]
    left = {r.split("/")[0] for r in rel if r.startswith("checkpoint_") and "/" in r}
    assert len(left) <= 2, left  # the failed attempt's checkpoints did not pile up
    print(f"\ntraining: node lost at {killed_at:.1f} s (last complete checkpoint: step {last_before}), resumed "
          f"from step {resumed}; {lossy_s:.1f} s against {clean_s:.1f} s uninterrupted")


def _serve_config(path: Path) -> None:
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{"name": "medray", "route_prefix": "/", "import_path": "medray.serve:build_app",
                          "args": {"models": [{"name": "tiny", "uri": "tiny://llava-mistral", "max_batch_size": 8,
                                               "cpus_per_replica": 1.5,  # one replica per worker node
                                               "autoscaling": {"min_replicas": 2, "max_replicas": 2}}],
                                   # On the head, which stays: the lost node takes model replicas only.
                                   "ingress": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.25,
                                               "resources": {"head": 0.01}},
                                   # Job runners go to nodes with a `jobs` resource (none yet).
                                   "jobs": {"store": f"s3://{BUCKET}/jobs",
                                            "allowed_input_prefixes": [f"s3://{BUCKET}/job-corpus"],
                                            "allowed_output_prefixes": [f"s3://{BUCKET}/job-out"],
                                            "batch_size": 4, "rows_per_shard": 4, "max_actors": 1,
                                            "cpus_per_actor": 0.25, "cpus_per_task": 0.25,
                                            "runner_resources": {"jobs": 0.01}}}}],
    }
    path.write_text(yaml.safe_dump(config))


def _replicas(cluster) -> list[str]:
    """The model deployment's replica states, from the dashboard's Serve API."""
    apps = (cluster.api("/api/serve/applications/") or {}).get("applications") or {}
    deployment = ((apps.get("medray") or {}).get("deployments") or {}).get("model-tiny") or {}
    return [r["state"] for r in deployment.get("replicas") or []]


URL = "http://127.0.0.1:8000"
HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}


def _chat_ok() -> bool:
    try:
        return httpx.post(f"{URL}/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """The app deployed with `serve deploy`, two model replicas running."""
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    _serve_config(config)
    out = subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address", cluster.dashboard],
                         env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: _chat_ok() and _replicas(cluster).count("RUNNING") == 2, 300, "two running replicas", every=2)
    owners = listeners(8000)
    assert owners == {"haproxy"}, owners  # the traffic below goes through HAProxy, as the README's would
    return cluster


def test_serving_loses_a_replicas_node_under_load_and_recovers(served):
    cluster = served
    stop = threading.Event()
    outcomes: list[tuple[float, object]] = []
    bodies: list[str] = []

    def caller():
        while not stop.is_set():
            t = time.monotonic()
            try:  # a hang would show as the client's timeout
                r = httpx.post(f"{URL}/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=60)
                status = r.status_code
                if status != 200:
                    bodies.append(r.text[:300])
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError as e:
                status = type(e).__name__
            outcomes.append((time.monotonic() - t, status))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(caller)
        time.sleep(5)
        cluster.kill(cluster.workers[0])  # each worker node holds a model replica
        lost_at = len(outcomes)
        time.sleep(12)
        stop.set()
    statuses = Counter(s for _, s in outcomes)
    assert "timeout" not in statuses, statuses
    assert set(statuses) <= {200, 503}, (statuses, bodies)  # in-flight requests: 503 (retry), never a 4xx or 500
    assert statuses[200] > lost_at, statuses  # the surviving replica went on answering
    assert max(d for d, _ in outcomes) < 60

    cluster.add_node(num_cpus=2)  # the replacement machine: Serve brings the replica back
    wait_for(lambda: _replicas(cluster).count("RUNNING") == 2, 300, "the replica to come back", every=3)
    assert _chat_ok()
    print(f"\nserving: {dict(statuses)} across the loss")


def _job(job_id: str) -> dict:
    r = httpx.get(f"{URL}/v1/jobs/{job_id}", headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_batch_job_loses_its_runners_node_and_finishes_exactly_once(served):
    cluster = served
    corpus, out = f"s3://{BUCKET}/job-corpus", f"s3://{BUCKET}/job-out/run"
    write_synthetic("chest-vqa", corpus, n=96, seed=5)
    images = sorted(f.uri.rsplit("/", 1)[1] for f in storage.list_files(f"{corpus}/images"))
    # The node the runner may live on (the only one with a `jobs` resource).
    runners_node = cluster.add_node(num_cpus=1, resources='{"jobs": 1}')
    r = httpx.post(f"{URL}/v1/jobs", headers=HEADERS, timeout=30, json={
        "model": "tiny", "input": f"{corpus}/images", "output": out, "task": "vqa",
        "question": "Is there an opacity?", "max_new_tokens": 8, "format": "jsonl"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    t0 = time.monotonic()
    record = wait_for(lambda: (j := _job(job_id))["progress"]["rows_done"] >= 4 and j, 300, "the first shards",
                      every=0.5)
    assert record["status"] == "running" and record["progress"]["rows_done"] < len(images), record
    before = _shard_names(out)
    cluster.kill(runners_node)  # the runner (the pipeline's driver) goes with its node
    killed_at = time.monotonic() - t0
    # A replacement machine for the runners' pool joins; a GET finds the job runner-less and
    # starts a new runner, which resumes from the shards.
    cluster.add_node(num_cpus=1, resources='{"jobs": 1}')
    final = wait_for(lambda: (j := _job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j, 600,
                     "the job to finish", every=2)
    assert final["status"] == "succeeded", final
    attempts = storage.read_text(f"s3://{BUCKET}/jobs/{job_id}.json")
    assert '"attempts": 2' in attempts  # the lost runner, then the one that finished
    ids = Counter(r["id"] for r in read_shards(out))
    assert sorted(ids) == images and set(ids.values()) == {1}  # finished exactly once
    assert before <= _shard_names(out)
    assert final["progress"]["rows_done"] == len(images)
    print(f"\nbatch job: runner's node lost at {killed_at:.1f} s, job done at {time.monotonic() - t0:.1f} s")


def test_batch_job_resubmitted_after_a_full_cluster_restart_resumes_from_its_shards(cluster):
    """Last in the module: it loses the head, and with it the cluster."""
    corpus, out = f"s3://{BUCKET}/restart-corpus", f"s3://{BUCKET}/restart-out"
    # Enough rows, and answers long enough, that the run is still going when its first shards
    # are seen (with 48 rows of 8 tokens it once finished within the poll before the loss).
    write_synthetic("chest-vqa", corpus, n=96, seed=9)
    images = sorted(f.uri.rsplit("/", 1)[1] for f in storage.list_files(f"{corpus}/images"))
    cmd = ["python", str(REPO / "jobs/infer.py"), "--model", "tiny://llava-mistral", "--task", "vqa",
           "--question", "Is there an opacity?", "--input", f"{corpus}/images", "--output", out,
           "--max-new-tokens", "32", "--batch-size", "4", "--rows-per-shard", "4", "--max-actors", "1",
           "--cpus-per-actor", "1", "--cpus-per-task", "0.25", "--format", "jsonl"]
    t0 = time.monotonic()
    job = _submit(cluster, cmd)
    try:
        wait_for(lambda: len(_shard_names(out)) >= 2, 300, "the first shards", every=0.25)
        cluster.lose_all()
        lost_at = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    before = {uri: storage.read_bytes(uri) for uri in _shard_names(out)}
    done_before = {r["id"] for r in read_shards(out)}
    assert 0 < len(done_before) < len(images), "the job finished before the cluster was lost"

    t0 = time.monotonic()
    cluster.start_head(num_cpus=1, resources='{"head": 1}')
    cluster.add_node(num_cpus=2)
    restarted = time.monotonic() - t0
    log, _ = _submit(cluster, cmd).communicate(timeout=600)
    assert "succeeded" in log.lower(), log[-4000:]
    assert f"{len(images) - len(done_before)} rows (0 errors, {len(done_before)} already done)" in log, log[-4000:]
    ids = Counter(r["id"] for r in read_shards(out))
    assert sorted(ids) == images and set(ids.values()) == {1}
    assert all(storage.read_bytes(uri) == data for uri, data in before.items())  # kept as they were
    print(f"\nfull restart: cluster lost at {lost_at:.1f} s with {len(done_before)} rows written; restarted in "
          f"{restarted:.1f} s; the resubmitted job took {time.monotonic() - t0 - restarted:.1f} s")
