"""Data-parallel strategies behind one interface, so one train loop serves all of them.

| strategy | wrapping | checkpoint |
| --- | --- | --- |
| ddp | DistributedDataParallel (plain module on one worker) | torch.distributed.checkpoint |
| fsdp | FSDP2 `fully_shard` per transformer layer, then the root | torch.distributed.checkpoint (sharded) |
| deepspeed_zero2/3 | `deepspeed.initialize` | DeepSpeed's own, per rank |

Ray's `prepare_model(parallel_strategy="fsdp")` refuses CPUs, so FSDP2 is applied here
directly, on a device mesh of all workers. Checkpoints leave frozen weights out: they are
the stage's start model, which is on disk already.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from .config import StageConfig

log = logging.getLogger(__name__)


def lr_lambda(stage: StageConfig, total_steps: int):
    warmup = int(round(stage.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if stage.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if stage.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Strategy:
    """Owns the wrapped model, the optimizer and the LR schedule of one worker."""

    def __init__(self, stage: StageConfig, device: torch.device, total_steps: int):
        self.stage, self.device, self.total_steps = stage, device, total_steps
        self.module: torch.nn.Module | None = None  # the unwrapped model (names as in the HF model)
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    # -- set-up
    def setup(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    def _trainable(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._trainable(), lr=self.stage.lr, weight_decay=self.stage.weight_decay)

    def _autocast(self):
        if self.stage.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one micro-batch
    def forward(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            return self.model(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.stage.accum).backward()

    def step(self, boundary: bool) -> float | None:
        """Called after every micro-batch; steps the optimizer at accumulation boundaries."""
        if not boundary:
            return None
        norm = None
        if self.stage.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(self._trainable(), self.stage.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- state
    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if _rank() == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, os.path.join(path, "scheduler.pt"))

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                             set_state_dict)

        opts = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=StateDictOptions(strict=False))
        sched = torch.load(os.path.join(path, "scheduler.pt"), weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])

    def trainable_full(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable tensors, on CPU; every rank must call it."""
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}


class DDPStrategy(Strategy):
    def setup(self, model: torch.nn.Module) -> None:
        self.module = model
        if _world() > 1:
            # The vision tower's last layer is unused under vision_feature_layer=-2: when the
            # tower trains, DDP must be told that some trainable weights get no gradient.
            unused = any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n
                         or "image_encoder" in n)
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused, **kwargs)
        else:
            self.model = model
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.stage, self.total_steps))


def _layer_classes(model: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


class FSDPStrategy(Strategy):
    def setup(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (_world(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.stage.precision == "bf16" else MixedPrecisionPolicy()
        layer_names = _layer_classes(model)
        units = [m for m in model.modules() if type(m).__name__ in layer_names]
        if not units:
            raise ValueError(f"found no transformer layers to shard in {type(model).__name__}")
        for m in units:
            fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        log.info("FSDP2: sharded %d layers over %d workers", len(units), _world())
        self.module = self.model = model
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.stage, self.total_steps))

    def _autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy does the casting

    def trainable_full(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                t = p.full_tensor() if isinstance(p, DTensor) else p
                out[n] = t.detach().cpu().clone()
        return out


class DeepSpeedStrategy(Strategy):
    def setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        stage = self.stage
        zero = 3 if stage.strategy == "deepspeed_zero3" else 2
        zero_cfg: dict = {"stage": zero}
        if stage.offload_optimizer:
            zero_cfg["offload_optimizer"] = {"device": "cpu"}
        if stage.offload_params:
            zero_cfg["offload_param"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": stage.micro_batch_size,
            "gradient_accumulation_steps": stage.accum,
            "zero_optimization": zero_cfg,
            "bf16": {"enabled": stage.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if stage.max_grad_norm:
            config["gradient_clipping"] = stage.max_grad_norm
        self.module = model
        trainable = self._trainable()
        if stage.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
        schedule = lr_lambda(stage, self.total_steps)
        # DeepSpeed steps the scheduler itself at accumulation boundaries and keeps it in
        # its checkpoints; hand it a factory so it binds to the optimizer it really uses.
        engine, opt, _, sched = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=trainable, config=config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule),
            dist_init_required=False)
        self.model, self.optimizer, self.scheduler = engine, opt, sched

    def forward(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.stage.precision == "bf16" and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        return self.model(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self, boundary: bool) -> float | None:
        self.model.step()  # called every micro-batch; it steps only at boundaries
        if not boundary:
            return None
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def save(self, path: str) -> None:
        self.model.save_checkpoint(path, tag="ds", exclude_frozen_parameters=True)

    def load(self, path: str) -> None:
        self.model.load_checkpoint(path, tag="ds", load_module_strict=False)

    def trainable_full(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None) \
            if self.stage.strategy == "deepspeed_zero3" else contextlib.nullcontext()
        with ctx:
            return {n: p.detach().float().cpu().clone() for n, p in params}


def make_strategy(stage: StageConfig, device: torch.device, total_steps: int) -> Strategy:
    cls = {"ddp": DDPStrategy, "fsdp": FSDPStrategy,
           "deepspeed_zero2": DeepSpeedStrategy, "deepspeed_zero3": DeepSpeedStrategy}[stage.strategy]
    return cls(stage, device, total_steps)
