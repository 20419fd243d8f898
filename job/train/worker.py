"""One training process per device, started by the deepspeed launcher: `python -m job.train.worker`.

The loop reads top to bottom: a step, then whoever is due acts (metrics, evaluator, samples, the stop
vote, checkpointer). Each of them decides "is it due?" itself (metrics.py, evaluate.py, checkpoint.py);
which blocks a step trains on is ../data/schedule.py. Problems leave the loop one way, as an exception
(Preempted, Diverged) that run() turns into the exit code. Host syncs (.item()) happen only at logging,
evaluation and checkpoint steps.
"""
from __future__ import annotations

from . import lifeline

if __name__ == "__main__":  # started by DeepSpeed's launch process: die with it from the start, not after
    lifeline.die_with_job()  # the imports below (seconds), and stop here if the job is already gone

import argparse
import json
import logging
import math
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .. import architecture, errors, faults, logs, pretrained
from .. import spec as spec_lib
from ..data.prepare import open_split
from ..data.schedule import EpochSchedule, eval_subset, evaluations
from ..data.shards import BlockStore
from ..generate import generate_samples, log_samples, write_samples
from ..progress import Progress
from ..rundir import (RunPaths, Stage, atomic_write, data_fingerprint, hold_writers, looks_like_volume_failure,
                      newest_complete, read_manifest, truncate_jsonl, volume_error_of, write_state, append_jsonl)
from .checkpoint import Checkpointer, trainer_state_of
from .evaluate import Evaluator
from .export import export_final
from .metrics import MetricsLogger, count_state_bytes
from .optim import build_optimizer, build_scheduler, deepspeed_config, grad_accum_for, resolve_precision

log = logging.getLogger("ftjob")

class Preempted(Exception):
    def __init__(self, save: bool = True):
        super().__init__("preempted")
        self.save = save


class Diverged(Exception):
    pass


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


