"""Batch-inference benchmarks, run by hand: `python bench/infer.py [--images N] [--repeat 3]`.

On the same model and images, measured in this run, each `--repeat` times (median, min, max):
1. the Ray Data pipeline against a LLaVA-Med model_vqa.py-style loop (one image at a time,
   batch 1). Target: >= 8x. Start-up (worker processes, model loads) is reported apart from
   the steady rate, with the corpus size from which the end-to-end ratio passes 8x;
2. the Ray Data pipeline against a bare batched loop without Ray (same batch size), with
   the pipeline's parallelism: one process reads, decodes and encodes batches, as the
   pipeline's CPU tasks do, while another generates and writes shards, as its actor does
   (a thread would not do: on a tiny model generation is Python-bound, and the GIL
   serialises the two). Both steady rates by one rule: rows/s over the second half of the
   rows, which leaves out start-up. Target: <= 10 % overhead.
   Both baselines do the pipeline's work: read and decode each image from storage, encode,
   generate, and write the answers as shards; and they use the torch threads a generation
   actor gets (Ray gives an actor as many as its whole CPUs). A negative overhead would mean
   a baseline doing other work;
3. with a GPU: images/s of a 7B-size LLaVA with random weights (576 image tokens, 64 new
   tokens) on transformers' static `generate`. Target: >= 40 images/s per H100. vLLM is the
   engine to meet it: `--vllm-direct --size 7b`, run with an interpreter that has vLLM,
   measures medray's vLLM engine on the same geometry, every image handed over at once
   (`--vllm-direct` alone runs the small geometry below, on CPU too);

`--engines`: instead of the above, the pipeline on `engine: hf` against `engine: vllm`
(MEDRAY_VLLM_PYTHON=.venv-vllm/bin/python here), same images, same model, rows/s end to end
and steady. The model is a random LLaVA of about 120 MB (`--engines-model`; 8 Mistral layers
of 512 with heads of 64, a 4-layer CLIP tower on 112 px images, 64 image tokens), a size
this machine runs in minutes. There is no goal on CPU, where vLLM's CPU build is for
integration, not speed; on a GPU vLLM is the engine to measure (point 3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from _cpu import CpuTimeline
from _stats import add_repeat, record, spread

from medray import storage
from medray.data import load_image, shards
from medray.data.synthetic import write_synthetic
from medray.infer import GenerationEngine, GenerationSettings, Request
from medray.infer import InferConfig, run_inference
from medray.models import load_model

QUESTION = "Is there an opacity?"


def messages():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _write(uris, answers, out, model) -> None:
    """The answers as one shard, in the pipeline's format: the output work the pipeline does."""
    n = len(uris)
    shards.write_shard({"id": [u.rsplit("/", 1)[1] for u in uris], "image": list(uris), "question": [QUESTION] * n,
                        "answer": [a.text for a in answers], "references": [""] * n, "model": [model] * n,
                        "generation": ["{}"] * n, "latency_s": [0.0] * n,
                        "completion_tokens": [a.completion_tokens for a in answers], "error": [""] * n,
                        "image_type": [""] * n, "expert_text": [""] * n}, output=out, fmt="parquet")


def _fresh_engine(model: str, uri: str, settings, out: str, threads: int) -> GenerationEngine:
    """A model in this (new) process, warmed as the pipeline's warm-up pass warms its actor:
    a first generate and a first shard write (the parquet writer's imports)."""
    torch.set_num_threads(threads)
    engine = GenerationEngine(load_model(model))
    _write([uri], engine.generate([Request(messages(), [load_image(storage.read_bytes(uri), uri)])], settings),
           out, model)
    return engine


def one_at_a_time(model, uris, settings, out, shard_rows, threads) -> float:
    """model_vqa.py's shape: for each question, read the image, build the prompt, generate.
    Start-up (the model load) is not timed: this is its steady rate."""
    engine = _fresh_engine(model, uris[0], settings, out + "-warm", threads)
    t0 = time.perf_counter()
    done, answers = [], []
    for uri in uris:
        image = load_image(storage.read_bytes(uri), uri)
        answers += engine.generate([Request(messages(), [image])], settings)
        done.append(uri)
        if len(done) == shard_rows:
            _write(done, answers, out, model)
            done, answers = [], []
    if done:
        _write(done, answers, out, model)
    return len(uris) / (time.perf_counter() - t0)


