"""The benchmark keeps working (CPU, tiny model): it measures, it never asserts a speed."""
from __future__ import annotations

import json

import pytest

from conftest import run_ftjob

pytestmark = pytest.mark.slow


def test_bench_runs_on_cpu_and_prints_a_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_ftjob("bench", "--tiny", "--only", "ftjob_b64,hf_trainer_original,data,loader", "--warmup", "1",
                     "--steps", "2", "--data-mb", "2", "--repeat", "1", "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    variants = {r["variant"]: r for r in results if "variant" in r}
    assert set(variants) == {"ftjob_b64", "hf_trainer_original"}
    assert all(r["tokens_per_s"] > 0 for r in variants.values())
    data = next(r["data_path"] for r in results if "data_path" in r)
    prepare, raw = data["prepare"], data["raw_tokenizer"]
    # The same texts on both sides (prepare's tokens less its document boundaries are the raw tokenizer's count).
    assert prepare["tokens"] == raw["tokens"] > 0 and raw["text_bytes"] > 1.9e6
    assert data["prepare_vs_raw"] > 0 and data["baseline"]["blocks"] > 0
    assert all(r["peak_pss_mib"] > 0 and r["peak_rss_mib"] >= r["peak_pss_mib"] for r in (prepare, raw))
    # The table's ratio column is ftjob's tokens/s over HF Trainer's, computed here from the JSON figures.
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("ftjob_b64 ")]
    ratio = variants["ftjob_b64"]["tokens_per_s"] / variants["hf_trainer_original"]["tokens_per_s"]
    assert f"{ratio:.2f}x" in row.split()
