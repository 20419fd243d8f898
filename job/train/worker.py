"""One training process per device, started by the deepspeed launcher: `python -m job.train.worker`.

The loop is short on purpose; the pieces live in setup.py (optimizer, schedule, DeepSpeed config),
checkpoint.py (atomic save / resume), ../data/loader.py (which blocks at which step) and
../generate.py. Host syncs (.item()) happen only at logging, evaluation and checkpoint steps.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import debug, errors
from .. import model as model_lib
from .. import spec as spec_lib
from ..data.loader import BlockStore, EpochSchedule
from ..data.prepare import open_split, read_manifest
from ..generate import generate_samples, write_samples
from ..paths import RunPaths
from ..progress import Progress, setup_logging
from ..report import write_report
from ..runstate import append_jsonl, truncate_jsonl, write_state
from . import checkpoint, export
from .setup import build_optimizer, build_scheduler, deepspeed_config, resolve_precision

log = logging.getLogger("ftjob")

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense fp16/bf16 tensor-core peaks


class StopFlag:
    """Set by SIGTERM/SIGUSR1; acted on at the next step boundary once all ranks agree."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if not self.signum:
            log.info("received %s: will checkpoint at the next step boundary and exit %d",
                     signal.Signals(signum).name, errors.PREEMPTED)
        self.signum = signum


