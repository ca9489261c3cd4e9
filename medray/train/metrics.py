"""Training metrics: JSONL rows, a loss-curve PNG (drawn with PIL, no plotting stack), MFU."""

from __future__ import annotations

import io
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

    def loss_png(self, title: str = "loss", size: tuple[int, int] = (640, 360)) -> bytes:
        from PIL import Image, ImageDraw

        w, h = size
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        pad = 48
        draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
        pts = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        draw.text((pad, 4), title, fill="black")
        if pts:
            xs, ys = zip(*pts)
            x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
            y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
            def px(x, y):
                return (pad + (x - x0) / (x1 - x0) * (w - 1.5 * pad),
                        h - pad - (y - y0) / (y1 - y0) * (h - 1.5 * pad))
            draw.line([px(x, y) for x, y in pts], fill="blue", width=2)
            draw.text((4, pad // 2), f"{y1:.3g}", fill="black")
            draw.text((4, h - pad - 10), f"{y0:.3g}", fill="black")
            draw.text((pad, h - pad + 6), f"step {x0}", fill="black")
            draw.text((w - pad * 2, h - pad + 6), f"step {x1}", fill="black")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
