"""Serving benchmarks, run by hand: `python bench/serve.py [--model URI] [--requests N]`.

Measured in one run, on one model, one replica, the same image request:
1. at 32 concurrent clients, requests/s with dynamic batching (max_batch_size 32) against
   requests/s without (max_batch_size 1). Target: >= 4x;
   and the same requests streamed (`stream: true`, every chunk read) against non-streamed,
   both batched. Target: >= 0.9x. Beside it, the CPU each process (the client too) spent
   per request of each kind: on 2 cores the run is CPU-bound, so that sum sets the req/s;
2. the latency HTTP and Serve add over a direct in-process model call (decode the image,
   generate), sequential requests taken in turn with the direct calls, p50 and p99.
   Target: <= 10 ms at p50. Measured on the
   unbatched deployment: with batching, a lone request also waits up to batch_wait_timeout_s
   for company, which is a setting, not overhead. Printed beside it: Ray Serve's own cost for
   the same two hops with nothing in them, the floor under the figure on this machine, and
   the CPU time each Serve process (proxy, ingress, replica) spends per request, from /proc;
3. mixed lengths: the p50 latency of 4-token requests from 16 clients while 16 others send
   64-token requests, against their p50 alone. Target on vLLM: <= 1.25x (continuous batching:
   a short request leaves at its own last step); static batches on hf wait for the longest row.

`--engine vllm` runs 1 and 3 on vLLM (`engine: vllm`; MEDRAY_VLLM_PYTHON=.venv-vllm/bin/python
on this machine), whose figures are recorded apart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import time
from pathlib import Path

import httpx

from medray.raycluster import SERVE_FAST_PATH_ENV, use_serve_fast_path

# What medray's own local instances run (raycluster.connect), set before Serve is imported here:
# Serve reads its mode at import, in this driver as in the cluster's processes. Run with
# RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0 to measure Serve's Python proxy
# (recorded apart, as "serve (python proxy)").
use_serve_fast_path()
HAPROXY = os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"

import ray  # noqa: E402
import torch  # noqa: E402
from _stats import add_repeat, record, spread  # noqa: E402
from ray import serve  # noqa: E402

from medray.data import load_image
from medray.data.synthetic import chest_image, png_bytes
from medray.infer import GenerationEngine, GenerationSettings, Request
from medray.models import load_model
from medray.serve import build_app
from medray.storage.local_s3 import free_port

KEY = "sk-bench"
QUESTION = "Is there an opacity?"


def body(image: bytes, max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}


def deploy(model: str, max_batch_size: int, port: int, engine: str = "hf", stream_interval_s: float | None = None) -> str:
    spec = {"name": "m", "uri": model, "max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.01,
            "cpus_per_replica": 1, "engine": engine,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64}}
    if stream_interval_s is not None:
        spec["stream_interval_s"] = stream_interval_s
    if engine == "vllm":
        spec["vllm"] = {"max_model_len": 512, "max_num_seqs": 32, "kv_cache_gib": 1, "dtype": "float32"}
    args = {"models": [spec], "api_keys": [KEY]}
    serve.run(build_app(args), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1/chat/completions"


async def throughput(url: str, request: dict, clients: int, total: int) -> float:
    """Requests/s of `clients` concurrent callers; a streamed request counts when its last
    chunk has been read."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def one():
            if not request.get("stream"):
                (await client.post(url, json=request, headers=headers)).raise_for_status()
                return
            async with client.stream("POST", url, json=request, headers=headers) as response:
                response.raise_for_status()
                lines = [line async for line in response.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]", lines[-3:]

        for _ in range(2):  # warm up
            await one()
        left = total

        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return total / (time.perf_counter() - t0)


