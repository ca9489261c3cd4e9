"""Test helper: a Ray cluster of real nodes on this machine, each one `ray start --block`
process group (its own raylet, object store and workers), as a cluster's machines would be.

A node is lost the way a machine is: its whole process group is killed at once (SIGKILL),
with no `ray stop` and no goodbye to the GCS. `ray stop` is never used: it would stop every
Ray on the machine, the test session's own included. Every port is picked free, so nodes sit
beside each other and beside the session's Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medray.raycluster import HAPROXY_PORT_VARS
from medray.storage.local_s3 import free_port

BIN = Path(sys.executable).parent
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's
# dozens of stages ended up to 2 s after its workers had (measured: 3.3 s from the last
# worker's exit to fit()'s return, 0.6-1.3 s at 0.5 s). The controller reads it from the
# driver's environment: conftest.py sets it for the session, NodeCluster for its nodes.
# Under Serve's HAProxy ingress (medray.raycluster.SERVE_FAST_PATH_ENV) an ingress replica that
# stops (serve.delete, a redeploy) keeps answering for at least 30 s, so that load balancers
# in front see it go first; each app the suite deletes waited that long. HAProxy on the same
# node learns of it within 0.1 s, so 2 s is plenty here (the redeploy test still checks that
# no request is refused while it drains).
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def listeners(port: int) -> set[str]:
    """The names of the processes listening on a TCP port: which proxy serves it (haproxy, or
    Serve's Python proxy, a ray process)."""
    import psutil

    return {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return result


class NodeCluster:
    """Start with `start_head`, grow with `add_node`, lose nodes with `kill`."""

    def __init__(self, env: dict):
        self.root = tempfile.mkdtemp(prefix="mrn", dir="/tmp")  # short: socket paths are length-limited
        self.temp_dir = os.path.join(self.root, "ray")
        self.env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        self.env.setdefault("RAY_AUTH_MODE", "token")
        # A lost node is declared dead after 3 failed 1 s health checks (~3 s), not Ray's 5
        # failed 3 s ones (~15 s): a killed raylet refuses the connection at once, so this only
        # shortens the waits (Train, Serve and the tests all wait for the GCS to see the loss).
        # A raylet that is alive but stalled still has 3 x the 10 s check timeout.
        self.env.setdefault("RAY_health_check_period_ms", "1000")
        self.env.setdefault("RAY_health_check_failure_threshold", "3")
        for key, value in TEST_RAY_ENV.items():  # the callers drop RAY_* from what they pass
            self.env.setdefault(key, value)
        self.env["PATH"] = f"{BIN}:{self.env.get('PATH', '')}"
        self.nodes: list[subprocess.Popen] = []
        self.workers: list[int] = []  # indexes of the worker nodes alive
        self.gcs = self.dashboard = ""

    def start_head(self, command: list[str] | None = None, *, num_cpus: float = 1, resources: str = "") -> None:
        ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", *NODE_PORTS)}
        cmd = (command or [str(BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1"]) + [
            f"--temp-dir={self.temp_dir}", *[f"--{k}={v}" for k, v in ports.items()]]
        address_file = Path(self.temp_dir, "ray_current_cluster")
        address_file.unlink(missing_ok=True)  # a head lost before this one leaves its address behind
        self.ensure_token()
        self._start(cmd, num_cpus, resources)
        index = len(self.nodes) - 1
        self.gcs = wait_for(lambda: self._running(index) and address_file.exists() and address_file.read_text().strip(),
                            120, "the head")
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        self.wait_alive(1)
        wait_for(lambda: subprocess.run([str(BIN / "ray"), "job", "list", f"--address={self.dashboard}"],
                                        env=self.env, capture_output=True, timeout=60).returncode == 0,
                 120, "the job API")

    def add_node(self, command: list[str] | None = None, *, num_cpus: float = 2, resources: str = "") -> int:
        """Start a worker node and wait until it has joined (two joining at once collided here);
        returns its index for `kill`."""
        for attempt in (1, 2):
            cmd = (command or [str(BIN / "ray"), "start", f"--address={self.gcs}"]) + [
                f"--{k}={free_port()}" for k in NODE_PORTS]  # fresh ports: a port taken meanwhile is one way to hang
            self._start(cmd, num_cpus, resources)
            index = len(self.nodes) - 1
            try:
                # Every node whose processes run, and no other: the GCS may not have seen a
                # node killed a moment ago as dead yet (its health checks take seconds).
                n = sum(node.poll() is None for node in self.nodes)
                wait_for(lambda: self._running(index) and self.alive() == n, 120, f"{n} alive nodes", every=2)
                break
            except AssertionError as e:
                # A node that never registers (seen once in CI, as the fixture's 3rd node)
                # is lost like a machine and replaced once; the second time, its logs say why.
                why = self.logs(index)
                self.kill(index)
                if attempt == 2:
                    raise AssertionError(f"{e}; the node's output:\n{why}") from None
                print(f"node {index} did not join; starting another. Its output:\n{why}", file=sys.stderr)
        self.workers.append(index)
        return index

    def logs(self, index: int, lines: int = 40) -> str:
        """The tail of node `index`'s own output and of the raylet logs under the cluster's temp dir."""
        out = []
        for path in [Path(self.root, f"node-{index}.log"),
                     *sorted(Path(self.temp_dir, "session_latest", "logs").glob("raylet*.[eo][ru][rt]"))]:
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(out)[-8000:]

    def ensure_token(self) -> None:
        """What an operator does once on a fresh head: `ray start` refuses to start under token
        auth without a token (only `ray.init` makes one), so a fresh machine needs
        `ray get-auth-token --generate` (~/.ray/auth_token, which the nodes here share)."""
        if self.env.get("RAY_AUTH_MODE") == "token":
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env, capture_output=True,
                           check=True, timeout=60)

    def _running(self, index: int) -> bool:
        """True while node `index`'s process runs; a node that exited fails the wait at once,
        with its output, instead of after the wait's whole timeout."""
        if self.nodes[index].poll() is not None:
            raise AssertionError(f"node {index} exited ({self.nodes[index].returncode}); its output:\n"
                                 + self.logs(index))
        return True

    def _start(self, cmd: list[str], num_cpus: float, resources: str) -> None:
        cmd = cmd + ["--block", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        log = open(os.path.join(self.root, f"node-{len(self.nodes)}.log"), "w")  # noqa: SIM115
        # A node's HAProxy (where the env turns it on) listens on a stats and a metrics port
        # too, fixed unless set: nodes that share this machine need their own, as for NODE_PORTS.
        env = {**self.env, **{k: str(free_port()) for k in HAPROXY_PORT_VARS}}
        self.nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        log.close()  # the child holds its own copy

    def api(self, path: str):
        """GET a dashboard REST path as JSON, or None while the dashboard does not answer: an
        HTTP request (~0.1 s) instead of a Python that imports Ray and connects (~2 s of the 2
        cores, per poll, while what is being waited for starts)."""
        import httpx

        headers = {}
        if self.env.get("RAY_AUTH_MODE") == "token":
            headers["Authorization"] = f"Bearer {Path.home().joinpath('.ray', 'auth_token').read_text().strip()}"
        try:
            r = httpx.get(f"{self.dashboard}{path}", headers=headers, timeout=30)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None  # the dashboard is not up (yet, or any more)

    def alive(self) -> int:
        """Alive nodes, as the GCS sees them, from the dashboard's state API."""
        try:
            nodes = self.api("/api/v0/nodes?limit=10000")["data"]["result"]["result"]
        except (KeyError, TypeError):
            return 0
        return sum(n.get("state") == "ALIVE" for n in nodes)

    def wait_alive(self, n: int, timeout: float = 120) -> None:
        seen = []
        try:
            wait_for(lambda: seen.append(self.alive()) or seen[-1] == n, timeout, f"{n} alive nodes", every=2)
        except AssertionError as e:
            raise AssertionError(f"{e} (the GCS saw {seen[-5:]})") from None

    def kill(self, index: int) -> None:
        """Lose node `index` as a machine is lost: every process of it at once, including
        those that left its process group (a job's driver runs in a session of its own)."""
        import psutil

        try:
            strays = psutil.Process(self.nodes[index].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            strays = []
        try:
            os.killpg(self.nodes[index].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had exited on its own
        for proc in strays:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.nodes[index].wait(timeout=30)
        if index in self.workers:
            self.workers.remove(index)

    def lose_all(self) -> None:
        """Lose the whole cluster at once, head included, as a data-centre outage would."""
        for index, node in enumerate(self.nodes):
            if node.poll() is None:
                self.kill(index)
        self.workers.clear()

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGINT)  # --block: stops this node's processes only
        # A throwaway cluster: a few seconds to stop cleanly, then it is lost like a machine
        # (a graceful stop took over 60 s per node on CI's 2 cores, 4 minutes a run).
        deadline = time.monotonic() + 5
        for index, node in reversed(list(enumerate(self.nodes))):
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(index)
        # Anything that outlived its node (a worker mid-exit) is found by the temp dir.
        out = subprocess.run(["pgrep", "-f", self.root], capture_output=True, text=True).stdout
        for pid in (int(p) for p in out.split() if int(p) != os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