class LossWindow:
    """Training losses since the last log line, kept on the device: no host sync per step."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss += step_loss
        self.bad += (~torch.isfinite(step_loss)).float()
        self.steps += 1


class Trainer:
    def __init__(self, paths: RunPaths):
        import deepspeed

        self.paths = paths
        self.spec = spec_lib.load(paths.spec)
        self.cuda = torch.cuda.is_available() and self.spec.resources.accelerator != "cpu"
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # The per-step "does anyone want to stop?" vote goes over gloo on a CPU tensor: over NCCL it
        # would need a GPU tensor and a host sync every step.
        self.cpu_group = torch.distributed.new_group(backend="gloo") if self.cuda else None
        setup_logging(self.rank)
        self.stop = StopFlag()
        self.precision = resolve_precision(self.spec, self.cuda)
        t = self.spec.train
        _seed_everything(t.seed + self.rank)

        manifest = read_manifest(paths)
        self.train_store = BlockStore(open_split(paths, "train"))
        self.valid_store = BlockStore(open_split(paths, "valid"))
        self.block_size = manifest["block_size"]  # enough blocks for a batch: checked before launch
        self.schedule = EpochSchedule(len(self.train_store), self.world, t.micro_batch, t.grad_accum, t.seed)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.schedule.steps_per_epoch)

        self.tokenizer = model_lib.load_tokenizer(self.spec.model.tokenizer or self.spec.model.path)
        model = model_lib.load_model(self.spec.model, manifest["tokenizer"]["vocab_size"], t.dropout)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = 6 * self.n_params + 12 * model.config.n_layer * model.config.n_embd * self.block_size
        optimizer = build_optimizer(self.spec, model, self.cuda)
        scheduler = build_scheduler(self.spec, optimizer, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(self.spec, self.precision),
                                                    dist_init_required=False)
        if t.compile:
            self.engine.compile()
        self.device = self.engine.device
        self.step, self.tokens, self.attempt, self.rollbacks = 0, 0, 1, 0
        self._order_epoch, self._order = -1, None
        self.tb = self._tensorboard()

    # ------------------------------------------------------------------ helpers

    def barrier(self):
        torch.distributed.barrier()

    def all_agree_to_stop(self) -> bool:
        """One rank's signal is enough: every rank stops at the same step boundary."""
        flag = torch.tensor([float(self.stop.signum != 0)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return bool(flag.item())

    def batch(self, indices: np.ndarray, store: BlockStore) -> torch.Tensor:
        x = torch.from_numpy(store.gather(indices))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x

    def epoch_order(self, step: int) -> np.ndarray:
        epoch, _ = self.schedule.position(step)
        if epoch != self._order_epoch:  # one permutation per epoch, not per step
            self._order_epoch, self._order = epoch, self.schedule.order(epoch)
        return self._order

    def _tensorboard(self):
        if self.rank != 0 or not self.spec.report.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.paths.tensorboard))

    def state(self, stage: str, **extra):
        if self.rank == 0:
            write_state(self.paths, stage=stage, step=self.step, total_steps=self.total_steps,
                        epoch=self.step / self.schedule.steps_per_epoch, world_size=self.world, **extra)

    # ------------------------------------------------------------------ stages

    def resume_or_start(self):
        ckpt = checkpoint.newest_complete(self.paths.checkpoints)
        if ckpt is None:
            if self.rank == 0:
                for p in (self.paths.metrics, self.paths.evals):
                    p.unlink(missing_ok=True)
            return
        state = checkpoint.load(self.engine, ckpt, self.rank)
        if state["world_size"] != self.world:
            raise errors.BadInput(
                f"checkpoint {ckpt} was written by {state['world_size']} processes but this run has {self.world}; "
                "resume with the same number of processes, or start over with --restart")
        self.step, self.tokens, self.attempt = state["step"], state["tokens"], state.get("attempt", 1) + 1
        self.rollbacks = state.get("rollbacks", 0)
        if self.rank == 0:  # steps after the checkpoint will be trained again: drop their old records
            truncate_jsonl(self.paths.metrics, self.step)
            truncate_jsonl(self.paths.evals, self.step)

    def trainer_state(self) -> dict:
        epoch, in_epoch = self.schedule.position(self.step)
        return {"step": self.step, "tokens": self.tokens, "epoch": epoch, "step_in_epoch": in_epoch,
                "world_size": self.world, "total_steps": self.total_steps, "attempt": self.attempt,
                "rollbacks": self.rollbacks,
                "blocks_per_step": self.schedule.blocks_per_step}

    def save(self):
        self.state("checkpoint")
        path = checkpoint.save(self.engine, self.paths.checkpoints, self.step, self.trainer_state(),
                               self.spec.train.keep_checkpoints, self.rank, self.barrier)
        self.last_checkpoint = path

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss over every validation block, split across ranks. All ranks run the same number of
        forward passes (ZeRO-3 gathers parameters inside forward), padding with zero-weight batches."""
        n = len(self.valid_store)
        if n == 0:
            return None
        self.state("eval")
        debug.delay("eval")
        self.engine.eval()
        mine = np.arange(self.rank, n, self.world)
        mb = self.spec.train.micro_batch
        n_iter = math.ceil(math.ceil(n / self.world) / mb)
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(n_iter):
            idx = mine[i * mb:(i + 1) * mb]
            x = self.batch(idx if len(idx) else np.arange(1), self.valid_store)
            loss = self.engine(input_ids=x, labels=x).loss.double()
            total += torch.stack([loss * len(idx), torch.tensor(float(len(idx)), device=self.device, dtype=torch.float64)])
        torch.distributed.all_reduce(total)
        self.engine.train()
        loss = (total[0] / total[1]).item()
        record = {"step": self.step, "loss": loss, "perplexity": math.exp(min(loss, 50)), "blocks": n,
                  "tokens": self.tokens}
        if self.rank == 0:
            append_jsonl(self.paths.evals, record)
            log.info("eval at step %d: validation loss %.4f, perplexity %.2f", self.step, loss, record["perplexity"])
            if self.tb:
                self.tb.add_scalar("eval/loss", loss, self.step)
                self.tb.add_scalar("eval/perplexity", record["perplexity"], self.step)
            write_report(self.paths)  # a readable report.md + loss.png after every evaluation
        return record

    def samples(self, name: str):
        stage3 = self.spec.train.zero_stage == 3
        if self.rank != 0 and not stage3:
            return
        records = generate_samples(self.engine.module, self.tokenizer, self.spec.generation, self.device,
                                   synced_gpus=stage3 and self.world > 1)
        if self.rank == 0:
            write_samples(records, self.paths.samples, name, step=self.step, weights="training run")

    def train_step(self, order: np.ndarray) -> torch.Tensor:
        step_loss = torch.zeros((), device=self.device)
        for mb in self.schedule.micro_batches(self.step, self.rank, order):
            # An empty micro-batch (end of epoch) still runs forward/backward with weight 0 so every rank
            # takes part in the same collectives.
            debug.trace_blocks(self.rank, self.step, mb.indices)
            x = self.batch(mb.indices if len(mb.indices) else order[:1], self.train_store)
            loss = debug.maybe_poison(self.engine(input_ids=x, labels=x).loss, self.step)
            self.engine.backward(loss * mb.weight)
            self.engine.step()
            debug.delay("step")
            step_loss += loss.detach().float() * mb.weight
        return step_loss / (self.world * self.spec.train.grad_accum)

    def run(self) -> int:
        self.resume_or_start()
        self.last_checkpoint = checkpoint.newest_complete(self.paths.checkpoints, verify=False)
        if self.step == 0:
            self.evaluate()
            self.samples("before")
        if self.all_agree_to_stop():
            return self.preempted(save=self.step > 0)
        # from_pretrained returns a model in eval mode; without this a resumed run (which skips the
        # step-0 evaluation that ends in train()) would train with dropout off.
        self.engine.train()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.state("train")
        with Progress(self.total_steps, "training", "steps", self.spec.report.log_interval_s,
                      enabled=self.rank == 0, initial=self.step) as bar:
            code = self.train_loop(bar)
        if code is not None:
            return code
        self.evaluate()
        self.save()
        self.state("export")
        export.export_final(self.engine, self.tokenizer, self.paths.final, self.rank, self.spec.train.zero_stage)
        self.state("trained")
        return errors.OK

    def train_loop(self, bar: Progress) -> int | None:
        """Steps until total_steps (None) or until a stop: preempted or diverged (its exit code).
        Losses stay on the device; they are read (a host sync) only when a window of steps is closed:
        at logging steps, and before anything is saved."""
        t = self.spec.train
        self.window = LossWindow(self.device)
        skipped_in_row = 0
        while self.step < self.total_steps:
            order = self.epoch_order(self.step)
            step_loss = self.train_step(order)
            self.tokens += self.schedule.blocks_in_step(self.step) * self.block_size
            self.step += 1
            self.window.add(step_loss)
            bar.update(1)
            skipped_in_row = 0 if self.engine.was_step_applied() else skipped_in_row + 1
            last = self.step == self.total_steps
            problem = self.close_window(bar) if self.step % t.log_every == 0 or last else None
            if skipped_in_row >= t.max_bad_steps:
                problem = (f"{skipped_in_row} optimizer steps in a row were skipped for fp16 overflow "
                           f"(loss scale {self._loss_scale()})")
            if not problem:
                paused = time.perf_counter()
                if t.eval_every and self.step % t.eval_every == 0 and not last:
                    self.evaluate()
                if t.sample_every and self.step % t.sample_every == 0 and not last:
                    self.samples(f"step-{self.step:08d}")
                self.window.start += time.perf_counter() - paused  # tokens/s counts training time only
                # Voted after evaluation, so a signal that came during it stops here, not a step later.
                stop = self.all_agree_to_stop()
                checkpoint_due = self.step % t.checkpoint_every == 0 and not last
                if (stop or checkpoint_due) and self.window.steps:
                    problem = self.close_window(bar)  # never save weights whose losses were not checked
            if problem:
                if self.rollback(problem):
                    bar.n, skipped_in_row = self.step, 0
                    continue
                return self.diverged(problem)
            if checkpoint_due:
                self.save()
            if stop:
                return self.preempted(save=True)
        return None

    def close_window(self, bar: Progress) -> str | None:
        """Log the window's metrics; returns what is wrong if a loss in it was not finite (fp16 skips
        such steps by itself, so there only a run of skipped steps counts)."""
        record = self.log_metrics(self.window)
        bar.update(0, loss=record["loss"], tok_s=round(record["tokens_per_s"]))
        bad = self.window.bad.item() and self.precision != "fp16"
        self.window = LossWindow(self.device)
        return f"loss became {record['loss']} near step {self.step}" if bad else None

    def rollback(self, why: str) -> bool:
        """train.on_divergence: rollback reloads the last good checkpoint and continues with the learning
        rate multiplied by train.rollback_lr_factor (again for each further rollback)."""
        t = self.spec.train
        if t.on_divergence != "rollback" or self.rollbacks >= t.max_rollbacks or self.last_checkpoint is None:
            return False
        state = checkpoint.load(self.engine, self.last_checkpoint, self.rank)
        self.step, self.tokens = state["step"], state["tokens"]
        self.rollbacks += 1
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [t.lr * t.rollback_lr_factor ** self.rollbacks for _ in scheduler.base_lrs]
        for group, base, f in zip(self.engine.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * f(scheduler.last_epoch)
        if self.rank == 0:
            truncate_jsonl(self.paths.metrics, self.step)
            truncate_jsonl(self.paths.evals, self.step)
            log.warning("%s: rolled back to %s (rollback %d of %d), learning rate now %.3g", why,
                        self.last_checkpoint.name, self.rollbacks, t.max_rollbacks, scheduler.base_lrs[0])
        return True

    def _loss_scale(self):
        opt = self.engine.optimizer
        return getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)

    def log_metrics(self, window: LossWindow) -> dict:
        torch.distributed.all_reduce(window.loss)
        loss = window.loss.item() / window.steps
        seconds = time.perf_counter() - window.start
        tokens_per_s = window.steps * self.schedule.blocks_per_step * self.block_size / max(seconds, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": self.step, "epoch": round(self.step / self.schedule.steps_per_epoch, 4), "loss": loss,
                  "lr": self.engine.get_lr()[0], "loss_scale": self._loss_scale() if self.precision == "fp16" else None,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": round(tokens_per_s, 1), "tokens": self.tokens, "time": time.time()}
        if self.cuda:
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
            if peak:
                record["mfu"] = round(tokens_per_s / self.world * self.flops_per_token / peak, 4)
        if self.rank == 0:
            append_jsonl(self.paths.metrics, record)
            if self.tb:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_scale"):
                    if record.get(k) is not None:
                        self.tb.add_scalar(f"train/{k}", record[k], self.step)
            self.state("train", loss=loss)
        return record

    def preempted(self, save: bool) -> int:
        if save and (self.last_checkpoint is None or checkpoint.checkpoint_name(self.step) != self.last_checkpoint.name):
            self.save()
        self.state("preempted", signal=signal.Signals(self.stop.signum).name if self.stop.signum else None)
        if self.rank == 0:
            log.info("preempted at step %d; checkpoint %s; exit %d (run the same command again to resume)",
                     self.step, self.last_checkpoint, errors.PREEMPTED)
        return errors.PREEMPTED

    def diverged(self, why: str) -> int:
        self.state("diverged", reason=why)
        if self.rank == 0:
            last = self.last_checkpoint or "none (no checkpoint yet)"
            log.error("training diverged: %s. Last good checkpoint: %s. Lower train.lr or raise train.warmup_steps, "
                      "then run again (it resumes from that checkpoint).", why, last)
        return errors.DIVERGED


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.train.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
    args = parser.parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        code = Trainer(RunPaths(Path(args.run_dir))).run()
    except errors.JobError as e:
        log.error("%s", e)
        code = e.exit_code
    except Exception:
        log.exception("training failed")  # the "[rank N]" prefix says which rank, in a shared log
        code = errors.FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: DeepSpeed/gloo threads can hang at exit, and everything is written.
    os._exit(code)


if __name__ == "__main__":
    main()