class Trainer:
    def __init__(self, paths: RunPaths):
        import deepspeed
        from transformers import set_seed

        self.paths = paths
        self.spec = spec_lib.load(paths.spec)
        t, r = self.spec.train, self.spec.resources
        self.cuda = torch.cuda.is_available() and r.accelerator != "cpu"
        if not self.cuda:
            _plain_gloo_on_cpu()
        _no_muon_kernels()
        try:
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo",
                                       timeout=timedelta(seconds=r.collective_timeout_s))
        except RuntimeError as e:  # rank 0 binds the rendezvous port; another process may have taken it
            if "EADDRINUSE" not in str(e):
                raise
            raise errors.PortTaken(f"port {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is in "
                                   "use by another process") from None
        logs.route_library_loggers()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # The per-step "does anyone want to stop?" vote goes over gloo on a CPU tensor: over NCCL it
        # would need a GPU tensor and a host sync every step.
        self.cpu_group = torch.distributed.new_group(backend="gloo") if self.cuda else None
        self.stop = StopFlag()
        self.precision = resolve_precision(self.spec, self.cuda)
        set_seed(t.seed + self.rank)

        manifest = read_manifest(paths)
        self.data_fingerprint = data_fingerprint(manifest)
        self.train_store = BlockStore(open_split(paths, "train"))
        self.valid_store = BlockStore(open_split(paths, "valid"))
        self.block_size = manifest["block_size"]  # enough blocks for a batch: checked before launch
        self.resume_from = self._agreed_checkpoint()
        prior = trainer_state_of(self.resume_from) if self.resume_from else {}
        # The global batch is the run's, fixed at its first start: on another number of processes the
        # accumulation changes so that every step still trains on the same blocks.
        self.global_batch = prior.get("global_batch") or t.global_batch or self.world * t.micro_batch * t.grad_accum
        self.grad_accum = grad_accum_for(self.global_batch, self.world, t.micro_batch)
        self.schedule = EpochSchedule(len(self.train_store), self.world, t.micro_batch, self.grad_accum, t.seed)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.schedule.steps_per_epoch)

        self.tokenizer = pretrained.load_hf_tokenizer(self.spec.model.tokenizer or self.spec.model.path)
        model = pretrained.load_model(self.spec.model, self.tokenizer, t.dropout)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = architecture.describe_model(model).flops_per_token(self.block_size)
        optimizer = build_optimizer(self.spec, model, self.cuda)
        scheduler = build_scheduler(self.spec, optimizer, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, dist_init_required=False,
            config=deepspeed_config(self.spec, self.precision, self.grad_accum))
        logs.route_library_loggers()
        if t.compile:
            self.engine.compile()
        if self.rank == 0:
            log.info("model: %.2fM parameters, %s attention, gradient checkpointing %s; %s, ZeRO-%d, %d processes x "
                     "%d micro-batch x %d accumulation = %d sequences of %d tokens per step", self.n_params / 1e6,
                     model.config._attn_implementation, "on" if model.is_gradient_checkpointing else "off",
                     self.precision, t.zero_stage, self.world, t.micro_batch, self.grad_accum, self.global_batch,
                     self.block_size)
        self.device = self.engine.device
        self.step, self.tokens, self.attempt, self.rollbacks = 0, 0, 1, 0
        self.last_eval_step = -1
        self._order_epoch, self._order = -1, None
        self.checkpointer = Checkpointer(self.engine, paths, t.checkpoint_every, t.keep_checkpoints, self.rank,
                                         self.world, self.barrier, self.data_fingerprint)
        self.eval_blocks = self._eval_blocks(prior.get("eval_blocks"))
        self.evaluator = Evaluator(self.engine, self.valid_store, t.micro_batch, t.eval_every, self.rank, self.world,
                                   self.device, self.batch, t.early_stopping_patience, t.early_stopping_min_delta,
                                   eval_subset(len(self.valid_store), self.eval_blocks["size"], t.seed))
        self.metrics = MetricsLogger(self.engine, paths, t.log_every, self.rank, flops_per_token,
                                     self.spec.report.tensorboard, self.cuda)
        self.stopped_early: str | None = None
        self.state_bytes: dict | None = None  # counted at the first step (record_state_bytes)

    # ------------------------------------------------------------------ helpers

    def barrier(self):
        torch.distributed.barrier()

    def _agreed_checkpoint(self) -> Path | None:
        """Rank 0 verifies the newest complete checkpoint (sha256 of every file) once; all ranks use it."""
        choice = [str(newest_complete(self.paths.checkpoints)) if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(choice, src=0, group=self.cpu_group)
        return Path(choice[0]) if choice[0] != "None" else None

    def _eval_blocks(self, prior: dict | None) -> dict:
        """How many validation blocks every evaluation covers: the checkpoint's number while
        train.eval_blocks is unchanged (a resume with other train.epochs keeps its subset)."""
        t = self.spec.train
        if prior and prior.get("setting") == t.eval_blocks:
            return prior
        n_valid = len(self.valid_store)
        size = t.eval_blocks_for(n_valid, self.schedule.blocks_trained(self.total_steps),
                                 evaluations(self.total_steps, t.eval_every))
        if self.rank == 0 and n_valid:
            what = f"all {n_valid:,}" if size == n_valid else f"a fixed subset of {size:,} of the {n_valid:,}"
            full = "; at the end, all of them too (train.final_eval: full)" if t.final_eval == "full" \
                and size < n_valid else ""
            log.info("evaluations: %s validation blocks (train.eval_blocks: %s)%s", what, t.eval_blocks, full)
        return {"setting": t.eval_blocks, "size": size}

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

    def state(self, stage: Stage, **extra):
        if self.rank == 0:
            write_state(self.paths, stage=stage, step=self.step, total_steps=self.total_steps,
                        epoch=self.step / self.schedule.steps_per_epoch, world_size=self.world,
                        global_batch=self.global_batch, grad_accum=self.grad_accum, **extra)

    def trainer_state(self) -> dict:
        epoch, in_epoch = self.schedule.position(self.step)
        return {"step": self.step, "tokens": self.tokens, "epoch": epoch, "step_in_epoch": in_epoch,
                "world_size": self.world, "global_batch": self.global_batch, "grad_accum": self.grad_accum,
                "total_steps": self.total_steps, "attempt": self.attempt, "rollbacks": self.rollbacks,
                "blocks_per_step": self.schedule.blocks_per_step, "eval_history": self.evaluator.history(),
                "eval_blocks": self.eval_blocks,
                "last_eval_step": self.last_eval_step}

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        try:
            self.resume_or_start()
            if self.step == 0:
                self.evaluate()
                self.samples("before")
            if self.all_agree_to_stop():
                raise Preempted(save=self.step > 0)
            # from_pretrained returns a model in eval mode; without this a resumed run (which skips the
            # step-0 evaluation that ends in train()) would train with dropout off.
            self.engine.train()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            self.state(Stage.TRAIN)
            with Progress(self.total_steps, "training", "steps", self.spec.report.log_interval_s,
                          enabled=self.rank == 0, initial=self.step) as bar:
                self.train_loop(bar)
            self.finish()
            return errors.OK
        except Preempted as p:
            return self.preempted(p.save)
        except Diverged as d:
            return self.diverged(str(d))

    def resume_or_start(self):
        if self.resume_from is None:
            if self.rank == 0:
                for p in (self.paths.metrics, self.paths.evals):
                    p.unlink(missing_ok=True)
            return
        state = self.checkpointer.load(self.resume_from)
        if faults.ACTIVE and faults.resume_seed_offset():
            self.break_resume(faults.resume_seed_offset())
        self.step, self.tokens, self.attempt = state["step"], state["tokens"], state.get("attempt", 1) + 1
        self.rollbacks = state.get("rollbacks", 0)
        self.last_eval_step = state.get("last_eval_step", -1)
        self.evaluator.restore(state.get("eval_history"))
        if state.get("world_size", self.world) != self.world and self.rank == 0:
            log.info("resuming on %d processes (the checkpoint has %d): gradient accumulation %d -> %d, still %d "
                     "sequences per step", self.world, state["world_size"], state.get("grad_accum", 0),
                     self.grad_accum, self.global_batch)
        if self.rank == 0:  # steps after the checkpoint will be trained again: drop their old records
            truncate_jsonl(self.paths.metrics, self.step)
            truncate_jsonl(self.paths.evals, self.step)

    def break_resume(self, offset: int) -> None:
        """Test-only (faults.resume_seed_offset): another data order and other dropout after the resume."""
        t = self.spec.train
        torch.manual_seed(t.seed + self.rank + offset)
        self.schedule = EpochSchedule(len(self.train_store), self.world, t.micro_batch, self.grad_accum, t.seed + offset)

    def train_loop(self, bar: Progress) -> None:
        """Steps until total_steps, a preemption (Preempted) or a divergence (Diverged). Losses are checked
        whenever a metrics window closes, and always before anything is saved."""
        t = self.spec.train
        skipped_in_row = 0
        while self.step < self.total_steps:
            try:
                step_loss = self.train_step(self.epoch_order(self.step))
            except Exception as e:
                # DeepSpeed's ZeRO fp16 scaler gives up by itself after ~18 overflows in a row (2**16 -> 1,
                # hysteresis 2), before train.max_bad_steps would: the same divergence, said the same way.
                if "loss scale already at minimum" not in str(e):
                    raise
                raise Diverged(f"fp16 loss scale fell to its minimum at step {self.step + 1} (every step "
                               "overflowed)") from None
            self.metrics.add(step_loss, self.schedule.blocks_in_step(self.step) * self.block_size)
            self.tokens += self.schedule.blocks_in_step(self.step) * self.block_size
            self.step += 1
            if faults.ACTIVE:
                faults.stop_at(self.step, self.rank)
            bar.update(1)
            last = self.step == self.total_steps
            skipped_in_row = 0 if self.engine.was_step_applied() else skipped_in_row + 1
            problem = self.close_metrics(bar) if self.metrics.is_due(self.step, last) else None
            if skipped_in_row >= t.max_bad_steps:
                problem = (f"{skipped_in_row} optimizer steps in a row were skipped for fp16 overflow "
                           f"(loss scale {getattr(self.engine.optimizer, 'cur_scale', '?')})")
            if not problem:
                with self.metrics.paused():
                    if self.evaluator.is_due(self.step, last):
                        self.evaluate()
                    if t.sample_every and self.step % t.sample_every == 0 and not last:
                        self.samples(f"step-{self.step:08d}")
                # Voted after evaluation, so a signal that came during it stops here, not a step later.
                stop = self.all_agree_to_stop()
                saving = stop or self.checkpointer.is_due(self.step, last)
                if saving and self.metrics.steps:
                    problem = self.close_metrics(bar)  # never save weights whose losses were not checked
            if problem:
                if not self.rollback(problem):
                    raise Diverged(problem)
                bar.n, skipped_in_row = self.step, 0
                continue
            if saving and not self.checkpointer.saved_at(self.step):
                self.save()
            if stop:
                raise Preempted()
            if self.evaluator.should_stop():
                self.stopped_early = (f"validation loss did not improve by {t.early_stopping_min_delta:g} in "
                                      f"{t.early_stopping_patience} evaluations (best {self.evaluator.best['loss']:.4f} "
                                      f"at step {self.evaluator.best['step']})")
                if self.rank == 0:
                    log.info("early stopping at step %d: %s", self.step, self.stopped_early)
                return

    def train_step(self, order: np.ndarray) -> torch.Tensor:
        step_loss = torch.zeros((), device=self.device)
        for mb in self.schedule.micro_batches(self.step, self.rank, order):
            # An empty micro-batch (end of epoch) still runs forward/backward with weight 0 so every rank
            # takes part in the same collectives.
            x = self.batch(mb.indices if len(mb.indices) else order[:1], self.train_store)
            loss = self.engine(input_ids=x, labels=x).loss
            if faults.ACTIVE:
                faults.trace_blocks(self.rank, self.step, mb.indices)
                loss = faults.poison(loss, self.step)
                faults.delay("step")
            self.engine.backward(loss * mb.weight)
            if self.state_bytes is None and self.engine.is_gradient_accumulation_boundary():
                self.state_bytes = {"gradients": count_state_bytes(self.engine)["gradients"]}
            self.engine.step()
            step_loss += loss.detach().float() * mb.weight
        if self.state_bytes is not None and "parameters" not in self.state_bytes:
            self.record_state_bytes()
        return step_loss / (self.world * self.grad_accum)

    def record_state_bytes(self) -> None:
        """Once per attempt, after its first step: what this rank really holds (parameters, master,
        gradients after backward, optimizer states), in state.json beside the plan's figures."""
        counted = count_state_bytes(self.engine)
        self.state_bytes = {**counted, "gradients": self.state_bytes["gradients"], "rank": self.rank}
        if self.rank == 0:
            write_state(self.paths, state_bytes=self.state_bytes)

    def close_metrics(self, bar: Progress) -> str | None:
        """Log the window's metrics; returns what is wrong if a loss in it was not finite (fp16 skips such
        steps by itself, so there only a run of skipped steps counts)."""
        record = self.metrics.close(self.step, self.step / self.schedule.steps_per_epoch, self.tokens,
                                    self.precision, self.world)
        bar.update(0, loss=record["loss"], tok_s=round(record["tokens_per_s"]))
        self.state(Stage.TRAIN, loss=record["loss"])
        if record["nonfinite"] and self.precision != "fp16":
            return f"loss became {record['loss']} near step {self.step}"
        return None

    def evaluate(self, full: bool = False) -> dict | None:
        self.state(Stage.EVAL)
        if not full:
            self.last_eval_step = self.step
        record = self.evaluator(self.step, self.tokens, full)
        if record is None:
            return None
        if self.rank == 0:
            append_jsonl(self.paths.evals, record)
            if not full:
                self.metrics.eval_scalars(record)
            log.info("%s at step %d: validation loss %.4f, perplexity %.2f%s", "full validation pass" if full
                     else "eval", self.step, record["loss"], record["perplexity"],
                     " (best so far)" if record.get("best") else "")
        if record.get("best"):
            self.save_best(record)
        return record

    def save_best(self, record: dict) -> None:
        """The best evaluation's weights are a checkpoint that keep_checkpoints never deletes."""
        if not self.checkpointer.saved_at(self.step):
            self.save()
        if self.rank == 0:
            atomic_write(self.paths.best_pointer, json.dumps(
                {"checkpoint": self.checkpointer.last.name, "step": self.step, "loss": record["loss"]}))
        self.barrier()

    def samples(self, name: str, weights: str = "training run"):
        stage3 = self.spec.train.zero_stage == 3
        if self.rank != 0 and not stage3:
            return
        records = generate_samples(self.engine.module, self.tokenizer, self.spec.generation, self.device,
                                   synced_gpus=stage3 and self.world > 1)
        if self.rank == 0:
            if faults.ACTIVE:
                faults.delay("samples")
            write_samples(records, self.paths.samples, name, step=self.step, weights=weights)
            if name == "after":
                log_samples(records, name)

    def save(self) -> None:
        self.state(Stage.CHECKPOINT)
        self.checkpointer.save(self.step, self.trainer_state())

    def finish(self) -> None:
        """The final evaluation (unless one ran at this step: an early stop, a resume at the end), the final
        checkpoint and the export."""
        if self.last_eval_step != self.step:
            self.evaluate()
        if self.spec.train.final_eval == "full" and self.eval_blocks["size"] < len(self.valid_store):
            self.evaluate(full=True)
        if not self.checkpointer.saved_at(self.step):
            self.save()
        self.state(Stage.EXPORT)
        export_final(self.engine, self.tokenizer, self.paths.final, self.rank, self.spec.train.zero_stage)
        self.state(Stage.TRAINED, stopped_early=self.stopped_early, best=self.evaluator.best)
        # Samples of the exported weights from the model already in memory: the `ftjob` process would
        # otherwise load transformers' model code and the weights again (seconds) to say the same.
        held = "" if self.precision == "fp32" else f" (sampled from the training copy in {self.precision})"
        self.samples("after", weights=f"{self.paths.final}{held}")

    def rollback(self, why: str) -> bool:
        """train.on_divergence: rollback reloads the last good checkpoint and continues with the learning
        rate multiplied by train.rollback_lr_factor (again for each further rollback)."""
        t = self.spec.train
        last = self.checkpointer.last
        if t.on_divergence != "rollback" or self.rollbacks >= t.max_rollbacks or last is None:
            return False
        state = self.checkpointer.load(last)
        self.step, self.tokens = state["step"], state["tokens"]
        self.last_eval_step = state.get("last_eval_step", -1)
        self.rollbacks += 1
        self.metrics.open_window()
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [t.lr * t.rollback_lr_factor ** self.rollbacks for _ in scheduler.base_lrs]
        for group, base, f in zip(self.engine.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * f(scheduler.last_epoch)
        if self.rank == 0:
            truncate_jsonl(self.paths.metrics, self.step)
            truncate_jsonl(self.paths.evals, self.step)
            log.warning("%s: rolled back to %s (rollback %d of %d), learning rate now %.3g", why, last.name,
                        self.rollbacks, t.max_rollbacks, scheduler.base_lrs[0])
        return True

    def preempted(self, save: bool) -> int:
        if save and not self.checkpointer.saved_at(self.step):
            self.save()
        self.state(Stage.PREEMPTED, signal=signal.Signals(self.stop.signum).name if self.stop.signum else None,
                   checkpoint=self.checkpointer.last.name if self.checkpointer.last else None)
        if self.rank == 0:
            log.info("preempted at step %d; checkpoint %s complete; exit %d (run the same command again to resume)",
                     self.step, self.checkpointer.last, errors.PREEMPTED)
        return errors.PREEMPTED

    def diverged(self, why: str) -> int:
        self.state(Stage.DIVERGED, reason=why)
        if self.rank == 0:
            last = self.checkpointer.last or "none (no checkpoint yet)"
            log.error("training diverged: %s. Last good checkpoint: %s. Lower train.lr or raise train.warmup_steps, "
                      "then run again (it resumes from that checkpoint).", why, last)
        return errors.DIVERGED


def _plain_gloo_on_cpu() -> None:
    """On CPU, DeepSpeed would probe every op it knows (compiler subprocesses) and JIT-build a shared-memory
    all-reduce (about a minute, once per machine) that maps buffers in /dev/shm it never unlinks, and whose
    build lock, left by a killed build, hangs every later run. ftjob's CPU path is for demos and tests:
    telling DeepSpeed that no compiled op is available leaves it plain gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def _no_muon_kernels() -> None:
    """ZeRO-1/2 import DeepSpeed's Muon optimizer at the first gradient reduction, only to ask whether the
    optimizer is one; that import torch.compiles Muon's kernels, loading torch._inductor (about 2 s of CPU
    on every rank). ftjob never trains with Muon, so its kernels stay plain functions (DeepSpeed decorates
    nothing else with `compiler.compile()`; `train.compile` uses the engine's own compile)."""
    from deepspeed.runtime import compiler

    compiler.compile = lambda: (lambda fn: fn)


def _a_peer_stopped(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _report(e: errors.JobError, rank: int) -> None:
    """The error as one line up the pipe: `ftjob` shows it as its own and exits with its code."""
    sys.stderr.write(errors.WORKER_ERROR_PREFIX + json.dumps({"code": e.exit_code, "message": str(e), "rank": rank}) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.train.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logs.setup(rank, verbose=True)  # everything goes up the pipe; the `ftjob` process filters it
    paths = RunPaths(Path(args.run_dir))
    hold_writers(paths)  # held until this process ends: the next job waits for it (rundir.RunLock)
    try:
        code = Trainer(paths).run()
    except errors.JobError as e:
        _report(e, rank)
        code = e.exit_code
    except Exception as e:
        if _a_peer_stopped(e):  # the rank that stopped first says why; this is only the echo of it
            log.error("stopping: another rank stopped (%s)", str(e).splitlines()[0][:160])
            code = errors.PEER_LOST
        elif looks_like_volume_failure(e, paths.root):  # any write: state, metrics, eval, samples, best, ...
            _report(volume_error_of(e, paths), rank)
            code = errors.VOLUME
        else:
            log.exception("training failed")  # the "[rank N]" prefix says which rank, in a shared log
            code = errors.FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: DeepSpeed/gloo threads can hang at exit, and everything is written.
    os._exit(code)


if __name__ == "__main__":
    main()
