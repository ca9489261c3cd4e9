"""Training metrics: JSONL rows, the loss and learning-rate curves (medray.charts), MFU."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

# Dense bf16 peak FLOP/s per GPU, for MFU. Override with MEDRAY_PEAK_TFLOPS.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("MEDRAY_PEAK_TFLOPS"):
        return float(os.environ["MEDRAY_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


@dataclass
class MetricsLog:
    rows: list[dict] = field(default_factory=list)

    def jsonl(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.rows)

    def curve(self, key: str) -> tuple[list[float], list[float], list[float]]:
        """(steps, values, epochs) of one logged metric."""
        rows = [r for r in self.rows if r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows], [r.get("epoch") or 0.0 for r in rows]

    def loss_png(self, title: str = "training loss", size: tuple[int, int] = (640, 360)) -> bytes:
        """The loss over optimizer steps (epochs above), the y-axis from 0 (medray.charts)."""
        from medray.charts import curve_png

        steps, values, epochs = self.curve("loss")
        return curve_png(steps, values, epochs=epochs, title=title, ylabel="loss (mean token cross-entropy)",
                         size=size)

    def lr_png(self, title: str = "learning rate", size: tuple[int, int] = (640, 360)) -> bytes:
        """The learning rate the optimizer used at each logged step (warm-up, decay)."""
        from medray.charts import curve_png

        steps, values, epochs = self.curve("lr")
        return curve_png(steps, values, epochs=epochs, title=title, ylabel="learning rate", size=size)