def _encode_batches(model: str, chunks: list[list[str]], threads: int, queue) -> None:
    """The pipeline's CPU tasks, in a process of their own: read, decode, encode."""
    torch.set_num_threads(threads)
    engine = GenerationEngine(load_model(model))
    for chunk in chunks:
        queue.put([engine.encode(Request(messages(), [load_image(storage.read_bytes(u), u)])) for u in chunk])


def second_half(marks: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(rows/s, start, end) from the shard that completes half the rows to the last shard.
    `marks` are (time.perf_counter(), rows done) after each shard. The same rule for the bare
    loop and the pipeline: it leaves out start-up and any backlog that built up behind it (the
    pipeline decodes ahead while its actor loads the model, so its first shards arrive in a
    burst)."""
    total = marks[-1][1]
    t_half, n_half = next((t, n) for t, n in marks if n >= total / 2)
    t_end = marks[-1][0]
    return ((total - n_half) / (t_end - t_half) if t_end > t_half else float("nan")), t_half, t_end


def process_kind(pid: int, cmd: str) -> str:
    """The kinds of process CpuTimeline sums CPU by (Ray titles a worker by its task)."""
    if pid == os.getpid():
        return "driver"
    for kind, marks in (("generation actor", ("PackedGenerator", "MapWorker")), ("preprocess", ("preprocess",)),
                        ("read", ("ReadMedrayInput",)), ("bare loop", ("multiprocessing",)),
                        ("Ray's own", ("raylet", "gcs_server", "ray::", "/ray/"))):
        if any(m in cmd for m in marks):
            return kind
    return ""  # not this bench's: left out


def batched(model, uris, settings, batch_size, out, threads, shard_rows) -> tuple[tuple, float]:
    """The pipeline's work and parallelism without Ray: one process reads, decodes and encodes
    batches (the pipeline's CPU tasks) while this one generates and writes shards of
    `shard_rows` (its actor). The steady rate with its window, by the pipeline's rule
    (second_half), and the seconds a row spends in generate calls (generate_s_per_row's rule).

    As in the pipeline, decoding starts before the model has loaded and is not held back
    (Ray Data's queue of blocks is bounded by the object store, which a corpus of this size
    does not reach). With a queue of 2 batches instead, the bare loop still decoded during its
    second half while the pipeline, its decoding done during its actor's start-up, only
    generated: the pipeline read 14.5 % faster than the loop it should be slower than."""
    import multiprocessing

    chunks = [uris[start: start + batch_size] for start in range(0, len(uris), batch_size)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    producer = ctx.Process(target=_encode_batches, args=(model, chunks, threads, queue))
    producer.start()
    engine = _fresh_engine(model, uris[0], settings, out + "-warm", threads)
    marks, done, rows, answers, generating = [], 0, [], [], 0.0
    for i, chunk in enumerate(chunks):
        rows += chunk
        encoded = queue.get()
        t0 = time.perf_counter()
        answers += engine.generate_encoded(encoded, settings)
        generating += time.perf_counter() - t0
        if len(rows) >= shard_rows or i == len(chunks) - 1:
            _write(rows, answers, out, model)
            done += len(rows)
            rows, answers = [], []
            marks.append((time.perf_counter(), done))
    # Joined after the last mark: a torch process takes about a second to exit, which is
    # not work the pipeline does per row (an earlier version timed it, and read 4x slow).
    producer.join()
    return second_half(marks), generating / len(uris)


def in_fresh_process(fn, *args) -> float:
    """Run a baseline in a new process, as the pipeline runs its generation in a new actor
    process every run. Measured here: the same generation stage ran at 363-454 rows/s in one
    process and 640-683 in another, so a baseline that kept one process for every run would
    carry that process's luck into all of them."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    # Not a Pool: its workers are daemons, which may not start the bare loop's decoder process.
    proc = ctx.Process(target=_put_result, args=(result, fn, args))
    proc.start()
    value = result.get()
    proc.join()
    return value


def _put_result(queue, fn, args) -> None:
    queue.put(fn(*args))


def pipeline(model, images_dir, out, new_tokens, batch_size, cpus_per_actor, engine="hf", rows_per_shard=None):
    """The pipeline's summary and its steady rate (with its window) by second_half, from the driver's
    progress callback (called as each shard arrives)."""
    cfg = InferConfig(model=model, input=images_dir, output=out, task="vqa", question=QUESTION,
                      max_new_tokens=new_tokens, batch_size=batch_size, rows_per_shard=rows_per_shard or batch_size,
                      cpus_per_actor=cpus_per_actor, engine=engine,
                      vllm={"max_model_len": 512, "max_num_seqs": batch_size, "kv_cache_gib": 1, "dtype": "float32"})
    marks: list[tuple[float, int]] = []
    summary = run_inference(cfg, progress=False, on_progress=lambda p: marks.append(
        (time.perf_counter(), p.rows_done)))
    return summary, second_half(marks[1:])  # the first call comes once the input is listed


def generate_s_per_row(output: str, batch_size: int) -> float:
    """Seconds a row of a finished run spent in its actor's generate calls: every row carries
    its call's duration (latency_s), and a call answers batch_size rows (the last of a run
    fewer, which a corpus of thousands does not see). The same work the bare loop times around
    its generate calls: with both, the overhead splits into time inside the generate calls
    (the same code made slower: the other core's load, the process's luck) and time outside
    them (the actor waiting for rows, or Ray's per-call work)."""
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["latency_s"])
    return float(sum(table.column("latency_s").to_pylist())) / batch_size / table.num_rows


def gpu_images_per_s(new_tokens: int = 64, batch_size: int = 64) -> None:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32064, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_index=32000)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch_size, 576 + 32), device="cuda")
    ids[:, :576] = 32000
    pixels = torch.randn(batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
        torch.cuda.synchronize()
    print(f"7B LLaVA bf16, batch {batch_size}, 576 image + 32 text tokens, {new_tokens} new tokens: "
          f"{batch_size / (time.perf_counter() - t0):.1f} images/s (target >= 40 per H100)")


GEOMETRIES = {
    # ~30M parameters, a size this machine runs in minutes: 8 Mistral layers of 512 with heads of
    # 64, a 4-layer CLIP tower on 112 px images (64 image tokens).
    "small": (dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=64),
              dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=112, patch_size=14)),
    # LLaVA-Med v1.5's: Mistral-7B and CLIP ViT-L/14 at 336 px (576 image tokens). The vocabulary
    # stays the tiny tokenizer's (what the random model writes must decode): 0.1 % of 7B's work.
    "7b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=4096),
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14)),
}


