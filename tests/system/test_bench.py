"""The benchmark keeps working (CPU, tiny model): it measures, it never asserts a speed."""
from __future__ import annotations

import json

import pytest

from conftest import run_ftjob

pytestmark = pytest.mark.slow


def test_bench_runs_on_cpu_and_prints_a_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_ftjob("bench", "--tiny", "--only", "ftjob_b64,hf_trainer_original,data,loader", "--warmup", "1",
                     "--steps", "2", "--rows", "1500", "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    variants = {r["variant"]: r for r in results if "variant" in r}
    assert set(variants) == {"ftjob_b64", "hf_trainer_original"}
    assert all(r["tokens_per_s"] > 0 for r in variants.values())
    data = next(r["data_path"] for r in results if "data_path" in r)
    assert data["ftjob_1_workers_mb_s"] > 0 and data["baseline_mb_s"] > 0
    # The table's ratio column is ftjob's tokens/s over HF Trainer's, computed here from the JSON figures.
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("ftjob_b64 ")]
    ratio = variants["ftjob_b64"]["tokens_per_s"] / variants["hf_trainer_original"]["tokens_per_s"]
    assert f"{ratio:.2f}x" in row.split()
