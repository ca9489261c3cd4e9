"""Training benchmarks, run by hand: `python bench/train.py [--steps N]`.

1. Ray Train overhead: samples/s of a stage on one Ray Train worker against a bare
   single-process loop doing the same work (same model, data, collator, optimizer), measured
   in this run. Target: <= 10 % overhead.
2. With a GPU: MFU of an instruction-tuning step of a 7B-size LLaVA (random weights, CLIP-L/14
   336 px = 576 image tokens + 512 text tokens) under FSDP bf16, and a projection of the
   LLaVA-Med recipe's wall time from the measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _stats import add_repeat, record, spread

from medray.data import ChatCollator
from medray.data.synthetic import write_synthetic
from medray.train import Curriculum, StageConfig, run_curriculum
from medray.train._data import RecordsDataset, StepSampler
from medray.train.loop import build_model, seed_everything
from medray.train.strategies import DDPStrategy



def stage_dict(records: str, steps: int, threads: int) -> dict:
    return {"name": "bench", "data": {"records": records}, "train": ["projector", "llm"], "lr": 1e-3,
            "micro_batch_size": 16, "max_steps": steps, "max_length": 160, "log_every": steps // 2,
            "checkpoint_every": 10 * steps, "workers": 1, "cpus_per_worker": threads, "schedule": "constant",
            "warmup_ratio": 0.0}


def bare_loop(records: str, steps: int, threads: int) -> float:
    """samples/s of the second half of `steps` steps, in this process, no Ray."""
    torch.set_num_threads(threads)
    stage = StageConfig.model_validate(stage_dict(records, steps, threads))
    seed_everything(0)
    lm, model = build_model("tiny://llava-mistral", stage, 0, torch.device("cpu"))
    data = RecordsDataset(records)
    sampler = StepSampler(len(data), world=1, micro_batch=stage.micro_batch_size, accum=1, seed=0)
    collate = ChatCollator(lm.processor, max_length=stage.max_length)
    strategy = DDPStrategy(stage, torch.device("cpu"), steps)
    strategy.setup(model)
    t0, n = None, 0
    for step in range(steps):
        if step == steps // 2:
            t0, n = time.perf_counter(), 0
        batch = collate([data[i] for i in sampler.indices(step, 0, 0)])
        strategy.backward(strategy.forward(batch))
        strategy.step(boundary=True)
        n += batch["input_ids"].shape[0]
    return n / (time.perf_counter() - t0)


def _bare_loop_in_a_thread(records: str, steps: int, threads: int) -> float:
    """bare_loop on a thread of its own, as Ray Train runs train_loop_per_worker (its
    TrainingThread). Measured here, in two paired runs of 240 steps: the same loop on a
    process's main thread ran 7-9 % slower (231 against 253, 220 against 237 samples/s).
    The cause is not proven; a plausible one is that glibc gives a non-main thread its own
    malloc arena, which a CPU step allocating many small tensors feels. An earlier bench ran
    the baseline on the main thread, with 40-step windows, and read Ray Train as 17 % faster."""
    import threading

    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(bare_loop(records, steps, threads)))
    worker.start()
    worker.join()
    return result[0]


def bare_loop_in_fresh_process(records: str, steps: int, threads: int) -> float:
    """bare_loop in a new process with the thread settings Ray gives a worker of `threads`
    CPUs (OMP_NUM_THREADS), on a non-main thread as Ray Train's, beside the same running Ray:
    the two loops differ only by Ray Train."""
    import multiprocessing

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_bare_loop_in_a_thread, (records, steps, threads))
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = before


def ray_train(records: str, steps: int, threads: int, out: Path) -> float:
    cur = Curriculum.model_validate({"base_model": "tiny://llava-mistral", "output": str(out),
                                     "stages": [stage_dict(records, steps, threads)]})
    run_curriculum(cur)
    rows = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["samples_per_s"]  # the second half of the steps, as in bare_loop


def gpu_mfu(steps: int = 6) -> None:
    """One GPU, FSDP2 bf16, 7B LLaVA geometry with random weights; prints MFU and a projection."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from medray.train.metrics import peak_flops

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064,
                         max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cuda", (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, fused=True)
    batch_size, text_tokens = 4, 512
    ids = torch.randint(0, 32000, (batch_size, 576 + text_tokens), device="cuda")
    ids[:, :576] = 32000
    pixels = torch.randn(batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    llm_params = sum(p.numel() for p in model.model.language_model.parameters())
    tokens = batch_size * (576 + text_tokens)
    # Trainable LLM: 6 N per token; frozen tower: forward only, 2 N per image token.
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    flops = 6 * llm_params * tokens + 2 * vision_params * batch_size * 576
    mfu = flops / step_s / peak_flops(torch.device("cuda"))
    print(f"7B LLaVA FSDP bf16 step: {step_s * 1000:.0f} ms for {batch_size} x 1088 tokens, MFU {mfu:.1%} "
          f"(target >= 45%)")
    per_sample = step_s / batch_size
    gpus = 8
    # LLaVA-Med v1.0.0: 467K alignment pairs x 1 epoch, 60K instructions x 3 epochs. Stage 1
    # trains only the projector (~1/3 of a full step's cost: no LLM backward); a rough bound.
    stage1 = 467_000 * per_sample / 3 / gpus
    stage2 = 60_000 * 3 * per_sample / gpus
    print(f"projected LLaVA-Med recipe on {gpus} such GPUs: stage 1 ~{stage1 / 3600:.1f} h, "
          f"stage 2 ~{stage2 / 3600:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 240 steps: the second half is ~8 s at 1 thread; 40-step windows varied by +-10 % run to run.
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="torch threads for both loops; one set of runs per value")
    add_repeat(parser)
    args = parser.parse_args()
    # On a small machine Ray's own daemons (raylet, GCS, the Train controller) share the
    # cores with the worker: with torch on every core they steal compute that the bare loop
    # keeps. One thread leaves a core for them and isolates Ray Train's own overhead.
    import ray

    # Up front, so both loops run beside the same idle Ray daemons (run_curriculum attaches).
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    lines = [f"{args.steps} steps of micro-batch 16 (tiny LLaVA, projector + LLM), samples/s over the second half"]
    for threads in args.threads:
        bare, ray = [], []
        for r in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                corpus = write_synthetic("chest-conversations", os.path.join(tmp, "data"), n=args.steps * 16, seed=0)
                # Alternating which goes first, so a drift of the machine does not favour one.
                first_bare = r % 2 == 0
                if first_bare:
                    bare.append(bare_loop_in_fresh_process(corpus.records, args.steps, threads))
                ray.append(ray_train(corpus.records, args.steps, threads, Path(tmp) / "run"))
                if not first_bare:
                    bare.append(bare_loop_in_fresh_process(corpus.records, args.steps, threads))
            print(f"[{threads} thread(s)] run {r + 1}: bare {bare[-1]:.1f}, Ray Train {ray[-1]:.1f} samples/s")
        overhead = [100 * (b / r - 1) for b, r in zip(bare, ray)]
        lines.append(f"{threads} torch thread(s): bare loop {spread(bare, '{:.1f}')} samples/s, Ray Train (1 worker) "
                     f"{spread(ray, '{:.1f}')} samples/s, overhead {spread(overhead, '{:+.1f}')} % (target <= 10 %)")
    print("\n".join(lines))
    if not args.no_record:
        record("train", lines, max(args.threads))
    if torch.cuda.is_available():
        gpu_mfu()
    else:
        print("no GPU here: skipped the 7B FSDP bf16 MFU measurement and the recipe projection")


if __name__ == "__main__":
    main()