def write_random_llava(out: str, size: str = "small") -> str:
    """A random LLaVA of GEOMETRIES[size] in the published layout (medray's writer, which
    vLLM loads as it is): tiny://llava-mistral's tokenizer, chat template and processor, with
    the geometry's size; bfloat16 weights for 7b."""
    import json
    import shutil

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from medray.models import resolve_model_uri
    from medray.models.saving import save_model

    text, vision = GEOMETRIES[size]
    tiny = resolve_model_uri("tiny://llava-mistral")
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = LlavaConfig.from_pretrained(tiny)
    config.text_config.update(text)
    config.vision_config.update(vision)
    torch.manual_seed(0)
    with torch.device("cuda" if size == "7b" and torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).eval()
    save_model(model.to(torch.bfloat16) if size == "7b" else model, out)
    del model
    proc_path = os.path.join(out, "processor_config.json")
    proc = json.loads(open(proc_path).read())
    proc["patch_size"] = vision["patch_size"]
    side = vision["image_size"]
    proc["image_processor"].update(crop_size={"height": side, "width": side}, size={"shortest_edge": side})
    open(proc_path, "w").write(json.dumps(proc, indent=2))
    return out


def vllm_images_per_s(args) -> None:
    """Point 3 on vLLM (`--vllm-direct`): medray's VLLMEngine, as a batch actor runs it, over
    a random LLaVA of `--size` (7b: 576 image tokens), every image handed over at once, each
    answer `--new-tokens` long unless the random model ends it (the mean is printed). Run
    with vLLM's interpreter; 7b on a GPU (goal >= 40 images/s per H100-class GPU)."""
    from PIL import Image

    from medray.data.synthetic import chest_image
    from medray.infer import encode_request
    from medray.engines.vllm import load_vllm_engine
    from medray.infer.stages import _processor

    gpu = torch.cuda.is_available()
    rates, tokens = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.engines_model or write_random_llava(os.path.join(tmp, "llava"), args.size)
        options = {"max_model_len": 1024, "max_num_seqs": args.batch_size,
                   "dtype": "bfloat16" if gpu else "float32", **({} if gpu else {"kv_cache_gib": 1})}
        engine = load_vllm_engine(model, options=options)
        processor, _ = _processor(model)  # as the pipeline's CPU stage loads it
        images = [Image.fromarray(chest_image(("left", "right", "none")[i % 3], 256, seed=i)).convert("RGB")
                  for i in range(args.images)]
        encoded = [encode_request(processor, Request(messages(), [image]), expand=False) for image in images]
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        engine.generate_encoded(encoded[:8], settings)  # warm: first steps, CUDA graphs' capture done at load
        for r in range(args.repeat):
            t0 = time.perf_counter()
            answers = engine.generate_encoded(encoded, settings)
            rates.append(len(answers) / (time.perf_counter() - t0))
            tokens.append(sum(a.completion_tokens for a in answers) / len(answers))
            print(f"run {r + 1}: {rates[-1]:.2f} images/s, {tokens[-1]:.1f} new tokens per answer")
    image_tokens = (GEOMETRIES[args.size][1]["image_size"] // GEOMETRIES[args.size][1]["patch_size"]) ** 2
    lines = [f"vLLM ({'GPU: ' + torch.cuda.get_device_name() if gpu else 'CPU'}), random LLaVA "
             f"{args.engines_model or args.size}, {image_tokens} image tokens, {args.images} images at once "
             f"(max_num_seqs {args.batch_size}), up to {args.new_tokens} new tokens: {spread(rates, '{:.2f}')} "
             f"images/s, {spread(tokens, '{:.1f}')} new tokens per answer"
             + (" (goal >= 40 images/s per H100-class GPU)" if gpu and args.size == "7b" else "")]
    print("\n".join(lines))
    if not args.no_record:
        record("infer (vLLM direct)", lines)


def compare_engines(args) -> None:
    """Point `--engines` of the module docstring."""
    if not os.environ.get("MEDRAY_VLLM_PYTHON"):
        raise SystemExit("set MEDRAY_VLLM_PYTHON to vLLM's interpreter (make vllm: .venv-vllm/bin/python)")
    runs: dict[str, list[float]] = {k: [] for k in ("hf", "vllm", "hf_steady", "vllm_steady")}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.engines_model or write_random_llava(os.path.join(tmp, "small-llava"))
        write_synthetic("chest-vqa", os.path.join(tmp, "c"), n=args.images, seed=0)
        images_dir = os.path.join(tmp, "c", "images")
        for engine in ("hf", "vllm"):  # warm: worker processes, imports, the model cache
            pipeline(model, images_dir, os.path.join(tmp, f"warm-{engine}"), args.new_tokens, args.batch_size,
                     args.cpus_per_actor, engine)
        for r in range(args.repeat):
            for engine in ("hf", "vllm"):
                summary, _ = pipeline(model, images_dir, os.path.join(tmp, f"{engine}-{r}"), args.new_tokens,
                                           args.batch_size, args.cpus_per_actor, engine)
                assert summary.errors == 0 and summary.rows == args.images, summary
                runs[engine].append(summary.rows_per_s)
                # After start-up (the first shard): the engines' own rates. second_half
                # needs more shards than a few hundred images make here.
                runs[f"{engine}_steady"].append((summary.rows - summary.first_rows)
                                                / (summary.seconds - summary.first_rows_s))
            print(f"run {r + 1}: hf {runs['hf'][-1]:.2f}, vllm {runs['vllm'][-1]:.2f} images/s end to end")
    ratio = [v / h for v, h in zip(runs["vllm"], runs["hf"])]
    steady = [v / h for v, h in zip(runs["vllm_steady"], runs["hf_steady"])]
    lines = [
        f"engines: {args.images} images, {args.new_tokens} new tokens, batch {args.batch_size}, "
        f"model {args.engines_model or 'a random LLaVA of ~30M parameters (write_random_llava)'}",
        f"hf: {spread(runs['hf'], '{:.2f}')} images/s end to end, {spread(runs['hf_steady'], '{:.2f}')} after the first shard",
        f"vllm: {spread(runs['vllm'], '{:.2f}')} images/s end to end, {spread(runs['vllm_steady'], '{:.2f}')} after the first shard",
        f"vllm / hf: {spread(ratio)}x end to end, {spread(steady)}x after the first shard (no goal on CPU)",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("infer (engines)", lines)


def crossover(single: float, steady: float, first_s: float, first_rows: int, target: float = 8.0) -> float | None:
    """Corpus size from which the end-to-end rate passes `target` x one-at-a-time: the run
    takes first_s for its first shard, then (N - first_rows) / steady."""
    if steady <= target * single:
        return None
    return max(first_rows, target * single * (first_s - first_rows / steady) / (1 - target * single / steady))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    # 64: a caption's length, and the GPU target's. With 16, one batch generated in ~60 ms on
    # the tiny model, and the second half of 1,024 rows lasted about a second.
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-images", type=int, default=256,
                        help="images for the one-at-a-time loop (its rate is flat: no start-up is timed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=256,
                        help="rows per shard, in the pipeline and the baselines alike (the pipeline's default)")
    parser.add_argument("--model", default="tiny://llava-mistral")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--engines", action="store_true", help="compare engine hf with engine vllm (see above)")
    parser.add_argument("--engines-model", default=None,
                        help="--engines, --vllm-direct: a model URI instead of a random LLaVA")
    parser.add_argument("--vllm-direct", action="store_true",
                        help="images/s of medray's vLLM engine alone, on a random LLaVA of --size (see point 3)")
    parser.add_argument("--size", choices=sorted(GEOMETRIES), default="small", help="--vllm-direct: the geometry")
    add_repeat(parser)
    args = parser.parse_args()
    if args.vllm_direct:
        return vllm_images_per_s(args)
    import ray

    threads = max(1, int(args.cpus_per_actor))  # what Ray gives a generation actor
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # as Ray sets it in the actor; the baselines' processes inherit it
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if args.engines:
        return compare_engines(args)
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    runs: dict[str, list[float]] = {k: [] for k in ("single", "bare", "whole", "steady", "startup", "cross",
                                                    "gen_bare", "gen_pipe")}
    # CPU by kind of process over each steady half: what ran beside the generation.
    timeline = CpuTimeline(process_kind).start()
    cpu: dict[str, dict[str, list[float]]] = {"bare": {}, "pipeline": {}}

    def add_cpu(which: str, start: float, end: float) -> None:
        for kind, cores in timeline.cores(start, end).items():
            cpu[which].setdefault(kind, []).append(cores)

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic("chest-vqa", os.path.join(tmp, "c"), n=args.images, seed=0)
        images_dir = os.path.join(tmp, "c", "images")
        uris = [f.uri for f in storage.list_files(images_dir)]
        # A first pass warms Ray's worker processes (imports, model cache); the later ones are
        # measured. A few shards do that: at 100,000 images a whole pass was 6 minutes.
        warm_dir = images_dir
        if args.images > 2048:
            warm_dir = os.path.join(tmp, "w", "images")
            write_synthetic("chest-vqa", os.path.join(tmp, "w"), n=2048, seed=1)
        pipeline(args.model, warm_dir, os.path.join(tmp, "warm"), args.new_tokens, args.batch_size,
                 args.cpus_per_actor, rows_per_shard=args.rows_per_shard)
        for r in range(args.repeat):
            runs["single"].append(in_fresh_process(one_at_a_time, args.model, uris[:args.single_images], settings,
                                                   os.path.join(tmp, f"single-{r}"), args.rows_per_shard, threads))
            (bare, *window), gen_bare = in_fresh_process(batched, args.model, uris, settings, args.batch_size,
                                                         os.path.join(tmp, f"bare-{r}"), threads, args.rows_per_shard)
            add_cpu("bare", *window)
            runs["bare"].append(bare)
            runs["gen_bare"].append(gen_bare)
            out = os.path.join(tmp, f"out-{r}")
            summary, (steady_rate, *window) = pipeline(args.model, images_dir, out, args.new_tokens, args.batch_size,
                                                       args.cpus_per_actor, rows_per_shard=args.rows_per_shard)
            add_cpu("pipeline", *window)
            runs["gen_pipe"].append(generate_s_per_row(out, args.batch_size))
            runs["whole"].append(summary.rows_per_s)
            runs["steady"].append(steady_rate)
            runs["startup"].append(summary.first_rows_s)
            cross = crossover(runs["single"][-1], steady_rate, summary.first_rows_s, summary.first_rows)
            runs["cross"].append(cross if cross is not None else float("inf"))
            print(f"run {r + 1}: one-at-a-time {runs['single'][-1]:.1f}, bare {runs['bare'][-1]:.1f}, pipeline "
                  f"{summary.rows_per_s:.1f} end to end / {steady_rate:.1f} steady images/s, "
                  f"first shard after {summary.first_rows_s:.1f} s; generate calls {1e3 * gen_bare:.2f} ms a row "
                  f"bare, {1e3 * runs['gen_pipe'][-1]:.2f} in the pipeline")
    e2e = [w / s for w, s in zip(runs["whole"], runs["single"])]
    steady = [w / s for w, s in zip(runs["steady"], runs["single"])]
    overhead = [100 * (b / s - 1) for b, s in zip(runs["bare"], runs["steady"])]
    # bare / pipeline = (pipeline's generate time a row / bare's) x (the rest): the first factor
    # is the same calls run slower, the second the time the actor spends outside them.
    inside = [100 * (p / b - 1) for p, b in zip(runs["gen_pipe"], runs["gen_bare"])]
    outside = [100 * ((1 + o / 100) / (1 + i / 100) - 1) for o, i in zip(overhead, inside)]
    lines = [
        f"{args.images} images, {args.new_tokens} new tokens, batch {args.batch_size}, shards of "
        f"{args.rows_per_shard} rows, model {args.model}, "
        f"{threads} torch thread(s) per generation process",
        f"one at a time (model_vqa.py style, {min(args.single_images, args.images)} images): "
        f"{spread(runs['single'], '{:.1f}')} images/s",
        f"bare batched loop (decode in a second process), steady: {spread(runs['bare'], '{:.1f}')} images/s",
        f"pipeline: {spread(runs['whole'], '{:.1f}')} images/s end to end, {spread(runs['steady'], '{:.1f}')} "
        f"steady; start-up (first shard) {spread(runs['startup'], '{:.1f}')} s",
        f"pipeline / one-at-a-time: {spread(e2e)}x end to end, {spread(steady)}x steady (target >= 8x)",
        f"end to end passes 8x from about {spread(runs['cross'], '{:.0f}')} images",
        f"pipeline overhead against the bare loop (steady): {spread(overhead, '{:+.1f}')} % (target <= 10 %)",
        f"of which inside the generate calls (ms a row: bare {spread([1e3 * g for g in runs['gen_bare']], '{:.2f}')}, "
        f"pipeline {spread([1e3 * g for g in runs['gen_pipe']], '{:.2f}')}): {spread(inside, '{:+.1f}')} %; outside "
        f"them (the actor waiting, Ray's per-call work): {spread(outside, '{:+.1f}')} %",
        "CPU over the steady half, in cores (median of runs): " + "; ".join(
            f"{which}: " + ", ".join(f"{kind} {statistics.median(v):.2f}" for kind, v in kinds.items()
                                      if statistics.median(v) >= 0.005)
            for which, kinds in cpu.items()),
    ]
    timeline.stop()
    print("\n".join(lines))
    if not args.no_record:
        record("infer", lines, threads)
    if torch.cuda.is_available():
        gpu_images_per_s()
    else:
        print("no GPU here: skipped the 7B images/s measurement")


if __name__ == "__main__":
    main()
