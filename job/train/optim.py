"""What the training step is built from: precision, optimizer, learning-rate schedule, DeepSpeed config.
Importing it costs no torch: the `ftjob` process checks precision and batch arithmetic with it."""
from __future__ import annotations

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
    import torch

    t = spec.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # What HF Trainer's optim="adafactor" builds, i.e. the original run's optimizer.
        return Adafactor(params, lr=t.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=t.weight_decay)
    # One optimizer story: torch's AdamW, with its fused CUDA kernel on GPU; nothing to compile. With
    # train.offload its tensors live in host memory, where torch's multi-tensor AdamW steps them
    # (DeepSpeedCPUAdam would be faster there, but it is a compiled op the image does not build).
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                             fused=cuda and t.offload == "none")


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(spec: JobSpec, optimizer, total_steps: int):
    """HF Trainer's schedules (transformers.get_scheduler): linear warm-up from 0, then the decay."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[spec.train.scheduler], optimizer, num_warmup_steps=spec.train.warmup_steps,
                         num_training_steps=total_steps)


def grad_accum_for(global_batch: int, world: int, micro_batch: int) -> int:
    """Micro-steps per optimizer step that keep `global_batch` sequences on `world` processes."""
    accum, rest = divmod(global_batch, world * micro_batch)
    if rest or accum == 0:
        raise BadInput(f"train.global_batch: {global_batch} sequences per step cannot be split evenly over "
                       f"{world} processes x train.micro_batch {micro_batch}; pick a global batch divisible by "
                       f"{world * micro_batch}, or change train.micro_batch")
    return accum


def offload_config(offload: str) -> dict:
    """train.offload as DeepSpeed's zero_optimization keys (pinned host memory: faster copies to the GPU)."""
    out = {}
    if offload in ("optimizer", "all"):
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    return out


def deepspeed_config(spec: JobSpec, precision: str, grad_accum: int, load_universal: bool = False) -> dict:
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage, "stage3_gather_16bit_weights_on_model_save": True,
                              **offload_config(t.offload)},
        # Adafactor is not on DeepSpeed's tested list for ZeRO; it is a plain torch optimizer and works.
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload with the job's own torch optimizer (see build_optimizer), not DeepSpeedCPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        # A checkpoint written by another number of processes is loaded from its universal form.
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
