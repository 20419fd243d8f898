"""Every model family the README names, through the real `ftjob run` (DeepSpeed's launcher, two CPU
workers, ZeRO-1): tiny random models of llama, qwen2, mistral, gemma2, phi3 and gpt_neox (gpt2: the demo
run of test_e2e.py, with the same checks) saved as a
user's checkpoint (tests/families.py), each with a tokenizer that keeps the family's BOS/EOS/pad habits.
One run per family carries every check of it: it prepares with the family's document boundaries, trains,
samples before and after, exports a directory plain transformers loads as the same model_type and
generates from, and the plan made before training equals what the engine held (parameter, gradient and
optimizer bytes) and is within 25% of the workers' peak RSS. Llama and Gemma 2 are also stopped and
resumed (weights equal to the uninterrupted run's), and a Llama with no weights on disk trains from its
config with ZeRO-3, offloading and gradient checkpointing, resuming on another number of processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import jsonl, run_ftjob, run_state, weights, write_spec
from families import FAMILY_JOIN, first_document_tokens_are_bounded, plan_equals_the_engine, write_family_model
from job import errors

pytestmark = pytest.mark.slow

# GPT-2 is tests/system/test_e2e.py's demo run, which makes the same checks.
FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt_neox"]
RESUMED = ["llama", "gemma2"]
NAMES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma2": "Gemma 2",
         "phi3": "Phi-3", "gpt_neox": "GPT-NeoX"}


def family_spec(tmp: Path, demo_spec: dict, model: Path, name: str, **extra) -> Path:
    """A short run: 8 steps of 32 blocks, an evaluation and a checkpoint every 4, a metrics record every
    step (a resumed run's losses compare step by step), dropout 0.1 on every rate (exact resumes must
    restore the RNG states), greedy samples."""
    settings = dict(output_dir=str(tmp / "runs"), name=name, model__path=str(model), data__join="auto",
                    train__precision="fp32",
                    train__max_steps=8, train__eval_every=4, train__checkpoint_every=4, train__log_every=1,
                    train__dropout=0.1, generation__do_sample=False, generation__num_beams=1,
                    generation__max_length=12)
    settings.update(extra)
    return write_spec(tmp / f"{name}.yaml", demo_spec, **settings)


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, demo_assets, tmp_path_factory):
    import yaml

    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    model = write_family_model(family, tmp / "model", demo_assets.model)
    demo = yaml.safe_load(demo_assets.spec.read_text())
    spec = family_spec(tmp, demo, model, family)
    proc = run_ftjob("run", spec)
    return {"family": family, "proc": proc, "run": tmp / "runs" / family, "model": model, "tmp": tmp,
            "demo": demo}


def test_trains_samples_and_exports_what_transformers_loads(family_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.generate import samples_from_directory
    from job.spec import GenerationSpec

    proc, run, family = family_run["proc"], family_run["run"], family_run["family"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ("samples/before.jsonl", "samples/after.jsonl", "best/config.json", "eval.jsonl"):
        assert (run / rel).exists(), rel
    evals = jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4, 8] and evals[-1]["loss"] < evals[0]["loss"]
    model, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert model.config.model_type == family
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(run / "final")
    enc = tok("The gardener", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    # `ftjob generate`'s path (a tokenizer without a pad token too: llama, mistral, gpt2, gpt_neox)
    records = samples_from_directory(run / "final", GenerationSpec(prompts=["A child"], max_length=10), "cpu")
    assert records[0]["samples"][0].startswith("A child") and len(records[0]["samples"][0]) > len("A child")
    # the exported weights are the trained ones, not the checkpoint we started from
    start = AutoModelForCausalLM.from_pretrained(family_run["model"])
    trained = dict(model.named_parameters())
    assert all(not torch.equal(p, trained[n]) for n, p in start.named_parameters())


def test_documents_start_and_end_as_the_family_expects(family_run):
    """data.join: auto picks the family's boundaries; the token stream holds them around each document."""
    first_document_tokens_are_bounded(family_run["run"], family_run["model"], FAMILY_JOIN[family_run["family"]])


