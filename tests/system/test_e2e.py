"""The whole job on one machine, through the real `ftjob` command and the real deepspeed launcher with two
CPU worker processes (gloo), and the exported model loaded back with plain transformers."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import jsonl, not_umask_modes, run_ftjob, write_spec
from families import first_document_tokens_are_bounded, plan_equals_the_engine
from job.data.schedule import EpochSchedule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(demo_assets, tmp_path_factory):
    """The demo spec with greedy decoding (so samples can be compared exactly), blocks traced; under umask
    027 (a site that keeps results from other groups)."""
    import yaml

    tmp = tmp_path_factory.mktemp("e2e")
    spec = yaml.safe_load(demo_assets.spec.read_text())
    path = write_spec(tmp / "spec.yaml", spec, output_dir=str(tmp / "runs"), generation__do_sample=False,
                      generation__num_beams=1)
    trace = tmp / "trace"
    trace.mkdir()
    proc = run_ftjob("run", path, env={"FTJOB_TRACE_BLOCKS": str(trace)}, umask=0o027)
    return {"proc": proc, "run": tmp / "runs" / "demo", "spec": path, "trace": trace, "specdict": spec}


def test_run_succeeds_and_leaves_every_output(demo_run):
    proc, run = demo_run["proc"], demo_run["run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ["spec.yaml", "data/manifest.json", "metrics.jsonl", "eval.jsonl", "final/config.json",
                "final/model.safetensors", "final/tokenizer.json", "samples/before.jsonl", "samples/after.jsonl",
                "samples/before.md", "samples/after.md", "samples/step-00000040.jsonl", "checkpoints/latest",
                "report.md", "loss.png"]:
        assert (run / rel).exists(), rel
    assert "training: 48/48 steps" in proc.stderr  # the batch-log progress line (no TTY here)
    port = re.search(r"--master_port=(\d+)", proc.stderr).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # no leaked shared memory
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "COMPLETE.json").exists()
    assert json.loads((run / "state.json").read_text())["stage"] == "done"


def test_every_file_the_run_wrote_has_the_modes_its_umask_gives(demo_run):
    """Under umask 027 everything is 0640 (directories and executables 0750): the data, every checkpoint
    (DeepSpeed's files, zero_to_fp32.py, the markers), final/ and best/ (transformers writes
    model.safetensors 0600), samples, report, logs, state. (test_resume.py checks a run under 022.)"""
    run = demo_run["run"]
    assert (run / "best" / "model.safetensors").exists() and (run / "checkpoints" / "step-00000048").is_dir()
    assert not_umask_modes(run, 0o027) == []


def test_console_is_quiet_and_the_run_log_has_the_detail(demo_run):
    """ftjob's own lines on the console (at most 25 for the demo); DeepSpeed's INFO lines, FutureWarnings and
    transformers' notices only in <run>/logs/ftjob.log, beside every line the console showed."""
    lines = demo_run["proc"].stderr.splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    assert all(" ftjob " in line for line in lines), "\n".join(lines)
    for noise in ("FutureWarning", "[INFO]", "loss_type=None", "torch_dtype", "Setting CUDA_VISIBLE_DEVICES"):
        assert noise not in demo_run["proc"].stderr
    log = (demo_run["run"] / "logs" / "ftjob.log").read_text()
    assert "FutureWarning" in log and "loss_type=None" in log  # the detail is kept, not lost
    logged = set(log.splitlines())
    assert all(line in logged for line in lines if "ftjob ftjob attempt" not in line)


