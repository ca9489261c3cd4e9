"""`medray serve CONFIG`: run a Serve config file, the same one `serve run` and a RayService take."""

from __future__ import annotations

import importlib
import logging
import os
import socket
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


def port_holder(port: int) -> str | None:
    """'pid N (command line)' of the process listening on TCP `port` here, from /proc (Linux;
    processes of this user, or all as root), or None where none is found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc") if inodes else ()):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} ({command[:120]})"
        except OSError:
            continue
    return None


def check_port_free(host: str, port: int) -> None:
    """Refuse to start where the Serve port is taken: Serve would start anyway, and requests
    to the port would reach whatever holds it (once, a HAProxy left by an earlier run,
    forwarding to a port a later, unrelated app had taken)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
            return
        except OSError as e:
            reason = e.strerror or str(e)
    holder = port_holder(port)
    raise RuntimeError(
        f"port {port} on {host} is in use ({reason})" + (f" by {holder}" if holder else "")
        + ": an earlier medray or Serve still running? Stop it" + (f" (kill {holder.split()[1]})" if holder else "")
        + ", or set http_options.port in the config")


def run_config(path: str, *, address: str | None = None, blocking: bool = True) -> None:
    from medray.raycluster import connect, resolve_address

    config = load_config(path)
    if resolve_address(address) is None:  # a local Ray: the port is this machine's
        http = config.get("http_options") or {}
        check_port_free(http.get("host") or "127.0.0.1", int(http.get("port") or 8000))
    connect(address)
    from ray import serve  # after connect: Serve reads its mode (SERVE_FAST_PATH_ENV) at import

    serve.start(http_options=config.get("http_options") or {}, proxy_location=config.get("proxy_location"))
    apps = config["applications"]
    for app in map(with_caller_keys, apps):
        serve.run(build(app), name=app.get("name", "default"), route_prefix=app.get("route_prefix", "/"))
        log.info("application %s is up", app.get("name"))
    while blocking:
        time.sleep(3600)