def test_plan_equals_the_engine_and_names_the_family(family_run):
    assert family_run["proc"].returncode == 0
    plan_equals_the_engine(family_run["run"], f"{NAMES[family_run['family']]} ({family_run['family']})")


def test_a_stopped_run_resumes_exactly(family_run, tmp_path):
    """Llama and Gemma 2: stopped by SIGTERM after step 3 (exit 75, checkpoint step 3), then the same
    command: per-step losses and final weights equal the uninterrupted run's."""
    if family_run["family"] not in RESUMED:
        pytest.skip(f"resumed: {', '.join(RESUMED)}")
    spec = family_spec(tmp_path, family_run["demo"], family_run["model"], "resumed")
    run = tmp_path / "runs" / "resumed"
    stopped = run_ftjob("run", spec, env={"FTJOB_FAULTS": "stop_at_step=3"})
    assert stopped.returncode == errors.PREEMPTED, stopped.stderr[-3000:]
    assert (run / "checkpoints" / "step-00000003" / "COMPLETE.json").exists()
    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = family_run["run"]
    losses = [(m["step"], m["loss"]) for m in jsonl(run / "metrics.jsonl")]
    ref_losses = [(m["step"], m["loss"]) for m in jsonl(ref / "metrics.jsonl")]
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]
    assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(losses, ref_losses)), (losses, ref_losses)
    got, want = weights(run / "final"), weights(ref / "final")
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"


def test_llama_from_config_alone_with_zero3_offload_checkpointing_and_another_world_size(demo_assets, tmp_path):
    """`model.from_config` with model_type llama: no weights on disk, only the tokenizer. ZeRO-3 with its
    parameters and optimizer offloaded, gradient checkpointing on; stopped at step 3 on 2 processes and
    resumed on 1 (the checkpoint converted to DeepSpeed's universal form). It finishes, exports a Llama,
    plans the fp32 master and optimizer states ZeRO-3 holds exactly, and `ftjob export` of its last
    checkpoint (DeepSpeed's ZeRO-3 partitions merged) equals final/."""
    import yaml
    from transformers import AutoConfig

    model = write_family_model("llama", tmp_path / "tokenizer-only", demo_assets.model, weights=False)
    (model / "config.json").unlink()  # nothing but the tokenizer
    fields = dict(model_type="llama", vocab_size=469, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    spec = family_spec(tmp_path, yaml.safe_load(demo_assets.spec.read_text()), model, "llama-z3",
                       model__from_config=fields, train__zero_stage=3, train__offload="all",
                       train__gradient_checkpointing=True, train__dropout=None)
    run = tmp_path / "runs" / "llama-z3"
    proc = run_ftjob("run", spec, env={"FTJOB_FAULTS": "stop_at_step=3"})
    assert proc.returncode == errors.PREEMPTED, proc.stderr[-3000:]
    proc = run_ftjob("run", spec, "--set", "resources.procs_per_node=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the number of processes changed since step-00000003: 2 -> 1" in proc.stderr
    assert AutoConfig.from_pretrained(run / "final").model_type == "llama"
    assert "gradient checkpointing on" in (run / "logs" / "ftjob.log").read_text()
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")] == list(range(1, 9))
    plan = json.loads((run / "plan.json").read_text())
    counted = run_state(run)["state_bytes"]
    # The fp32 master and the optimizer states, offloaded to host memory (ZeRO-3's parameters are a partition
    # plus an estimate, its offloaded gradients fp32 buffers on the host: both in the plan's host figure).
    for key in ("master", "optimizer_states"):
        assert plan["plan"]["state_bytes"][key] == counted[key], key
    assert plan["plan"]["run"]["offload"] == "all" and plan["plan"]["run"]["host_bytes"] > 0
    proc = run_ftjob("export", spec, "--out", tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = weights(tmp_path / "exported"), weights(run / "final")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
