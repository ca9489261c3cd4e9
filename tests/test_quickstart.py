"""The README's cluster quickstart, run as written against a cluster started with `ray start`
(a head and a worker node on this machine, token auth on), so the README cannot drift from
what works. Also: how commands find (or refuse) a Ray cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from medray import storage
from medray.data.shards import read_shards
from medray.data.synthetic import write_synthetic
from medray.raycluster import SERVE_FAST_PATH_ENV
from medray.storage.local_s3 import free_port

from _raycluster import BIN, NodeCluster

REPO = Path(__file__).resolve().parents[1]
BUCKET = "quickstart"


def readme_block(heading: str) -> list[str]:
    """The logical commands (continuations joined, comments dropped) of the first bash block
    under `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```bash") + len("```bash"): section.index("```", section.index("```bash") + 7)]
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_the_readme_nodes_start_in_serve_s_fast_path():
    """The block's node environment line sets the Serve mode medray's own local instances use."""
    exports = [c for c in readme_block("## Quickstart on a cluster") if c.startswith("export ")]
    env = dict(word.partition("=")[::2] for word in shlex.split(exports[0])[1:])
    assert {k: env.get(k) for k in SERVE_FAST_PATH_ENV} == SERVE_FAST_PATH_ENV, exports[0]


@pytest.fixture(scope="module")
def quickstart(s3_server):
    """The README block's set-up lines run as written (plus isolation flags: a private temp dir,
    free ports, CPU counts), with the loopback S3 store's keys standing in for real ones."""
    commands = readme_block("## Quickstart on a cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    exports = [c for c in commands if c.startswith("export ")]
    for word in shlex.split(exports[0])[1:]:  # the node environment line
        key, _, value = word.partition("=")
        env[key] = value
    env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")})
    head, worker = [c for c in commands if c.startswith("ray start")]
    cluster = NodeCluster(env)
    token, = [c for c in commands if c.startswith("ray get-auth-token")]
    subprocess.run(["bash", "-c", token], env={**cluster.env}, check=True, timeout=60)  # as written
    cluster.env["MEDRAY_CACHE_DIR"] = os.path.join(cluster.root, "cache")
    try:
        cluster.start_head(shlex.split(head.replace("0.0.0.0", "127.0.0.1")), num_cpus=2)
        cluster.add_node(shlex.split(worker.replace("HEAD:6379", cluster.gcs)), num_cpus=2)
        cluster.wait_alive(2)
        storage.default_storage().client.create_bucket(Bucket=BUCKET)
        yield {"commands": commands, "env": cluster.env, "gcs": cluster.gcs, "dashboard": cluster.dashboard,
               "root": cluster.root}
    finally:
        cluster.shutdown()


def _client_env(q) -> dict:
    """The client side's exports, from the block's second export line."""
    env = {k: v for k, v in q["env"].items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                         "MEDRAY_API_KEYS")}
    exports = [c for c in q["commands"] if c.startswith("export ")]
    for word in shlex.split(exports[1])[1:]:
        key, _, value = word.partition("=")
        env[key] = value.replace("http://HEAD:8265", q["dashboard"])
    return env


def _run(q, command: str, timeout: int) -> subprocess.CompletedProcess:
    command = command.replace("YOUR-BUCKET", BUCKET).replace("http://HEAD:8265", q["dashboard"]) \
        .replace("HEAD:6379", q["gcs"])
    return subprocess.run(["bash", "-c", command], env=_client_env(q), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_the_readme_cluster_quickstart_runs_as_written(quickstart):
    q = quickstart
    steps = [c for c in q["commands"] if not c.startswith(("export ", "ray start", "ray get-auth-token"))]
    train, infer, deploy, curl = steps
    assert train.startswith("ray job submit") and "jobs/train.py" in train
    assert infer.startswith("ray job submit") and "jobs/infer.py" in infer
    assert deploy.startswith("serve deploy") and curl.startswith("curl")

    # Training: the shipped tiny manifest, credentials only in the nodes' environment.
    out = _run(q, train, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert storage.exists(f"s3://{BUCKET}/runs/tiny-llava-med/instruct/model.safetensors")

    # Batch VQA with the trained model over images in S3: every image once, and it answers.
    write_synthetic("chest-vqa", f"s3://{BUCKET}/corpus", n=12, seed=5, dicom_fraction=0.25)
    for f in storage.list_files(f"s3://{BUCKET}/corpus/images"):
        storage.write_bytes(f"s3://{BUCKET}/images/{f.uri.rsplit('/', 1)[1]}", storage.read_bytes(f.uri))
    out = _run(q, infer, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_shards(f"s3://{BUCKET}/answers/run-1/")
    assert sorted(r["id"] for r in rows) == sorted(f.uri.rsplit("/", 1)[1] for f in
                                                   storage.list_files(f"s3://{BUCKET}/images"))
    assert not any(r["error"] for r in rows)
    assert all(r["answer"].strip() for r in rows), [r["answer"] for r in rows]  # a model that answers

    # Serving: deployed through the dashboard; the app reads the keys from the nodes.
    out = _run(q, deploy, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline = time.time() + 240
    while True:
        out = _run(q, curl, timeout=60)
        if out.returncode == 0 and '"choices"' in out.stdout:
            break
        assert time.time() < deadline, out.stdout[-2000:] + out.stderr[-2000:]
        time.sleep(3)
    assert json.loads(out.stdout)["choices"][0]["message"]["role"] == "assistant"


def test_medray_serve_passes_the_callers_keys_as_digests(quickstart, browser_page):
    """`medray serve --address HEAD:6379` with a key only the caller has: the cluster's app
    accepts it, though no node's environment holds it. Its web page, under the shipped tiny
    config on a store without the `medray` bucket (a newcomer's laptop), loads with no console
    error, says what jobs need, and previews a DICOM."""
    q = quickstart
    env = {**_client_env(q), "MEDRAY_API_KEYS": "sk-caller-only"}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([str(BIN / "medray"), "serve", "manifests/serve/tiny.yaml", "--address", q["gcs"]],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        body = {"model": "tiny-llava-med", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        while True:
            try:
                r = httpx.post("http://127.0.0.1:8000/v1/chat/completions", json=body, timeout=30,
                               headers={"Authorization": "Bearer sk-caller-only"})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(3)
        wrong = httpx.post("http://127.0.0.1:8000/v1/chat/completions", json=body, timeout=30,
                           headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401

        from pydicom.data import get_testdata_file

        page, errors = browser_page, []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto("http://127.0.0.1:8000/")
        page.fill("#key", "sk-caller-only")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.getElementById('job-status').textContent.includes('unavailable')")
        status = page.inner_text("#job-status")
        assert "s3://medray/jobs" in status and "AWS_ENDPOINT_URL" in status and "jobs.store" in status, status
        assert page.is_disabled("#job-submit")
        page.set_input_files("#image", get_testdata_file("CT_small.dcm"))
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
        page.wait_for_load_state("networkidle")
        assert not errors, errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_command_beside_a_running_cluster_starts_its_own_ray(quickstart):
    """With a cluster running on the machine (its address file where Ray looks) and no
    address given, a command starts a private local Ray with its own resources, instead of
    attaching (where num_cpus=... is refused)."""
    env = {k: v for k, v in quickstart["env"].items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = quickstart["root"]  # Ray looks for ray_current_cluster in $RAY_TMPDIR/ray
    snippet = ("from medray.raycluster import connect; import ray; "
               "connect(local={'num_cpus': 1, 'include_dashboard': False}); "
               "print(ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'])")
    out = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    address, cpus = out.stdout.split()[-2:]
    assert address != quickstart["gcs"] and float(cpus) == 1.0


def test_an_unreachable_or_dashboard_address_fails_fast_naming_it(tmp_path):
    """A dead cluster's address (given, or left in Ray's address file) never makes a command
    wait forever."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    out = subprocess.run([str(BIN / "medray"), "train", "manifests/tiny/llava-med.yaml", "--address",
                          f"127.0.0.1:{port}", "--set", f"output={tmp_path}"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in out.stderr, out.stderr
    assert time.time() - t0 < 60
    out = subprocess.run([str(BIN / "medray"), "infer", "--model", "tiny://llava-mistral", "--input", str(tmp_path),
                          "--output", str(tmp_path / "o")], env={**env, "RAY_ADDRESS": "http://127.0.0.1:8265"},
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dashboard address" in out.stderr and "HEAD:6379" in out.stderr, out.stderr

    # A dead cluster's address file: no address given, so a private local Ray starts. Its
    # processes run Serve's fast path (raycluster.SERVE_FAST_PATH_ENV) unless the caller chose
    # otherwise: here the HAProxy ingress is turned off, and stays off.
    snippet = ("import os; from medray.raycluster import connect; import ray; "
               "connect(local={'num_cpus': 1, 'include_dashboard': False}); "
               "seen = ray.remote(lambda: [os.environ.get(k) for k in "
               "('RAY_SERVE_ENABLE_HA_PROXY', 'RAY_SERVE_THROUGHPUT_OPTIMIZED')]); "
               "print(*ray.get(seen.remote()), ray.cluster_resources()['CPU'])")
    env = {k: v for k, v in env.items() if not k.startswith("RAY_SERVE_")}
    tmp = tempfile.mkdtemp(prefix="mqd", dir="/tmp")
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                             env={**env, "RAY_TMPDIR": tmp, "RAY_SERVE_ENABLE_HA_PROXY": "0"})
        assert out.returncode == 0 and out.stdout.split()[-3:] == ["0", "1", "1.0"], out.stdout + out.stderr[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
