"""`medray serve CONFIG`: run a Serve config file, the same one `serve run` and a RayService take."""

from __future__ import annotations

import importlib
import logging
import time

import yaml

log = logging.getLogger(__name__)


def load_applications(path: str) -> tuple[dict, list[dict]]:
    from medray import storage

    config = yaml.safe_load(storage.read_text(path))
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: a Serve config needs an `applications` list")
    return config.get("http_options") or {}, config["applications"]


def build(app: dict):
    """Import the application's builder and call it with its args, as `serve run` does."""
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    return builder(app.get("args") or {})


def run_config(path: str, *, blocking: bool = True) -> None:
    import ray
    from ray import serve

    http_options, apps = load_applications(path)
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options=http_options)
    for app in apps:
        serve.run(build(app), name=app.get("name", "default"), route_prefix=app.get("route_prefix", "/"))
        log.info("application %s is up", app.get("name"))
    while blocking:
        time.sleep(3600)
