"""What Ray, and the libraries it runs, print on a medray command's output that no user can
act on, kept off it with the reason for each: Python log records by logger and prefix
(LOG_NOISE), lines Ray's C++ code writes straight to stderr (RAY_STDERR_NOISE, through a
`grep -v` process), and environment defaults (QUIET_ENV). Everything else passes as it is.

The medray command and the job entrypoints call `quiet_noise` first; a library user's process
is left as it is. Must not import other medray packages.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys

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
        atexit.register(cls.stop)  # before localray.LocalProcesses registers: runs after its stop

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


def filter_pid() -> int | None:
    """The grep process's pid, which a sweep of this process's children must leave running
    until the end (medray.localray)."""
    return _StderrFilter.proc.pid if _StderrFilter.proc else None