async def short_latencies(url: str, short: dict, long: dict | None, clients: int, per_client: int):
    """p50 latency of short requests from clients/2 callers (per_client each), with the other
    half sending long requests the whole time (`long`), or alone (None); and the long
    requests' mean completion tokens."""
    headers = {"Authorization": f"Bearer {KEY}"}
    half = clients // 2
    lat, long_tokens = [], []
    running = half
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        for _ in range(2):  # warm up
            (await client.post(url, json=short, headers=headers)).raise_for_status()

        async def short_caller():
            nonlocal running
            for _ in range(per_client):
                t0 = time.perf_counter()
                (await client.post(url, json=short, headers=headers)).raise_for_status()
                lat.append(time.perf_counter() - t0)
            running -= 1

        async def long_caller():
            while running:
                r = await client.post(url, json=long, headers=headers)
                r.raise_for_status()
                long_tokens.append(r.json()["usage"]["completion_tokens"])

        await asyncio.gather(*(short_caller() for _ in range(half)),
                             *(long_caller() for _ in range(clients - half) if long is not None))
    return statistics.median(lat), (statistics.mean(long_tokens) if long_tokens else 0.0)


def deploy_floor(port: int) -> str:
    """The same two hops with no medray in them: a FastAPI ingress that awaits one handle call
    to a second deployment, which returns at once. What Ray Serve itself costs on this machine
    for medray's shape (proxy -> ingress -> model replica), the floor under the added latency."""
    from fastapi import FastAPI

    floor_app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Inner:
        async def call(self, x: int) -> int:
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(floor_app)
    class Outer:
        def __init__(self, inner):
            self.inner = inner

        @floor_app.post("/call")
        async def call(self) -> dict:
            return {"x": await self.inner.call.remote(1)}

    serve.run(Outer.bind(Inner.bind()), name="floor", route_prefix="/floor")
    return f"http://127.0.0.1:{port}/floor/call"


def latencies(url: str, floor_url: str, model: str, image: bytes, max_tokens: int, n: int) -> dict[str, list[float]]:
    """Sequential requests, taken in turn so that all four see the same machine: a chat request
    over HTTP (`http`), the same generation called in this process (`direct`: decode the
    image, generate), GET /healthz (`health`: the proxy and ingress hop alone), and the floor
    app (`floor`). One run of each before the others would let a busy moment of this shared
    machine fall on one of them only."""
    torch.set_num_threads(1)  # what a 1-CPU replica gets (Ray sets OMP_NUM_THREADS=1)
    engine = GenerationEngine(load_model(model))
    settings = GenerationSettings(max_new_tokens=max_tokens)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    headers = {"Authorization": f"Bearer {KEY}"}
    request = body(image, max_tokens)
    calls = {
        "http": lambda c: c.post(url, json=request, headers=headers).raise_for_status(),
        "direct": lambda c: engine.generate([Request(messages, [load_image(image)])], settings),
        "health": lambda c: c.get(url.replace("/v1/chat/completions", "/healthz")).raise_for_status(),
        "floor": lambda c: c.post(floor_url, json={}).raise_for_status(),
    }
    out: dict[str, list[float]] = {k: [] for k in calls}
    with httpx.Client(timeout=120) as client:
        for i in range(n + 3):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call(client)
                if i >= 3:  # the first few warm up
                    out[name].append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


# The Serve processes a request crosses, by the title Ray gives each (`ray::<name>`).
HOPS = {"proxy": "ray::ProxyActor", "haproxy": "haproxy", "ingress": "ray::ServeReplica:bench:Api",
        "model replica": "ray::ServeReplica:bench:model-m", "floor ingress": "ray::ServeReplica:floor:Outer",
        "floor deployment": "ray::ServeReplica:floor:Inner", "vllm engine core": "VLLM::EngineCore"}


def process_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of each process in HOPS, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name, prefix in HOPS.items():
            if title == prefix or (prefix == "haproxy" and title.endswith("/haproxy")):
                out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def throughput_and_cpu(url: str, request: dict, clients: int, total: int) -> tuple[float, dict[str, float]]:
    """`throughput`, and the CPU milliseconds per request that each process spent meanwhile:
    the Serve processes of this app (HOPS) and the client (this process). On 2 cores the run
    is CPU-bound, so what one kind of request costs in CPU, summed over the processes, sets
    its req/s; this says where a streamed request's extra cost goes."""
    before, client = process_cpu(), time.process_time()
    rate = asyncio.run(throughput(url, request, clients, total))
    after, client = process_cpu(), time.process_time() - client
    n = total + 2  # the warm-up requests too
    cpu = {"client": client * 1e3 / n}
    cpu.update({k: (v - before.get(k, 0.0)) * 1e3 / n for k, v in after.items() if not k.startswith("floor")})
    return rate, cpu


