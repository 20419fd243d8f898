"""Where everything lives in a run directory (one per spec `name`, under `output_dir`).

Every stage reads what the stage before wrote here and nothing else, so stages can be re-run alone and
`ftjob status` can tell where a run stands from these files alone.
"""
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def spec(self) -> Path:  # the resolved spec (overrides applied) the run was started with
        return self.root / "spec.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def text_shards(self) -> Path:
        return self.data / "text"

    @property
    def token_shards(self) -> Path:
        return self.data / "tokens"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:  # Hugging Face format: safetensors + config + tokenizer
        return self.root / "final"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics(self) -> Path:  # one JSON object per logged training step
        return self.root / "metrics.jsonl"

    @property
    def evals(self) -> Path:  # one JSON object per validation pass
        return self.root / "eval.jsonl"

    @property
    def state(self) -> Path:  # {"stage": ..., "step": ..., "total_steps": ..., "updated": ...}
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
