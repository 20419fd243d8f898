"""The pieces the training loop is built from: precision, optimizer, schedule and the DeepSpeed config."""
from __future__ import annotations

import math

import torch

from ..errors import BadInput
from ..spec import JobSpec


def resolve_precision(spec: JobSpec, cuda: bool) -> str:
    p = spec.train.precision
    if p == "auto":
        return "fp16" if cuda else "fp32"
    if p == "fp16" and not cuda:
        raise BadInput("train.precision: fp16 needs a GPU; on CPU use bf16 or fp32 (or auto)")
    return p


def build_optimizer(spec: JobSpec, model, cuda: bool):
    t = spec.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # What HF Trainer's optim="adafactor" builds, i.e. the original run's optimizer.
        return Adafactor(params, lr=t.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                             fused=cuda)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at step s: linear warmup, then cosine/linear decay to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def build_scheduler(spec: JobSpec, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.train.scheduler, spec.train.warmup_steps, total_steps))


def deepspeed_config(spec: JobSpec, precision: str) -> dict:
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        # Adafactor is not on DeepSpeed's tested list for ZeRO; it is a plain torch optimizer and works.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
