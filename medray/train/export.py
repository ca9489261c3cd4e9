"""Writing a stage's result: an HF model directory (merged) and/or a PEFT adapter directory.

Only trainable tensors come from the workers: everything frozen is, by definition, the
stage's start model. So rank 0 rebuilds the start model in full precision on CPU (never
quantized: a QLoRA stage exports base + adapter merged in full precision), applies the
same parts/LoRA set-up, loads the trained tensors, and saves.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from medray import storage
from medray.models import load_model
from medray.models.processing import save_processor
from medray.models.saving import save_model
from medray.provenance import write_digest

from .config import StageConfig
from .metrics import MetricsLog
from .parts import apply_lora, freeze_all_but

log = logging.getLogger(__name__)


def export_stage(start_uri: str, stage: StageConfig, seed: int, trainable: dict[str, torch.Tensor],
                 dest: str, metrics: MetricsLog) -> str:
    """Write the stage's model to `dest`; returns its digest (medray.provenance.digest_dir),
    taken here, where the files are local, and written beside them (medray_digest.json) so
    the driver need not fetch an S3 output back to know it."""
    lm = load_model(start_uri, device="cpu", dtype=torch.float32)
    model = lm.model
    freeze_all_but(model, lm.family, stage.train)
    if stage.lora is not None:
        torch.manual_seed(seed)
        model = apply_lora(model, lm.family, stage.lora, stage.train)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if expected != set(trainable):
        raise RuntimeError(f"trained tensors do not match the rebuilt model: missing "
                           f"{sorted(expected - set(trainable))[:3]}, extra {sorted(set(trainable) - expected)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].dtype))

    with tempfile.TemporaryDirectory(prefix="medray-export-") as tmp:
        out = Path(tmp) / "stage"
        out.mkdir()
        if stage.lora is not None:
            adapter_dir = out / "adapter" if stage.lora.merge else out
            model.save_pretrained(adapter_dir, safe_serialization=True)
            _point_adapter_at(adapter_dir, start_uri)
            save_processor(lm.processor, adapter_dir)
            if stage.lora.merge:
                merged = model.merge_and_unload()
                save_model(merged, out)
                save_processor(lm.processor, out)
        else:
            save_model(model, out)
            save_processor(lm.processor, out)
        if stage.lora is not None and stage.lora.merge:
            write_digest(adapter_dir)  # the adapter is served and named by its own digest too
        digest = write_digest(out)  # medray_digest.json: the driver reads it, not the model
        (out / "metrics.jsonl").write_text(metrics.jsonl())
        (out / "loss.png").write_bytes(metrics.loss_png(f"stage {stage.name}: training loss"))
        (out / "lr.png").write_bytes(metrics.lr_png(f"stage {stage.name}: learning rate"))
        _publish(out, dest)
    log.info("stage %s: wrote %s (%s)", stage.name, dest, digest)
    return digest


def _point_adapter_at(adapter_dir: Path, base_uri: str) -> None:
    # PEFT records a local path; a model URI (s3://, tiny://) survives a move to another node.
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_uri
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _publish(src: Path, dest: str) -> None:
    if storage.is_s3(dest):
        storage.upload_dir(src, dest)
        return
    target = storage.local_path(dest)
    if target.exists():
        shutil.rmtree(target)  # a rerun after a crash between export and the done-marker
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, target)