def cpu_per_request(url: str, floor_url: str, image: bytes, max_tokens: int, n: int) -> dict[str, float]:
    """CPU milliseconds each Serve process spends per request, over `n` sequential chat
    requests and then `n` to the floor app: what the hops cost, whatever the wall clock
    shows on a shared machine."""
    headers = {"Authorization": f"Bearer {KEY}"}
    request = body(image, max_tokens)
    out: dict[str, float] = {}
    with httpx.Client(timeout=120) as client:
        for label, call in (("chat", lambda: client.post(url, json=request, headers=headers)),
                            ("floor", lambda: client.post(floor_url, json={}))):
            call().raise_for_status()
            before = process_cpu()
            for _ in range(n):
                call().raise_for_status()
            after = process_cpu()
            for name in after:  # the proxies serve both; the rest belong to one app each
                if name in ("proxy", "haproxy") or name.startswith("floor") == (label == "floor"):
                    out[f"{label}: {name}"] = (after[name] - before.get(name, 0.0)) * 1e3 / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny://llava-mistral")
    parser.add_argument("--requests", type=int, default=256, help="requests per throughput run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--mixed-requests", type=int, default=8, help="short requests per short client")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="vllm: MEDRAY_VLLM_PYTHON names vLLM's interpreter where it is not in this environment")
    parser.add_argument("--stream-interval", type=float, default=None,
                        help="the model's stream_interval_s (default: ModelSpec's)")
    parser.add_argument("--only", choices=["streamed", "latency"], default=None,
                        help="measure only the streamed ratio of 1, or 2 (hf); prints, records nothing")
    add_repeat(parser)
    args = parser.parse_args()

    image = png_bytes(chest_image("left"))
    request = body(image, args.max_tokens)
    short, long = body(image, 4), body(image, 64)
    port = free_port()
    ray.init(log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[float]] = {k: [] for k in ("batched", "streamed", "stream_ratio", "unbatched", "speedup",
                                                    "p50", "p99", "health50", "floor50", "mixed", "long_tokens")}
    cpu: dict[str, list[float]] = {}  # "chat: ingress" -> CPU ms per request, per run
    stream_cpu: dict[str, list[float]] = {}  # "streamed: ingress" -> CPU ms per request, per run
    vllm = args.engine == "vllm"
    if args.only == "streamed":
        for r in range(args.repeat):
            url = deploy(args.model, 32, port, args.engine, args.stream_interval)
            batched = asyncio.run(throughput(url, request, args.clients, args.requests))
            streamed = asyncio.run(throughput(url, {**request, "stream": True}, args.clients, args.requests))
            print(f"run {r + 1}: {batched:.1f} req/s batched, {streamed:.1f} streamed: {streamed / batched:.2f}x",
                  flush=True)
            serve.delete("bench")
        return
    if args.only == "latency":
        for r in range(args.repeat):
            url = deploy(args.model, 1, port)
            floor_url = deploy_floor(port)
            lat = latencies(url, floor_url, args.model, image, args.max_tokens, args.latency_requests)
            print(f"run {r + 1}: added p50 {(pct(lat['http'], 50) - pct(lat['direct'], 50)) * 1e3:.1f} ms; p50s: "
                  + ", ".join(f"{k} {pct(v, 50) * 1e3:.1f} ms" for k, v in lat.items()), flush=True)
            print("  CPU ms per request: " + ", ".join(
                f"{k} {v:.2f}" for k, v in cpu_per_request(url, floor_url, image, args.max_tokens, 100).items()))
            serve.delete("floor")
            serve.delete("bench")
        return
    for r in range(args.repeat):
        url = deploy(args.model, 32, port, args.engine, args.stream_interval)
        batched, batched_cpu = throughput_and_cpu(url, request, args.clients, args.requests)
        streamed, streamed_cpu = throughput_and_cpu(url, {**request, "stream": True}, args.clients, args.requests)
        for label, costs in (("non-streamed", batched_cpu), ("streamed", streamed_cpu)):
            for hop, ms in costs.items():
                stream_cpu.setdefault(f"{label}: {hop}", []).append(ms)
            stream_cpu.setdefault(f"{label}: all", []).append(sum(costs.values()))
        alone, _ = asyncio.run(short_latencies(url, short, None, args.clients, args.mixed_requests))
        mixed, tokens = asyncio.run(short_latencies(url, short, long, args.clients, args.mixed_requests))
        runs["batched"].append(batched)
        runs["streamed"].append(streamed)
        runs["stream_ratio"].append(streamed / batched)
        runs["mixed"].append(mixed / alone)
        runs["long_tokens"].append(tokens)
        line = (f"run {r + 1}: {batched:.1f} req/s batched, {streamed:.1f} streamed, short p50 {alone * 1e3:.0f} ms "
                f"alone, {mixed * 1e3:.0f} ms mixed")
        if not vllm:
            url = deploy(args.model, 1, port)  # replaces the batched app
            unbatched = asyncio.run(throughput(url, request, args.clients, args.requests))
            floor_url = deploy_floor(port)
            lat = latencies(url, floor_url, args.model, image, args.max_tokens, args.latency_requests)
            runs["unbatched"].append(unbatched)
            runs["speedup"].append(batched / unbatched)
            runs["p50"].append((pct(lat["http"], 50) - pct(lat["direct"], 50)) * 1e3)
            runs["p99"].append((pct(lat["http"], 99) - pct(lat["direct"], 99)) * 1e3)
            runs["health50"].append(pct(lat["health"], 50) * 1e3)
            runs["floor50"].append(pct(lat["floor"], 50) * 1e3)
            for hop, ms in cpu_per_request(url, floor_url, image, args.max_tokens, 100).items():
                cpu.setdefault(hop, []).append(ms)
            serve.delete("floor")
            line += f", {unbatched:.1f} unbatched, added p50 {runs['p50'][-1]:.1f} ms"
        serve.delete("bench")
        print(line)
    mode = ("HAProxy ingress" if HAPROXY else "Serve's Python proxy") + \
        " (" + ", ".join(f"{k}={os.environ[k]}" for k in SERVE_FAST_PATH_ENV) + ")"
    lines = [(f"engine {args.engine}, model {args.model}, {args.max_tokens} new tokens, {args.clients} clients, "
             f"{args.requests} requests, stream_interval_s "
             f"{'default' if args.stream_interval is None else args.stream_interval}; Serve: {mode}")]
    lines.append(f"throughput {spread(runs['batched'], '{:.1f}')} req/s"
                 + ("" if vllm else f" with batching, without {spread(runs['unbatched'], '{:.1f}')} req/s"))
    if not vllm:
        lines.append(f"batching speed-up {spread(runs['speedup'])}x (target >= 4x)")
    lines.append(f"streamed: {spread(runs['streamed'], '{:.1f}')} req/s, {spread(runs['stream_ratio'])}x the "
                 f"non-streamed (target >= 0.9x)")
    lines.append("CPU per request at 32 clients (ms, the client included): "
                 + "; ".join(f"{k} {spread(v, '{:.2f}')}" for k, v in sorted(stream_cpu.items())))
    lines.append(f"mixed lengths (half the clients 4 tokens, half 64: {spread(runs['long_tokens'], '{:.0f}')} "
                 f"generated): the short requests' p50 is {spread(runs['mixed'])}x their p50 alone"
                 + (" (target <= 1.25x)" if vllm else " (static batches wait for their longest row)"))
    if not vllm:
        lines += [
            (f"latency added by HTTP + Serve over a direct call: p50 {spread(runs['p50'], '{:.1f}')} ms "
            f"(target <= 10 ms), p99 {spread(runs['p99'], '{:.1f}')} ms"),
            f"of which the proxy + ingress hop alone (GET /healthz), p50: {spread(runs['health50'], '{:.1f}')} ms",
            (f"Ray Serve's own floor for these two hops (an empty FastAPI ingress awaiting an empty deployment), "
            f"p50: {spread(runs['floor50'], '{:.1f}')} ms"),
            ("CPU each process spends per sequential request (ms; the wall clock's floor on 2 cores): "
             + "; ".join(f"{hop} {spread(v, '{:.2f}')}" for hop, v in cpu.items())),
        ]
    print("\n".join(lines))
    if not args.no_record:
        record(("serve" if not vllm else "serve (engine vllm)") + ("" if HAPROXY else " (python proxy)"), lines)


if __name__ == "__main__":
    main()
