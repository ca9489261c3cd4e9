"""medray serve against plain `vllm serve`, driven by vLLM's own load generator. Run by hand:
`MEDRAY_VLLM_PYTHON=.venv-vllm/bin/python python bench/serve_peer.py [--repeat 3]`.

The peer a vLLM user would pick instead of medray is `vllm serve` itself, and the client is
one no one on the team wrote: `vllm bench serve --backend openai-chat --endpoint
/v1/chat/completions --dataset-name random-mm` (one 64x64 image a request, 1,000 prompts, 32
at once, 32 output tokens with ignore_eos), with its results saved as JSON, after a warm-up pass of
64 of the same requests (a server's first image requests run slower). Both servers run the
same tiny LLaVA directory with the same engine arguments: float32, max_model_len 512, 32
sequences a step, a 1 GiB KV cache, eager, one thread (what Ray gives a 1-CPU replica:
OMP_NUM_THREADS=1), vLLM's `uni` executor with the model in the engine's process. One server
runs at a time, in turn, `--repeat` times each, on this machine's 2 cores:

- `vllm`: `vllm serve DIR` (vLLM's OpenAI server, stream_interval 1: a chunk per token);
- `medray`: `medray serve` (its own local Ray) with `engine: vllm` and the default
  stream_interval_s (0.05: a chunk per 50 ms);
- `medray-0`: the same with stream_interval_s 0 (a chunk per engine step), so ITL is reported
  both ways;
- `medray-2hop` (not run unless named): `ingress.separate: true`, the ingress a deployment of
  its own and one Ray hop before the model replica (the shape before ServeConfig.one_replica).

Printed: requests/s, output tokens/s, TTFT and ITL at p50 and p99, chunks per answer and the
start-up time of each, as median (min to max); and medray's ratios to vllm. Goals (issue #40):
requests/s and output tokens/s >= 0.95x, TTFT p50 <= 1.2x, p99 <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _profile
import httpx
from _stats import add_repeat, record, spread

HERE = Path(__file__).resolve().parent
KEY = "sk-bench"
ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 32, "kv_cache_gib": 1}
THREADS = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_TARGET_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    from medray.storage.local_s3 import free_port as port

    return port()


def vllm_server(vllm_python: str, model: Path, port: int) -> list[str]:
    return [vllm_python, str(HERE / "_vllm_cli.py"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "m", "--api-key", KEY, "--dtype", ENGINE["dtype"],
            "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
            "--kv-cache-memory-bytes", str(ENGINE["kv_cache_gib"] * 2**30), "--enforce-eager",
            "--distributed-executor-backend", "uni", "--limit-mm-per-prompt", '{"image": 1}', "--seed", "0"]


def medray_server(model: Path, port: int, interval: float | None, workdir: Path, separate: bool = False) -> list[str]:
    import yaml

    spec = {"name": "m", "uri": str(model), "engine": "vllm", "vllm": ENGINE, "cpus_per_replica": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 32}}
    if interval is not None:
        spec["stream_interval_s"] = interval
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "medray", "route_prefix": "/", "import_path": "medray.serve:build_app",
                                # One model on vLLM: one deployment, its replica the ingress too.
                                "args": {"models": [spec], "api_keys": []}}]}
    if separate:  # the ingress as a deployment of its own, one Ray hop before the model
        config["applications"][0]["args"]["ingress"] = {"separate": True, "min_replicas": 1, "max_replicas": 1,
                                                        "cpus_per_replica": 0.25}
    path = workdir / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [str(Path(sys.executable).with_name("medray")), "serve", str(path)]


def start(command: list[str], port: int, env: dict, log: Path) -> tuple[subprocess.Popen, float]:
    """Start a server and wait until it answers a chat request; returns it and its start-up s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    while time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"{command[1:3]} ended ({proc.returncode}); its log: {log}")
        try:
            if httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise SystemExit(f"{command[1:3]} did not answer within 600 s; its log: {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, as a user's Ctrl-C or a supervisor would stop it; then whatever is left of its group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def bench(vllm_python: str, model: Path, port: int, args, out: Path, profile: dict[str, int] | None = None,
          prompts: int | None = None) -> dict:
    """One `vllm bench serve` run against the server on `port`; its saved result. `profile`:
    processes (name -> pid) to sample with py-spy from 3 s into the run for --profile s."""
    prompts = prompts or args.prompts
    command = [vllm_python, str(HERE / "_vllm_cli.py"), "bench", "serve", "--backend", "openai-chat",
               "--endpoint", "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
               "--tokenizer", str(model), "--dataset-name", "random-mm",
               "--random-mm-bucket-config", "{(64, 64, 1): 1.0}",
               "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}', "--random-mm-base-items-per-request", "1",
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos",
               "--num-prompts", str(prompts), "--max-concurrency", str(args.concurrency), "--seed", "0",
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
               "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name]
    run = subprocess.Popen(command, env={**os.environ, **THREADS, "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    if profile:
        time.sleep(3)  # the load generator's own start and its first requests
        sampling = _profile.start(profile, args.profile)
    output, _ = run.communicate()
    if profile:
        for name, parts in _profile.finish(sampling).items():
            total = sum(parts.values())
            print(f"  {name} (pid {profile[name]}): {total:.1f} CPU s sampled in {args.profile:g} s: " + "; ".join(
                f"{part} {100 * s / total:.0f} %" for part, s in parts.items() if s / total >= 0.01), flush=True)
    if run.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{output[-5000:]}")
    result = json.loads(out.read_text())
    if result["completed"] != prompts or result.get("failed"):
        raise SystemExit(f"{result['completed']} of {prompts} answered: {result.get('errors', [])[:3]}")
    return result


def figures(result: dict, startup: float) -> dict[str, float]:
    chunks = [len(itl) + 1 for itl in result["itls"]]  # the first chunk, then one ITL per chunk after it
    return {"req/s": result["request_throughput"], "output tok/s": result["output_throughput"],
            "TTFT p50 ms": result["median_ttft_ms"], "TTFT p99 ms": result["p99_ttft_ms"],
            "ITL p50 ms": result["median_itl_ms"], "ITL p99 ms": result["p99_itl_ms"],
            "chunks per answer": statistics.mean(chunks), "start-up s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000,
                        help="measured requests a run (issue #40 named 200: here that is a run of 3 s)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64, help="random text tokens a prompt, beside its image")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--servers", default="vllm,medray,medray-0", help="which to run, in this order")
    parser.add_argument("--profile", type=float, default=0,
                        help="seconds to sample each server's processes with py-spy during its run (give enough "
                             "--prompts to last that long); prints where their CPU went, records nothing")
    add_repeat(parser)
    args = parser.parse_args()
    vllm_python = os.environ.get("MEDRAY_VLLM_PYTHON")
    if not vllm_python:
        raise SystemExit("set MEDRAY_VLLM_PYTHON to vLLM's interpreter (make vllm: .venv-vllm/bin/python)")
    from medray.models.tiny import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="medray-peer-"))
    model = write_tiny_model("llava-mistral", work / "tiny-llava")
    servers = args.servers.split(",")
    got: dict[str, dict[str, list[float]]] = {s: {} for s in servers}
    for r in range(args.repeat):
        for name in servers:  # in turn, so a slow moment of the machine falls on all of them
            port = free_port()
            if name == "vllm":
                command, env = vllm_server(vllm_python, model, port), THREADS
            else:
                command = medray_server(model, port, 0.0 if name == "medray-0" else None, work,
                                        separate=name == "medray-2hop")
                env = {"MEDRAY_API_KEYS": KEY, "MEDRAY_VLLM_PYTHON": vllm_python}
            proc, startup = start(command, port, env, work / f"{name}-{r}.log")
            titles = ({"API server": ""} if name == "vllm" else
                      {"ingress": "ray::ServeReplica:medray:Api", "replica": "ray::ServeReplica:medray:model-m"})
            titles["engine core"] = "VLLM::EngineCore"
            pids = _profile.find_processes({k: v for k, v in titles.items() if v}) if args.profile else None
            if pids is not None and name == "vllm":
                pids["API server"] = proc.pid
            try:
                # Warmed up first with the same requests: a server's first image requests are
                # slower (vLLM's image processing warms up), and they are not its speed.
                bench(vllm_python, model, port, args, work / f"{name}-{r}-warm.json", prompts=2 * args.concurrency)
                result = bench(vllm_python, model, port, args, work / f"{name}-{r}.json", pids)
            finally:
                stop(proc)
            for key, value in figures(result, startup).items():
                got[name].setdefault(key, []).append(value)
            print(f"run {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in got[name].items()), flush=True)
    lines = [f"vllm bench serve (random-mm, one 64x64 image, {args.input_len} text tokens, {args.output_len} output "
             f"tokens, ignore_eos), {args.prompts} prompts, {args.concurrency} concurrent; tiny LLaVA, "
             f"{ENGINE}, one thread, uni executor:"]
    for name in servers:
        lines.append(f"- {name}: " + "; ".join(f"{k} {spread(v, '{:.1f}')}" for k, v in got[name].items()))
    if "vllm" in got:
        runs = args.repeat
        for name in (s for s in servers if s != "vllm"):
            ratio = {k: [got[name][k][i] / got["vllm"][k][i] for i in range(runs)]
                     for k in ("req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms")}
            lines.append(f"- {name} / vllm, run by run: " + "; ".join(f"{k} {spread(v)}x" for k, v in ratio.items()))
    print("\n".join(lines))
    if not args.no_record and not args.profile:
        record("serve_peer", [line.removeprefix("- ") for line in lines], threads=1)


if __name__ == "__main__":
    main()
