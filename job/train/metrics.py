"""Training metrics: losses kept on the device between logging steps (no host sync per step), one
metrics.jsonl record (and TensorBoard scalars) per `log_every` steps, tokens/s over training time only."""
from __future__ import annotations

import contextlib
import resource
import time

import torch

from ..rundir import append_jsonl

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense fp16/bf16 tensor-core peaks


class MetricsLogger:
    def __init__(self, engine, paths, every: int, rank: int, flops_per_token: float, tensorboard: bool,
                 cuda: bool):
        self.engine, self.paths, self.every, self.rank = engine, paths, every, rank
        self.flops_per_token, self.cuda = flops_per_token, cuda
        self.tb = None
        if rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(paths.tensorboard))
        self.peak_gpu = self._peak_flops() if cuda else None
        self.open_window()

    def open_window(self) -> None:
        self.loss = torch.zeros((), device=self.engine.device)
        self.bad = torch.zeros((), device=self.engine.device)
        self.steps, self.tokens_in_window, self.start = 0, 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor, tokens: int) -> None:
        self.loss += step_loss
        self.bad += (~torch.isfinite(step_loss)).float()
        self.steps += 1
        self.tokens_in_window += tokens

    def is_due(self, step: int, last_step: bool) -> bool:
        return step % self.every == 0 or last_step

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and sampling inside the block do not count as training time."""
        t0 = time.perf_counter()
        yield
        self.start += time.perf_counter() - t0

    def close(self, step: int, epoch: float, tokens: int, precision: str, world: int) -> dict:
        """The window's record (all ranks take part: the loss is all-reduced); `nonfinite` says whether a
        loss in the window was NaN/inf."""
        torch.distributed.all_reduce(self.loss)
        loss = self.loss.item() / self.steps
        seconds = time.perf_counter() - self.start
        tokens_per_s = self.tokens_in_window / max(seconds, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(self.engine.optimizer, "loss_scale", None)
        record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": self.engine.get_lr()[0],
                  "loss_scale": scale if precision == "fp16" else None,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": round(tokens_per_s, 1), "tokens": tokens, "time": time.time(),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        if self.cuda:
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if self.peak_gpu:
                record["mfu"] = round(tokens_per_s / world * self.flops_per_token / self.peak_gpu, 4)
        nonfinite = bool(self.bad.item())
        if self.rank == 0:
            append_jsonl(self.paths.metrics, record)
            if self.tb:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale"):
                    if record.get(k) is not None:
                        self.tb.add_scalar(f"train/{k}", record[k], step)
        self.open_window()
        return record | {"nonfinite": nonfinite}

    def eval_scalars(self, record: dict) -> None:
        if self.tb:
            self.tb.add_scalar("eval/loss", record["loss"], record["step"])
            self.tb.add_scalar("eval/perplexity", record["perplexity"], record["step"])

    @staticmethod
    def _peak_flops() -> float | None:
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def count_state_bytes(engine_or_model, optimizer=None) -> dict[str, int]:
    """Bytes of real tensors, the counterpart of StateBytes: parameters, master, gradients and optimizer
    state, from a DeepSpeed engine or a model and its torch optimizer. Gradients are those held at the call
    (call right after backward at an accumulation boundary; DeepSpeed frees ZeRO's after the step), the
    optimizer state exists after the first step. For the worker to record beside the plan."""
    def nbytes(t) -> int:
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    def storage(t) -> int:
        return t.untyped_storage().data_ptr()

    zo = getattr(engine_or_model, "optimizer", None) if optimizer is None else optimizer
    model = getattr(engine_or_model, "module", engine_or_model)
    inner = getattr(zo, "optimizer", zo)
    out = {"parameters": 0, "master": 0, "gradients": 0, "optimizer_states": 0}
    weights = list(getattr(zo, "bit16_groups_flat", None) or getattr(zo, "fp16_partitioned_groups_flat", None) or [])
    if not weights:  # ZeRO 0: the model's own tensors (parameters() yields a tied weight once)
        weights = [p.data for p in model.parameters()]
    out["parameters"] = sum(nbytes(t) for t in weights)
    shared = {storage(t) for t in weights if t.numel() and t.device.type != "meta"}
    masters = list(getattr(zo, "single_partition_of_fp32_groups", None) or
                   getattr(zo, "fp32_partitioned_groups_flat", None) or [])
    masters += [t for group in getattr(zo, "fp32_groups", None) or [] for t in group]
    out["master"] = sum(nbytes(t) for t in masters if not t.numel() or storage(t) not in shared)
    averaged = getattr(zo, "averaged_gradients", None)
    if averaged:
        out["gradients"] = sum(nbytes(t) for v in averaged.values() if v is not None for t in v)
    else:
        out["gradients"] = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    out["optimizer_states"] = sum(nbytes(v) for s in getattr(inner, "state", {}).values() for v in s.values())
    return out
