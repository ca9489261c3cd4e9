"""What `medray demo` leaves behind: the run copied out of its store (the loopback S3 store
lives in memory) into a local directory whose records name the copy, a Serve config for the
trained model, and the paths and command the summary names.
"""

from __future__ import annotations

import os
from pathlib import Path


def copy_out(root: str, results: str) -> str:
    """Copy the run under `root` (the demo store) to the local directory `results`, leaving out
    Ray Train's own run state (`_ray/`: checkpoints the finished stages no longer need), and
    make the copy's records name the copy. Returns the directory, absolute."""
    from medray import lineage, storage

    dest = Path(results).resolve()
    base = root.rstrip("/") + "/"
    store = storage.default_storage()
    for f in storage.list_files(root):
        rel = f.uri[len(base):]
        if "/_ray/" in f"/{rel}":
            continue
        store.download_file(f.uri, dest / rel)
    lineage.relocate(dest, root, str(dest))
    return str(dest)


def write_serve_config(results: str, model: str) -> str:
    """A Serve config for the trained model in the copy, with a batch-job store and job
    prefixes of local directories (no S3 needed): what `medray serve` takes next."""
    import yaml

    results_dir = Path(results)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{
            "name": "medray", "route_prefix": "/", "import_path": "medray.serve:build_app",
            "args": {
                "models": [{"name": "medray-demo", "uri": model, "cpus_per_replica": 0.5}],
                "api_keys": [],  # MEDRAY_API_KEYS, which `medray serve` passes on as digests
                "jobs": {"store": str(results_dir / "jobs"),
                         "allowed_input_prefixes": [str(results_dir / "corpus")],
                         "allowed_output_prefixes": [str(results_dir / "job-answers")],
                         "cpus_per_actor": 0.5, "cpus_per_task": 0.25},
            }}],
    }
    path = results_dir / "serve.yaml"
    path.write_text("# `medray demo` wrote this: its trained model, served with `medray serve` (see the README).\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return str(path)


def medray_command() -> str:
    """The medray command as this process was started (.venv/bin/medray under `make demo`)."""
    import sys

    if not (sys.argv and Path(sys.argv[0]).name == "medray" and os.sep in sys.argv[0]):
        return "medray"
    relative = os.path.relpath(sys.argv[0])
    return sys.argv[0] if relative.startswith("..") else relative


def local_path(uri: str, root: str, results: str) -> str:
    """`uri` as a path in the local copy, when it was under the demo store."""
    root = root.rstrip("/")
    return results + uri[len(root):] if uri == root or uri.startswith(root + "/") else uri