def test_the_plan_made_before_training_matches_the_run(demo_run):
    """plan.json (ftjob plan's figures for this run): exact step count, checkpoint size within 10% of the
    real one, worker memory (RSS, CPU) within 25% of the measured peak."""
    run = demo_run["run"]
    plan = json.loads((run / "plan.json").read_text())["estimates"]
    state = json.loads((run / "state.json").read_text())
    assert plan["total_steps"] == state["total_steps"] == 48
    latest = (run / "checkpoints" / "latest").read_text().strip()
    real = sum(f["bytes"] for f in json.loads((run / "checkpoints" / latest / "COMPLETE.json").read_text())["files"].values())
    assert abs(plan["checkpoint_bytes"] - real) <= 0.10 * real, (plan["checkpoint_bytes"], real)
    rss = max(m["peak_rss_mib"] for m in jsonl(run / "metrics.jsonl"))
    assert abs(plan["peak_rss_mib"] - rss) <= 0.25 * rss, (plan["peak_rss_mib"], rss)
    status = run_ftjob("status", run).stdout
    assert re.search(r"checkpoint size:\s+plan", status) and re.search(r"peak worker RSS:\s+plan", status)
    plan_equals_the_engine(run, "GPT-2 (gpt2)")  # the model-family matrix's checks for GPT-2


def test_documents_end_with_a_newline_as_the_original_run(demo_run, demo_assets):
    """data.join: auto is GPT-2's newline (the original run's texts joined by newlines)."""
    first_document_tokens_are_bounded(demo_run["run"], demo_assets.model, "newline")


def test_validation_loss_falls_and_is_recorded_before_during_after(demo_run):
    evals = jsonl(demo_run["run"] / "eval.jsonl")
    steps = [e["step"] for e in evals]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3  # before, every eval_every, after
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0
    assert math.isclose(evals[-1]["perplexity"], math.exp(evals[-1]["loss"]), rel_tol=1e-6)


def test_report_holds_the_runs_own_figures(demo_run):
    run = demo_run["run"]
    report = (run / "report.md").read_text(encoding="utf-8")
    evals = jsonl(run / "eval.jsonl")
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert f"{evals[0]['loss']:.4f}" in report and f"{evals[-1]['loss']:.4f}" in report
    assert f"{manifest['rows_read']:,}" in report and "![loss](loss.png)" in report
    after = jsonl(run / "samples" / "after.jsonl")[0]
    assert after["samples"][0].split("\n")[0][:20] in report
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_have_the_training_figures(demo_run):
    metrics = jsonl(demo_run["run"] / "metrics.jsonl")
    assert metrics, "no metrics written"
    for key in ("step", "epoch", "loss", "lr", "loss_scale", "grad_norm", "tokens_per_s", "tokens"):
        assert key in metrics[-1], key
    spec = demo_run["specdict"]["train"]
    manifest = json.loads((demo_run["run"] / "data" / "manifest.json").read_text())
    sched = EpochSchedule(manifest["splits"]["train"]["blocks"], 2, spec["micro_batch"], spec["grad_accum"], spec["seed"])
    total = math.ceil(spec["epochs"] * sched.steps_per_epoch)
    assert metrics[-1]["step"] == total
    # The logged learning rate follows HF Trainer's warm-up + cosine (the scheduler has stepped `step`
    # times): linear from 0 over warmup_steps, then half a cosine down to 0 at the last step.
    warmup = spec["warmup_steps"]
    for m in metrics[:-1]:
        s = m["step"]
        factor = s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert math.isclose(m["lr"], spec["lr"] * factor, rel_tol=1e-6), m


