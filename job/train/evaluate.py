"""Validation: the mean loss over a fixed subset of the validation blocks (train.eval_blocks; all of them
when the split is small), when due; the best evaluation so far; early stopping. Every rank gets the same
numbers (the loss is all-reduced), so every rank takes the same decisions at the same step."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import faults


class Evaluator:
    def __init__(self, engine, store, micro_batch: int, every: int, rank: int, world: int, device, batch_fn,
                 patience: int = 0, min_delta: float = 0.0, subset: np.ndarray | None = None):
        self.engine, self.store, self.micro_batch, self.every = engine, store, micro_batch, every
        # The blocks every evaluation covers (job/data/schedule.py eval_subset); None: all of them.
        self.subset = np.arange(len(store)) if subset is None else subset
        self.rank, self.world, self.device, self.batch = rank, world, device, batch_fn
        self.patience, self.min_delta = patience, min_delta
        # Best validation loss after training started (step > 0), and evaluations since it improved.
        self.best: dict | None = None
        self.since_best = 0

    def is_due(self, step: int, last_step: bool) -> bool:
        return bool(self.every) and step % self.every == 0 and not last_step

    def history(self) -> dict:
        """What a checkpoint keeps so a resumed run tracks the same best and patience."""
        return {"best": self.best, "since_best": self.since_best}

    def restore(self, history: dict | None) -> None:
        self.best = (history or {}).get("best")
        self.since_best = (history or {}).get("since_best", 0)

    @torch.no_grad()
    def __call__(self, step: int, tokens: int, full: bool = False) -> dict | None:
        """Mean loss over the subset (or, `full`, every validation block), split across ranks. All ranks
        run the same number of forward passes (ZeRO-3 gathers parameters inside forward), padding with
        zero-weight batches. A full pass is recorded as such and never counts for the best or patience."""
        n = len(self.store)
        if n == 0:
            return None
        if faults.ACTIVE:
            faults.delay("eval")
        self.engine.eval()
        blocks = np.arange(n) if full else self.subset
        mine = blocks[self.rank::self.world]
        mb = self.micro_batch
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(math.ceil(math.ceil(len(blocks) / self.world) / mb)):
            idx = mine[i * mb:(i + 1) * mb]
            if faults.ACTIVE:
                faults.trace_eval(self.rank, step, idx, full)
            x = self.batch(idx if len(idx) else blocks[:1], self.store)
            loss = self.engine(input_ids=x, labels=x).loss.double()
            total += torch.stack([loss * len(idx), torch.tensor(float(len(idx)), device=self.device,
                                                                dtype=torch.float64)])
        torch.distributed.all_reduce(total)
        self.engine.train()
        loss = (total[0] / total[1]).item()
        record = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 50)), "blocks": len(blocks),
                  "valid_blocks": n, "tokens": tokens}
        if full:
            record["full"] = True
        elif step > 0:
            self._track(record)
        return record

    def _track(self, record: dict) -> None:
        loss = record["loss"]
        record["best"] = self.best is None or loss < self.best["loss"]
        if self.best is None or loss < self.best["loss"] - self.min_delta:
            self.since_best = 0
        else:
            self.since_best += 1
        if record["best"]:
            self.best = {"step": record["step"], "loss": loss}

    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience
