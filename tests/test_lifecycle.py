"""Stopping `medray serve` as systemd, Kubernetes and `kill` do (SIGTERM), over and over, on
both engines: each stop ends every process the command started, frees the Serve port, exits
0 and says nothing alarming. And a port that an earlier run still holds is named at start.

Every process the command starts inherits its environment, so a tag set there finds them
all, whoever their parent is by then (a process whose parent died is re-parented)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from medray.storage.local_s3 import free_port

from _raycluster import wait_for

REPO = Path(__file__).resolve().parents[1]
MEDRAY = Path(sys.executable).with_name("medray")
VLLM_PYTHON = REPO / os.environ.get("MEDRAY_VLLM_VENV", ".venv-vllm") / "bin" / "python"
KEY = "sk-lifecycle"
STOPS = 10
ALARMING = ("Traceback", "SIGTERM received", "Stack trace", "Aborted", "core dumped", "*** ", "Error", "ERROR")


def _config(tmp_path: Path, engine: str, port: int) -> Path:
    model = {"name": "tiny", "uri": "tiny://llava-mistral", "engine": engine, "cpus_per_replica": 0.5}
    if engine == "vllm":  # the CPU sizing the shipped tiny-vllm.yaml has
        model["vllm"] = {"max_num_seqs": 8, "kv_cache_gib": 0.25, "dtype": "float32"}
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "medray", "route_prefix": "/", "import_path": "medray.serve:build_app",
                                "args": {"models": [model]}}]}
    path = tmp_path / f"serve-{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tagged(tag: str) -> dict[int, str]:
    """pid -> name of the live processes whose environment holds the tag."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"MEDRAY_TEST_TAG={tag}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:  # Ray and vLLM retitle their processes there
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                found[int(pid)] = command[:160] or stat[stat.index("(") + 1:stat.rindex(")")]
        except OSError:
            continue
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _loopback_only(pid: int) -> list[str]:
    """The TCP addresses process `pid` listens on that are not loopback."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    exposed = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:
                address, port = f[1].rsplit(":", 1)
                if address not in ("0100007F", "00000000000000000000000001000000"):
                    exposed.append(f"{address}:{int(port, 16)}")
    return exposed


def _stop_rounds(tmp_path: Path, engine: str, env: dict) -> None:
    port = free_port()
    config = _config(tmp_path, engine, port)
    for i in range(STOPS):
        tag = uuid.uuid4().hex
        log = tmp_path / f"{engine}-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(MEDRAY), "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**env, "MEDRAY_TEST_TAG": tag}, cwd=tmp_path)
        try:
            # Stopped at different moments: the odd rounds once the model answers, the even
            # ones while its replica starts (vLLM: while its engine is being built).
            if i % 2:
                wait_for(lambda: _ready(port), 240, f"round {i}: the app answering")
                if i == 1:
                    _check_the_local_haproxy(tag)
            else:
                starting = "EngineCore" if engine == "vllm" else "ServeReplica"
                wait_for(lambda: any(starting in n for n in _tagged(tag).values()) or proc.poll() is not None,
                         240, f"round {i}: a {starting} process", every=0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            started = _tagged(tag)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert code in (0, 143), f"round {i}: exit {code}\n{text[-3000:]}"
        left = _tagged(tag)
        assert not left, f"round {i}: left running after the stop: {left} (started {sorted(started.values())})"
        assert _port_free(port), f"round {i}: port {port} still taken"
        noise = [line for line in text.splitlines() if any(a in line for a in ALARMING)]
        assert not noise, f"round {i}: {noise}"


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _check_the_local_haproxy(tag: str) -> None:
    """The local Ray's HAProxy: stats page and Prometheus exporter on loopback only, its
    admin socket for this user only (Ray's template: every interface, mode 666)."""
    haproxy = [pid for pid, name in _tagged(tag).items() if Path(name.split()[0]).name == "haproxy"]
    assert haproxy, _tagged(tag)
    for pid in haproxy:
        assert not _loopback_only(pid), _loopback_only(pid)
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        config = Path(args[args.index(b"-f") + 1].decode())
        assert (config.parent / "admin.sock").stat().st_mode & 0o777 == 0o600


@pytest.fixture
def serve_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MEDRAY_"))}
    env.update(MEDRAY_API_KEYS=KEY, MEDRAY_CACHE_DIR=os.environ["MEDRAY_CACHE_DIR"])
    return env


def test_sigterm_stops_medray_serve_on_hf_and_leaves_nothing(tmp_path, serve_env):
    _stop_rounds(tmp_path, "hf", serve_env)


@pytest.mark.skipif(not VLLM_PYTHON.exists() and os.environ.get("MEDRAY_CI") != "1",
                    reason="vLLM's environment is missing: `make vllm` builds .venv-vllm")
def test_sigterm_stops_medray_serve_on_vllm_and_leaves_nothing(tmp_path, serve_env):
    _stop_rounds(tmp_path, "vllm", {**serve_env, "MEDRAY_VLLM_PYTHON": str(VLLM_PYTHON)})


def test_a_port_held_by_an_earlier_run_is_named_at_start(tmp_path, serve_env):
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)"])
    try:
        wait_for(lambda: not _port_free(port), 30, "the holder to listen", every=0.1)
        started = time.monotonic()
        out = subprocess.run([str(MEDRAY), "serve", str(_config(tmp_path, "hf", port))], capture_output=True,
                             text=True, timeout=120, env=serve_env)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"port {port} on 127.0.0.1 is in use" in out.stderr and f"by pid {holder.pid} (" in out.stderr, out.stderr
        assert f"kill {holder.pid}" in out.stderr and "Traceback" not in out.stderr
        assert time.monotonic() - started < 60  # refused before any Ray starts
    finally:
        holder.kill()
