"""`medray serve CONFIG`: run a Serve config file, the same one `serve run` and a RayService take."""

from __future__ import annotations

import importlib
import logging
import os
import time

import yaml

log = logging.getLogger(__name__)


def load_config(path: str) -> dict:
    """A Serve config file (the format `serve run`, `serve deploy` and a RayService take)."""
    from medray import storage

    config = yaml.safe_load(storage.read_text(path))
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: a Serve config needs an `applications` list")
    return config


def load_applications(path: str) -> tuple[dict, list[dict]]:
    config = load_config(path)
    return config.get("http_options") or {}, config["applications"]


MEDRAY_BUILDERS = ("medray.serve:build_app", "medray.serve.app:build_app")


def with_caller_keys(app: dict) -> dict:
    """A medray app with the caller's MEDRAY_API_KEYS added to its api_keys as digests.

    The app runs in the cluster's processes, which do not see this shell's environment; a
    digest is no secret, so it may travel in the app's arguments."""
    from .config import key_digest

    keys = [k for k in os.environ.get("MEDRAY_API_KEYS", "").split(",") if k.strip()]
    if not keys or app.get("import_path") not in MEDRAY_BUILDERS:
        return app
    args = dict(app.get("args") or {})
    args["api_keys"] = [*args.get("api_keys", []), *(key_digest(k) for k in keys)]
    return {**app, "args": args}


def build(app: dict):
    """Import the application's builder and call it with its args, as `serve run` does."""
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    return builder(app.get("args") or {})


def run_config(path: str, *, address: str | None = None, blocking: bool = True) -> None:
    from medray.raycluster import connect

    config = load_config(path)
    connect(address)
    from ray import serve  # after connect: Serve reads its mode (SERVE_FAST_PATH_ENV) at import

    serve.start(http_options=config.get("http_options") or {}, proxy_location=config.get("proxy_location"))
    apps = config["applications"]
    for app in map(with_caller_keys, apps):
        serve.run(build(app), name=app.get("name", "default"), route_prefix=app.get("route_prefix", "/"))
        log.info("application %s is up", app.get("name"))
    while blocking:
        time.sleep(3600)
