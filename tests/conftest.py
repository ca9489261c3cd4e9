"""Shared fixtures: a loopback S3 endpoint, a session-wide local Ray, tiny models.

Everything is real: moto's server is a separate process spoken to over HTTP, Ray is a
real local cluster, and tiny models are written to disk and loaded back through
medray's own loaders.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from medray.models import write_tiny_model
from medray.raycluster import use_serve_fast_path
from medray.storage.local_s3 import LocalS3Server

from _raycluster import TEST_RAY_ENV

REPO = Path(__file__).resolve().parents[1]
FAMILY_NAMES = ["llava-mistral", "llava-llama", "llama", "mixtral", "git"]

# Commands the tests start inherit these (see tests/_raycluster.py for why). Serve's mode is set
# here too, before any test module imports ray.serve, which reads it at import: the session's
# Ray (medray.raycluster.connect) and this process, its driver, then agree on it.
for _key, _value in TEST_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
use_serve_fast_path()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tiny:// builds and S3 mirrors out of the user's ~/.cache."""
    old = os.environ.get("MEDRAY_CACHE_DIR")
    os.environ["MEDRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("medray-cache"))
    yield
    if old is None:
        os.environ.pop("MEDRAY_CACHE_DIR", None)
    else:
        os.environ["MEDRAY_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; AWS_* env points every client at it."""
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    with LocalS3Server() as server:
        os.environ.update(server.env)
        yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    from medray.storage import default_storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    default_storage().client.create_bucket(Bucket=name)
    return f"s3://{name}"


# The test PACS's credentials (medray.storage.local_pacs), in the environment before the session's
# Ray starts: a PACS's credentials reach a cluster's processes through their environment, as
# the nodes' own would (medray.storage.dicomweb), never through a config.
os.environ.setdefault("MEDRAY_DICOMWEB_USER", "medray")
os.environ.setdefault("MEDRAY_DICOMWEB_PASSWORD", "pacs-secret-7")


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One local Ray for the whole run, sized for a 2-core machine."""
    import ray

    from medray.raycluster import connect

    # A private local instance, as every medray command starts one: never a cluster merely
    # running on the machine, nor a dead one's address left in Ray's temp dir.
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MEDRAY_"))}
    connect("local", local={"num_cpus": 2, "include_dashboard": False}, log_to_driver=False,
            runtime_env={"env_vars": env})
    yield ray
    import _handles  # the test process's handles go first (_handles.close says why)

    _handles.close()
    ray.shutdown()


@pytest.fixture(scope="session")
def llava_med_run(ray_cluster, tmp_path_factory):
    """`manifests/tiny/llava-med.yaml` as it is (the quickstart's curriculum), trained once on
    the session's Ray: (output root, stage results). Training it is ~30 s here, and two
    modules check what it made; tests only read the root."""
    from medray.train import load_manifest, run_curriculum

    root = tmp_path_factory.mktemp("llava-med-run")
    results = run_curriculum(load_manifest(REPO / "manifests/tiny/llava-med.yaml", [f"output={root}"]))
    return root, results


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model directory per family, written by the same code as `medray tiny-model`."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_model(f, root / f, seed=0) for f in FAMILY_NAMES}


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser_page():
    """Debian's Chromium, headless, driven by Playwright (no browser download).

    CI installs chromium and sets MEDRAY_CI=1, so there a missing browser fails
    instead of skipping.
    """
    import os

    if not Path(CHROMIUM).exists() and os.environ.get("MEDRAY_CI") != "1":
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield browser.new_page()
        finally:
            browser.close()
