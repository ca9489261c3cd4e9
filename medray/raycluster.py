"""How every medray command attaches to Ray: the cluster it was asked for, or its own.

One rule for all drivers (`medray train|infer|serve|demo`, `jobs/*.py`):
- an address given (`--address`, or RAY_ADDRESS as `ray job submit` sets it for a job's
  driver) is used, and one that cannot be reached fails within seconds, naming it;
- no address starts a private local instance (`address="local"`). Plain `ray.init()` would
  attach to whatever cluster the machine last started, even one that has died without
  `ray stop` and left its address in the Ray temp dir: the command then waited forever on
  "Failed to connect to GCS". A local instance beside a running cluster also takes no orders
  meant for that cluster (num_cpus=... is refused when attaching).

A local instance is the command's own, and so is its end (medray.localray).

Owns: address resolution, the reachability check, and the Serve mode a local instance starts
in (SERVE_FAST_PATH_ENV). Must not import medray packages other than localray and quiet.
"""

from __future__ import annotations

import importlib.util
import os
import socket

from .localray import LocalProcesses, stop_on_sigterm

CONNECT_TIMEOUT_S = 5.0

# Ray Serve's high-throughput mode (Ray's KubeRay guide "Enable High Throughput on Ray Serve"):
# HAProxy takes HTTP on the Serve port and hands each request straight to an ingress replica's
# own HTTP server, in place of Serve's Python proxy, and replicas call each other over gRPC.
# Measured on 2 CPUs (bench/serve.py, median of 3): the latency HTTP + Serve add to a chat
# request went from 15.4 to 10.6 ms at p50, the proxying CPU per request from 6.4 ms (Serve's
# proxy) to 0.7 ms (HAProxy and its manager actor), and vLLM's streamed req/s from 0.87x to
# 0.96x the non-streamed. Ray reads these when its processes start, so they are set for the
# local instances medray starts; a cluster started with `ray start` or KubeRay takes them from
# its nodes' environment (README, kuberay/base/raycluster.yaml). Set them to 0 to run Serve's
# Python proxy instead. Where each of medray's replicas runs its code, which the same mode
# would also decide, is set per deployment (medray.serve.app.USER_CODE_THREAD).
SERVE_FAST_PATH_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Each HAProxy also listens on a stats and a metrics port, fixed by default (8404, 9101): a
# second Ray on the machine (`medray demo` beside `medray serve`) failed to start its HAProxy
# ("cannot bind socket (Address already in use)"). A local instance gets free ones.
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def use_serve_fast_path() -> None:
    """Put SERVE_FAST_PATH_ENV into this process's environment where the caller has not set
    them: Ray processes started from here inherit them, and Serve, imported after, reads them."""
    for key, value in SERVE_FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)


class ClusterUnreachable(RuntimeError):
    """The Ray address given cannot be used; the message says which and why."""


def resolve_address(address: str | None) -> str | None:
    """The address to attach to (None: start a local instance). Checks that a GCS address
    answers on TCP, so an unreachable one fails now instead of hanging in ray.init."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if address is None or address == "local":
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"Ray address {address} is a dashboard address: `ray job submit` and `serve deploy` use it, "
            "but a driver attaches to the cluster's GCS (HEAD:6379). Submit this command as a job "
            "(ray job submit -- python jobs/...), pass --address HEAD:6379, or unset RAY_ADDRESS "
            "to run on a local Ray")
    if address.startswith("ray://"):
        return address  # Ray Client: its own connection handling and errors
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
        if not found:
            raise ClusterUnreachable("--address auto: no Ray cluster was started on this machine (`ray start --head`)")
        address = found
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"Ray address {address!r} is not HOST:PORT (the head's GCS, port 6379 by default)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e}. Is it running "
            f"(`ray status --address {address}`)? Without an address, medray starts its own local Ray") from None
    return address


def connect(address: str | None = None, *, local: dict | None = None, **init_kwargs) -> None:
    """ray.init by the rule above. `local` holds options only a new local instance takes
    (num_cpus, include_dashboard, ...); `init_kwargs` apply either way."""
    import ray

    if ray.is_initialized():
        return
    # torch first, before Ray attaches: under `ray job submit`, Ray's runtime-env agent may
    # delete and extract the job's working_dir again under this driver after ray.init (see
    # restore_cwd), and torch loaded for the first time while the cwd is gone aborts the
    # process (its MKL: "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). The
    # commands that attach to Ray all load it later anyway.
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401

    target = resolve_address(address)
    if target is None:
        use_serve_fast_path()  # the local raylet and its workers inherit it
        processes = LocalProcesses.start()
        # The ports and the HAProxy wrapper only while the raylet starts (it keeps its copy):
        # commands this process starts later, with Ray instances of their own, pick their own.
        scoped = {key: str(_free_port()) for key in HAPROXY_PORT_VARS if key not in os.environ}
        scoped.update(processes.haproxy_env())
        saved = {key: os.environ.get(key) for key in scoped}
        os.environ.update(scoped)
        try:
            ray.init(address="local", **(local or {}), **init_kwargs)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    else:
        ray.init(address=target, **init_kwargs)
    stop_on_sigterm()


def _free_port() -> int:  # storage.local_s3 has one too; this module imports no medray package
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def restore_cwd() -> None:
    """Enter the working directory again when it was replaced under this process.

    A job's driver runs in its runtime_env working_dir, and Ray's runtime-env agent on the
    node may delete and extract that directory again at the same path while the driver runs
    (measured: between ray.init and the first stage). The process's cwd then names a deleted
    directory, and whatever resolves a relative path fails with FileNotFoundError
    (transformers does, at import). The path itself is back; entering it again is enough.
    """
    import os
    import tempfile

    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    pwd = os.environ.get("PWD", "")  # the shell that started the driver set it to the cwd
    os.chdir(pwd if pwd and os.path.isdir(pwd) else tempfile.gettempdir())
