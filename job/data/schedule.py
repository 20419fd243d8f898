"""Which blocks each rank trains on at each step: a pure function of (seed, epoch, step, rank).

Every epoch is a fresh permutation of all training blocks. An optimizer step takes the next
world * micro_batch * grad_accum blocks of it; the last step of an epoch takes what is left, so over an
epoch every block is used exactly once across ranks (no padding by repetition, nothing dropped). Since the
position is a function of the step number alone, resuming at step k needs no replay of the loader.
Evaluations cover a fixed, seeded subset of the validation blocks (eval_subset), the same every time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MicroBatch:
    indices: np.ndarray  # global block indices for this rank and micro-step (may be empty at an epoch's end)
    weight: float  # multiplies the micro-batch mean loss so the step's gradient is the mean over its blocks


@dataclass(frozen=True)
class EpochSchedule:
    n_blocks: int
    world_size: int
    micro_batch: int
    grad_accum: int
    seed: int

    @property
    def blocks_per_step(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_blocks / self.blocks_per_step)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of global optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def blocks_in_step(self, step: int) -> int:
        _, k = self.position(step)
        return min(self.blocks_per_step, self.n_blocks - k * self.blocks_per_step)

    def step_blocks(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        return self.order(epoch)[k * self.blocks_per_step:(k + 1) * self.blocks_per_step]

    def micro_batches(self, step: int, rank: int, order: np.ndarray | None = None) -> list[MicroBatch]:
        """This rank's grad_accum micro-batches for `step`. Blocks of a step are dealt out micro-step by
        micro-step, rank by rank, so a short last step leaves late micro-batches empty, not unequal ranks.

        DeepSpeed averages gradients over ranks and divides each micro-batch loss by grad_accum, so a
        micro-batch of n blocks out of the step's N gets weight n * world * accum / N: the sum over all
        micro-batches is then exactly the mean loss over the step's blocks."""
        if order is not None:
            epoch, k = self.position(step)
            blocks = order[k * self.blocks_per_step:(k + 1) * self.blocks_per_step]
        else:
            blocks = self.step_blocks(step)
        total = len(blocks)
        out = []
        for m in range(self.grad_accum):
            start = (m * self.world_size + rank) * self.micro_batch
            idx = blocks[start:start + self.micro_batch]
            out.append(MicroBatch(idx, len(idx) * self.world_size * self.grad_accum / total))
        return out

    def blocks_trained(self, total_steps: int) -> int:
        """Blocks a run of total_steps trains on: whole epochs, then the first steps of the next."""
        full, rest = divmod(total_steps, self.steps_per_epoch)
        return full * self.n_blocks + min(rest * self.blocks_per_step, self.n_blocks)


def evaluations(total_steps: int, eval_every: int) -> int:
    """Evaluations a run makes: before training, every eval_every steps (not at the last), after."""
    return 2 + ((total_steps - 1) // eval_every if eval_every and total_steps else 0)


def eval_subset(n_valid: int, size: int, seed: int) -> np.ndarray:
    """The validation blocks every evaluation covers: all of them, or a sample of `size` drawn with the
    run's seed, so that every evaluation, before and after a resume, sees the same blocks. Sorted: reads
    from the memory-mapped shards stay in file order."""
    if size >= n_valid:
        return np.arange(n_valid)
    rng = np.random.default_rng([seed, 0, 1])  # a stream apart from the epochs' [seed, epoch]
    return np.sort(rng.choice(n_valid, size, replace=False))