def test_every_parameter_is_trained(demo_run, demo_assets):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(demo_assets.model).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(demo_run["run"] / "final")
    assert exported.config.model_type == "gpt2"
    after = exported.state_dict()
    assert before.keys() == after.keys()
    unchanged = [k for k in before if before[k].is_floating_point() and "attn.bias" not in k
                 and torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not trained: {unchanged}"


def _greedy(model_dir: Path, prompts: list[str], max_length: int) -> list[str]:
    # Plain transformers, no ftjob code: what a user of the exported model does.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=False, num_beams=1, max_length=max_length,
                                 pad_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def test_samples_come_from_the_trained_weights(demo_run, demo_assets):
    gen = demo_run["specdict"]["generation"]
    after = [r["samples"][0] for r in jsonl(demo_run["run"] / "samples" / "after.jsonl")]
    before = [r["samples"][0] for r in jsonl(demo_run["run"] / "samples" / "before.jsonl")]
    exported = _greedy(demo_run["run"] / "final", gen["prompts"], gen["max_length"])
    untrained = _greedy(demo_assets.model, gen["prompts"], gen["max_length"])
    assert after == exported
    assert before == untrained  # "before" really is the starting model
    assert after != untrained


def test_each_epoch_uses_every_block_exactly_once_across_ranks(demo_run):
    manifest = json.loads((demo_run["run"] / "data" / "manifest.json").read_text())
    n_blocks = manifest["splits"]["train"]["blocks"]
    spec = demo_run["specdict"]["train"]
    sched = EpochSchedule(n_blocks, 2, spec["micro_batch"], spec["grad_accum"], spec["seed"])
    per_epoch = defaultdict(list)
    ranks_seen = set()
    for f in demo_run["trace"].glob("blocks-rank*.txt"):
        ranks_seen.add(f.name)
        for line in f.read_text().splitlines():
            step, *idx = map(int, line.split())
            per_epoch[step // sched.steps_per_epoch].extend(idx)
    assert ranks_seen == {"blocks-rank0.txt", "blocks-rank1.txt"}
    assert len(per_epoch) == spec["epochs"]
    for epoch, idx in per_epoch.items():
        assert sorted(idx) == list(range(n_blocks)), f"epoch {epoch}"
    assert per_epoch[0] != per_epoch[1]  # reshuffled every epoch


def test_export_of_the_last_checkpoint_equals_the_final_model(demo_run, tmp_path):
    from safetensors.torch import load_file

    proc = run_ftjob("export", demo_run["spec"], "--out", tmp_path / "exported", umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not_umask_modes(tmp_path / "exported", 0o022) == []  # 0644 files, whatever transformers did
    a, b = load_file(tmp_path / "exported" / "model.safetensors"), load_file(demo_run["run"] / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_ftjob("export", demo_run["spec"], "--out", tmp_path / "exported").returncode == 2  # no overwrite


def test_status_reads_the_run_from_its_files(demo_run):
    proc = run_ftjob("status", demo_run["run"])
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stdout and "step-00000048" in proc.stdout and "48 / 48" in proc.stdout


def test_rerun_of_a_finished_run_does_no_work(demo_run):
    proc = run_ftjob("run", demo_run["spec"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to do" in proc.stderr and "already trained" in proc.stderr
    assert "launching" not in proc.stderr


def test_stages_run_alone(demo_spec, tmp_path):
    """prepare, train and generate one at a time, each reading only what the one before wrote; trained with
    the original run's optimizer (Adafactor), bf16 and ZeRO-2 (the demo above: AdamW, fp32, ZeRO-1;
    ZeRO-0 and ZeRO-3 run in test_stops.py and test_integrity.py)."""
    path = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(tmp_path / "runs"), train__max_steps=3,
                      train__eval_every=0, train__sample_every=0, generation__max_length=12,
                      train__optimizer="adafactor", train__precision="bf16", train__zero_stage=2)
    run = tmp_path / "runs" / "demo"
    assert run_ftjob("train", path).returncode == 2  # no data yet: says to run prepare first
    for args in (["prepare", path], ["train", path], ["generate", path, "--name", "again"]):
        proc = run_ftjob(*args)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    assert (run / "data" / "manifest.json").exists() and (run / "final" / "config.json").exists()
    assert jsonl(run / "samples" / "again.jsonl")[0]["prompt"] == demo_spec["generation"]["prompts"][0]
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")][-1] == 3
    evals = jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3] and evals[-1]["loss"] < evals[0]["loss"]
    assert (run / "checkpoints" / "step-00000003" / "COMPLETE.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
