"""Curricula on real Ray Train workers (2 workers, gloo, tiny models, CPU)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medray.models import load_model, resolve_model_uri
from medray.train import Curriculum, StageConflict, load_manifest, run_curriculum

REPO = Path(__file__).resolve().parents[1]


def _stage(**overrides) -> dict:
    stage = {"name": "s", "data": {"synthetic": {"kind": "text-qa", "n": 64, "seed": 1}}, "train": ["llm"],
             "lr": 2e-3, "micro_batch_size": 8, "global_batch_size": 16, "max_steps": 8,
             "max_length": 96, "checkpoint_every": 4, "log_every": 2, "workers": 2, "cpus_per_worker": 0.5}
    stage.update(overrides)
    return stage


def _curriculum(output, stages, base="tiny://llama") -> Curriculum:
    return Curriculum.model_validate({"base_model": base, "output": str(output), "stages": stages})


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def _assert_trained(result, stage_dir: Path, strategy: str) -> None:
    losses = _losses(stage_dir)
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.3, losses
    assert json.loads((stage_dir / "medray_stage.json").read_text())["config"]["strategy"] == strategy
    assert result.metrics["loss"] == pytest.approx(losses[-1])


# fsdp and deepspeed_zero3 train, with these same checks, in test_sharded_strategies_train_and_resume_after_worker_loss.
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_each_strategy_trains_and_the_loss_goes_down(strategy, ray_cluster, tmp_path):
    (result,) = run_curriculum(_curriculum(tmp_path, [_stage(strategy=strategy)]))
    _assert_trained(result, tmp_path / "s", strategy)


def test_tiny_llava_med_curriculum_freezes_exactly_what_each_stage_says(llava_med_run):
    tmp_path, results = llava_med_run  # the manifest as it is, trained once for the session
    cur = load_manifest(REPO / "manifests/tiny/llava-med.yaml", [f"output={tmp_path}"])
    assert [r.skipped for r in results] == [False, False]

    base = _weights(resolve_model_uri(cur.base_model))
    align, instruct = _weights(tmp_path / "align"), _weights(tmp_path / "instruct")
    assert base.keys() == align.keys() == instruct.keys()

    def changed(a, b, key):
        return not torch.equal(a[key], b[key])

    for key in base:  # stage align: the projector and nothing else
        if key.startswith("multi_modal_projector."):
            assert changed(base, align, key), key
        else:
            assert not changed(base, align, key), key
    for key in base:  # stage instruct: the vision tower stays bit-identical
        if key.startswith("vision_tower."):
            assert not changed(align, instruct, key), key
    llm = [k for k in base if k.startswith("language_model.")]
    assert all(changed(align, instruct, k) for k in llm if "layers" in k)

    for stage in ("align", "instruct"):
        d = tmp_path / stage
        assert Image.open(d / "loss.png").size == (640, 360)
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert {"loss", "lr", "samples_per_s", "tokens_per_s"} <= set(rows[-1])
    assert _losses(tmp_path / "instruct")[-1] < _losses(tmp_path / "instruct")[0]

    # The result is a model medray loads directly.
    lm = load_model(str(tmp_path / "instruct"))
    assert lm.family.name == "llava-mistral"

    # A rerun of the finished curriculum does no work.
    stamp = (tmp_path / "instruct" / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = run_curriculum(load_manifest(REPO / "manifests/tiny/llava-med.yaml", [f"output={tmp_path}"]))
    assert [r.skipped for r in again] == [True, True]
    assert time.perf_counter() - t0 < 10
    assert (tmp_path / "instruct" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(StageConflict, match="different configuration"):
        run_curriculum(load_manifest(REPO / "manifests/tiny/llava-med.yaml",
                                     [f"output={tmp_path}", "stages.align.lr=0.5"]))


def test_lora_then_qlora_babydoctor(ray_cluster, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    cur = load_manifest(REPO / "manifests/tiny/babydoctor.yaml", [f"output={tmp_path}"])
    run_curriculum(cur)
    base_dir = resolve_model_uri(cur.base_model)
    base = _weights(base_dir)
    merged = _weights(tmp_path / "lora")
    adapter = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")

    # Base weights untouched: everything LoRA does not target, and the tower, is bit-identical.
    targeted = ("q_proj", "k_proj", "v_proj", "o_proj")
    for key, value in base.items():
        if key.startswith("language_model.") and any(t in key for t in targeted) and key.endswith("weight"):
            continue
        if key.startswith("multi_modal_projector."):
            continue  # trained in full (modules_to_save)
        assert torch.equal(value, merged[key]), key

    # The merged export equals base + (alpha / r) * B @ A, computed by hand.
    a_key = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k)
    lora_a, lora_b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
    assert lora_b.abs().sum() > 0
    w_key = "language_model.model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[w_key], base[w_key] + (16 / 8) * lora_b @ lora_a, rtol=0, atol=1e-6)

    # And equals what PEFT's own merge of the saved adapter gives.
    peft_merged = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir),
                                            tmp_path / "lora" / "adapter").merge_and_unload()
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "lora").state_dict()
    for key, value in peft_merged.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)

    # QLoRA on the 4-bit base: the adapter really trained (B starts at zero).
    qadapter = load_file(tmp_path / "qlora" / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in qadapter if "lora_B" in k]
    assert b_keys and all(qadapter[k].abs().sum() > 0 for k in b_keys)
    assert _losses(tmp_path / "qlora")[-1] < _losses(tmp_path / "qlora")[0]
    assert load_model(str(tmp_path / "qlora")).family.name == "llava-llama"


def test_moe_lora_reaches_experts_and_router(ray_cluster, tmp_path):
    run_curriculum(load_manifest(REPO / "manifests/tiny/bimedix.yaml", [f"output={tmp_path}"]))
    adapter = load_file(tmp_path / "qlora" / "adapter" / "adapter_model.safetensors")
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.mlp."
        router = [k for k in adapter if k.startswith(prefix + "gate.lora_B")]
        experts = [k for k in adapter if k.startswith(prefix + "experts") and "lora_B" in k]
        assert len(router) == 1 and len(experts) == 2  # gate_up_proj and down_proj
        assert all(adapter[k].abs().sum() > 0 for k in router + experts)


def test_unmerged_lora_stage_is_a_loadable_adapter(ray_cluster, tmp_path):
    run_curriculum(load_manifest(REPO / "manifests/tiny/med-alpaca.yaml", [f"output={tmp_path}"]))
    stage = tmp_path / "lora"
    assert (stage / "adapter_config.json").is_file() and not (stage / "config.json").exists()
    assert json.loads((stage / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny://llama"
    lm = load_model(str(stage))
    base = load_model("tiny://llama")
    ids = torch.tensor([[1, 20, 30, 40]])
    assert not torch.allclose(lm.model(input_ids=ids).logits, base.model(input_ids=ids).logits, atol=1e-4)


def _train_worker_pids() -> list[int]:
    import psutil

    # Ray names its actor processes "ray::RayTrainWorker..." in the process title.
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def _checkpoint_registered(output: Path) -> bool:
    # A checkpoint directory appears while it is being written; Ray Train restores from it
    # only once the controller has registered it in its snapshot.
    for snap in output.glob("_ray/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:
            pass  # caught mid-write
    return False


def _kill_a_worker_after_first_checkpoint(output: Path, killed: list) -> threading.Thread:
    def run():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if _checkpoint_registered(output):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_worker_loss_and_resubmission_resume_to_identical_weights(ray_cluster, tmp_path):
    # A worker process killed under max_failures > 0 is restarted by Ray Train and resumes
    # from the checkpoint: tests/test_node_loss.py proves that for a whole lost node, with
    # bit-identical weights. Here: with no retries the run fails, and resubmitting resumes it.
    stage = _stage(max_steps=16, checkpoint_every=4, log_every=4, micro_batch_size=4, global_batch_size=8,
                   lora={"r": 4, "alpha": 8, "dropout": 0.1, "merge": True}, train=[])

    run_curriculum(_curriculum(tmp_path / "clean", [stage]))
    clean = _weights(tmp_path / "clean" / "s")
    killed: list = []

    # With no retries the run fails; resubmitting the same curriculum resumes it.
    thread = _kill_a_worker_after_first_checkpoint(tmp_path / "resubmitted", killed)
    with pytest.raises(Exception):
        run_curriculum(_curriculum(tmp_path / "resubmitted", [{**stage, "max_failures": 0}]))
    thread.join()
    assert killed and not (tmp_path / "resubmitted" / "s" / "medray_stage.json").exists()
    run_curriculum(_curriculum(tmp_path / "resubmitted", [{**stage, "max_failures": 0}]))
    rows = [json.loads(x) for x in (tmp_path / "resubmitted" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["resumed_from"] for r in rows) > 0
    resubmitted = _weights(tmp_path / "resubmitted" / "s")
    assert all(torch.equal(clean[k], resubmitted[k]) for k in clean)


@pytest.mark.gpu
def test_fsdp_bf16_with_nccl_on_gpu(ray_cluster, tmp_path):
    stage = _stage(strategy="fsdp", precision="bf16", workers=1, gpus_per_worker=1, cpus_per_worker=1,
                   global_batch_size=8)
    run_curriculum(_curriculum(tmp_path, [stage]))
    losses = _losses(tmp_path / "s")
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.gpu
def test_qlora_with_bitsandbytes_cuda_kernels(ray_cluster, tmp_path):
    stage = _stage(quantization="nf4", train=[], precision="bf16", workers=1, gpus_per_worker=1,
                   cpus_per_worker=1, global_batch_size=8,
                   lora={"r": 8, "alpha": 16, "dropout": 0.0, "merge": True})
    run_curriculum(_curriculum(tmp_path, [stage]))
    adapter = load_file(tmp_path / "s" / "adapter" / "adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)


def test_curriculum_on_s3_checkpoints_and_results(ray_cluster, bucket):
    from medray import storage

    output = f"{bucket}/runs/alpaca"
    cur = _curriculum(output, [_stage(max_steps=4, checkpoint_every=2, log_every=2)])
    (result,) = run_curriculum(cur)
    assert result.model == f"{output}/s" and not result.skipped
    names = {f.uri[len(output) + 1:] for f in storage.list_files(output)}
    assert {"s/model.safetensors", "s/config.json", "s/metrics.jsonl", "s/loss.png",
            "s/medray_stage.json", "_data/s/records.jsonl"} <= names
    assert any(n.startswith("_ray/") and "/checkpoint_" in n for n in names)  # periodic checkpoints in S3
    assert load_model(f"{output}/s").family.name == "llama"
    assert [r.skipped for r in run_curriculum(cur)] == [True]


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_sharded_strategies_train_and_resume_after_worker_loss(strategy, ray_cluster, tmp_path):
    stage = _stage(strategy=strategy, max_steps=12, checkpoint_every=3, log_every=3, micro_batch_size=4,
                   global_batch_size=8, max_failures=2)
    (result,) = run_curriculum(_curriculum(tmp_path / "clean", [stage]))
    _assert_trained(result, tmp_path / "clean" / "s", strategy)  # the uninterrupted run trains
    killed: list = []
    thread = _kill_a_worker_after_first_checkpoint(tmp_path / "killed", killed)
    run_curriculum(_curriculum(tmp_path / "killed", [stage]))
    thread.join()
    assert killed
    rows = [json.loads(x) for x in (tmp_path / "killed" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["resumed_from"] for r in rows) > 0
    clean, resumed = _weights(tmp_path / "clean" / "s"), _weights(tmp_path / "killed" / "s")
    for k in clean:
        torch.testing.assert_close(resumed[k], clean[k], rtol=0, atol=1e-6)
