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
        """The loss curve with titled axes and ticks. The y-axis starts at 0, so the drop
        reads at its true scale: stretched from min to max, a 0.08 drop looked steep."""
        from PIL import Image, ImageDraw

        w, h = size
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        left, right, top, bottom = 64, 16, 28, 44  # margins: tick labels left, axis title below
        draw.text((left, 6), title, fill="black")
        pts = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        xs = [x for x, _ in pts] or [0, 1]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y_ticks = nice_ticks(0.0, max([y for _, y in pts] or [1.0]))
        x_ticks = [t for t in nice_ticks(x0, x1, start_at_zero=False) if x0 <= t <= x1]
        y1 = y_ticks[-1]

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - y / y1 * (h - top - bottom))

        for t in y_ticks:
            _, y = px(x0, t)
            draw.line([(left - 4, y), (w - right, y)], fill=(225, 225, 225) if t else "black")
            draw.text((4, y - 6), f"{t:.3g}", fill="black")
        for t in x_ticks:
            x, _ = px(t, 0)
            draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
            draw.text((x - 6, h - bottom + 6), f"{t:g}", fill="black")
        draw.line([(left, top), (left, h - bottom)], fill="black")
        draw.text(((w + left) // 2 - 12, h - 16), "step", fill="black")
        draw.text((4, top - 16), "loss", fill="black")
        if len(pts) > 1:
            draw.line([px(x, y) for x, y in pts], fill="blue", width=2)
        elif pts:
            x, y = px(*pts[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="blue")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def nice_ticks(lo: float, hi: float, *, n: int = 5, start_at_zero: bool = True) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    import math

    lo = 0.0 if start_at_zero else lo
    span = max(hi - lo, 1e-12)
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - 1e-12 * span:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks
