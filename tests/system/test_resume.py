"""Exact resume, for real: SIGTERM to `ftjob run` mid-epoch, then the same command again; and a run whose
database changes between attempts while a checkpoint save takes 45 s. Two CPU workers through DeepSpeed's
launcher, compared with one uninterrupted run; evaluations cover a fixed subset of the validation blocks
(train.eval_blocks), the same in every attempt. (Other ways a run stops: test_stops.py.)"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import jsonl, not_umask_modes, run_ftjob, run_state, start_ftjob, wait_until, weights, write_spec
from job import errors

pytestmark = pytest.mark.slow
EVAL_BLOCKS = 40


def resume_spec(tmp: Path, demo_spec: dict, name: str, **extra) -> Path:
    # fp32 and the model's own dropout (0.1): exactness needs the RNG states restored, not just weights.
    # Evaluations at steps 0, 20 and 40 (one per attempt of the interrupted run), on 40 of the 121 blocks,
    # and a pass over all 121 at the end.
    settings = dict(output_dir=str(tmp / "runs"), name=name, train__precision="fp32", train__max_steps=40,
                    train__log_every=1, train__eval_every=20, train__eval_blocks=EVAL_BLOCKS, train__final_eval="full",
                    train__sample_every=0, train__checkpoint_every=1000, generation__max_length=12)
    settings.update(extra)
    return write_spec(tmp / f"{name}.yaml", demo_spec, **settings)


@pytest.fixture(scope="module")
def reference(demo_assets, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with (under umask 022; test_e2e.py's under 027)."""
    import yaml

    tmp = tmp_path_factory.mktemp("reference")
    spec = resume_spec(tmp, yaml.safe_load(demo_assets.spec.read_text()), "ref")
    trace = tmp / "trace"
    trace.mkdir()
    proc = run_ftjob("run", spec, env={"FTJOB_TRACE_BLOCKS": str(trace)}, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "runs" / "ref"
    return {"metrics": jsonl(run / "metrics.jsonl"), "weights": weights(run / "final"),
            "evals": jsonl(run / "eval.jsonl"), "trace": {f.name: f.read_text() for f in trace.iterdir()}, "modes": not_umask_modes(run, 0o022),
            "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step-*"))}


def test_every_file_of_a_run_under_umask_022_is_readable_by_the_team(reference):
    """0644 files and 0755 directories: the checkpoint, final/ (transformers writes model.safetensors
    0600), data, samples, report, logs."""
    assert "step-00000040" in reference["checkpoints"]  # the final checkpoint (and the best ones kept)
    assert reference["modes"] == []


def test_preempted_twice_while_the_database_changes_resumes_exactly(reference, demo_spec, tmp_path):
    """SIGTERM mid-epoch with a checkpoint save slowed to 45 s (DeepSpeed's launch process would have killed
    the workers 30 s after a SIGTERM of its own: only the workers get it); 100 rows appended to the database
    before the resume; SIGTERM again in the second epoch; the database only touched; the same command
    again. Each resume starts from its checkpoint by itself; the run keeps its split and prepared data, and
    ends with the uninterrupted run's blocks at every step, per-step losses and weights. A changed data
    setting is refused."""
    import shutil
    import sqlite3

    db = tmp_path / "wikibooks.sqlite"
    shutil.copy(demo_spec["data"]["database"], db)
    spec = resume_spec(tmp_path, demo_spec, "changing", data__database=str(db))
    run = tmp_path / "runs" / "changing"

    trace = tmp_path / "trace"
    trace.mkdir()
    traced = {"FTJOB_TRACE_BLOCKS": str(trace)}
    proc = start_ftjob("run", spec, env={"FTJOB_FAULTS": "delay_step=0.05,delay_save=45", **traced})
    wait_until(lambda: any(m["step"] >= 7 for m in jsonl(run / "metrics.jsonl")), what="step 7")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    took = time.monotonic() - signalled
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    first_stop = run_state(run)["step"]
    assert 7 <= first_stop < 16, "the signal should land inside the first epoch (16 steps)"
    ckpt = run / "checkpoints" / f"step-{first_stop:08d}"
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    assert took >= 45 and marker["step"] == first_stop and marker["tokens"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert f"checkpoint step-{first_stop:08d} is complete" in err
    manifest = json.loads((run / "data" / "manifest.json").read_text())

    with sqlite3.connect(db) as conn:  # 100 more rows, as a live database grows
        rows = conn.execute("SELECT * FROM en LIMIT 100").fetchall()
        conn.executemany("INSERT INTO en VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()
    proc = start_ftjob("run", spec, env={"FTJOB_FAULTS": "delay_step=0.05", **traced})
    wait_until(lambda: any(m["step"] >= 20 for m in jsonl(run / "metrics.jsonl")), what="step 20")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    assert f"resumed from {ckpt}" in err  # no flag: it resumes by itself
    assert "changed since this run's data was prepared" in err and "keeps its own prepared data" in err

    os.utime(db)  # only the modification time changes
    proc = run_ftjob("run", spec, env=traced)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed since this run's data was prepared" in proc.stderr
    # Same per-step losses, same blocks at every step, as if never interrupted.
    ref_losses = [(m["step"], m["loss"]) for m in reference["metrics"]]
    got_losses = [(m["step"], m["loss"]) for m in jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses]
    for (s, a), (_, b) in zip(got_losses, ref_losses):
        assert abs(a - b) <= 1e-6, f"step {s}: {a} vs {b}"
    assert {f.name: f.read_text() for f in trace.iterdir()} == reference["trace"]
    after = json.loads((run / "data" / "manifest.json").read_text())
    assert after == manifest  # same split, same shards, same hashes: the run's own snapshot
    assert (after["splits"]["train"]["documents"], after["splits"]["valid"]["documents"]) == (451, 113)
    got = weights(run / "final")
    worst = max((got[k] - reference["weights"][k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"
    check_eval_subset(run, trace, reference["evals"])

    proc = run_ftjob("run", spec, "--set", "data.block_size=32")
    assert proc.returncode == errors.BAD_INPUT, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("ftjob: error: data.block_size: changed since this run's data")


def check_eval_subset(run: Path, trace: Path, reference_evals: list[dict]) -> None:
    """The evaluations at steps 0, 20 and 40 (three attempts) covered the same EVAL_BLOCKS validation
    blocks, and the last one's loss is the mean loss over those blocks of the exported model, computed
    here with plain transformers and numpy from the token shards; the final full pass's, over all."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    records = jsonl(run / "eval.jsonl")
    assert [(e["step"], e["blocks"], e["valid_blocks"], e.get("full")) for e in records] == \
        [(0, 40, 121, None), (20, 40, 121, None), (40, 40, 121, None), (40, 121, 121, True)]
    evals, full = records[:3], records[3]
    assert "best" not in full  # a full pass is not compared with the subset's losses
    for got, want in zip(records, reference_evals):  # comparable across resumes: the uninterrupted run's losses
        assert abs(got["loss"] - want["loss"]) <= 1e-6, (got, want)
    seen: dict[int, list[int]] = {}
    for f in trace.glob("eval-rank*.txt"):
        for line in f.read_text().splitlines():
            step, *blocks = map(int, line.split())
            seen.setdefault(step, []).extend(blocks)
    assert sorted(seen) == [0, 20, 40]
    everything = [int(b) for f in trace.glob("eval-full-rank*.txt") for line in f.read_text().splitlines()
                  for b in line.split()[1:]]
    assert sorted(everything) == list(range(121))
    subset = sorted(seen[0])
    assert len(subset) == EVAL_BLOCKS == len(set(subset)) and all(sorted(b) == subset for b in seen.values())

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    block = manifest["block_size"]
    valid = np.concatenate([np.fromfile(run / "data" / s["tokens"], dtype=manifest["dtype"], offset=64).reshape(-1, block)
                            for s in manifest["splits"]["valid"]["shards"]])
    assert len(valid) == 121 and max(subset) < 121
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    for blocks, record in ((subset, evals[-1]), (list(range(121)), full)):
        x = torch.from_numpy(valid[blocks].astype(np.int64))
        with torch.no_grad():
            loss = model(input_ids=x, labels=x).loss.item()
        assert abs(loss - record["loss"]) <= 1e-5, (loss, record)
