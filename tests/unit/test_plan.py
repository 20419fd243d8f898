"""`job.plan` against real counts: steps against hand-computed schedules, and per-rank parameter, master,
gradient and optimizer bytes against tensors counted in real models, real optimizers and a real
single-process DeepSpeed engine on CPU; a checkpoint-size estimate against a real checkpoint; the volume
check's refusal. The engine runs in one subprocess (DeepSpeed initialises torch.distributed; the pytest
process stays clean), so this file also works as a script: `python tests/unit/test_plan.py CASES_JSON DIR`.
Slower checks (the 125M shape through real engines) are in tests/system/test_plan_real.py."""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from job import architecture, plan
from job import spec as spec_lib

ROOT = Path(__file__).resolve().parents[2]
DEMO_SHAPE = dict(vocab_size=515, n_positions=256, n_embd=64, n_layer=2, n_head=4)


@functools.lru_cache(maxsize=None)
def _arch(key: str) -> architecture.Architecture:
    return architecture.describe(json.loads(key))


def arch(config: dict) -> architecture.Architecture:
    """The Architecture of a config dict (GPT-2 without model_type), built on the meta device once."""
    return _arch(json.dumps(config, sort_keys=True))


def make_plan(config: dict, spec, manifest=None, **kw) -> plan.Plan:
    """plan.make_plan as the job calls it: the model described and its activations traced from the config."""
    def activations(precision, device):
        return architecture.trace_activations(config, spec.train.micro_batch, spec.data.block_size, precision, device)

    return plan.make_plan(arch(config), spec, manifest, activations=activations, **kw)


def job_spec(tmp: Path | str = "/nonexistent", **train) -> spec_lib.JobSpec:
    """A JobSpec as the job builds one (paths are not opened)."""
    return spec_lib.from_dict({"name": "plan-test", "output_dir": str(tmp),
                               "data": {"database": "db.sqlite", "table": "t", "block_size": 16},
                               "model": {"path": "m"}, "train": train})


# ------------------------------------------------------------------ how the job builds its optimizer / config
# The job's own functions (job/train/optim.py, formerly setup.py); the same construction inline only if
# neither module is there.


def _job_optim():
    for name in ("job.train.optim", "job.train.setup"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def build_optimizer(optimizer: str, model):
    mod = _job_optim()
    if mod is not None:
        return mod.build_optimizer(job_spec(optimizer=optimizer), model, False)
    import torch
    from transformers.optimization import Adafactor

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adafactor":
        return Adafactor(params, lr=2e-4, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=0.0)
    return torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=False)


def ds_config(stage: int, precision: str, optimizer: str) -> dict:
    mod = _job_optim()
    spec = job_spec(zero_stage=stage, optimizer=optimizer, micro_batch=1, grad_accum=1)
    if mod is not None:
        wants_accum = "grad_accum" in inspect.signature(mod.deepspeed_config).parameters
        return mod.deepspeed_config(spec, precision, 1) if wants_accum else mod.deepspeed_config(spec, precision)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "fp16": {"enabled": precision == "fp16"}, "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def optimizer_state_tensor_bytes(opt) -> int:
    import torch

    return sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


# ------------------------------------------------------------------ the engine measurement (subprocess)


def measure_engines(cases: list[dict], workdir: Path) -> list[dict]:
    """For each case {config, stage, optimizer, precision[, save]}: a real DeepSpeed engine on CPU, one
    1 x 16-token step, this rank's real tensors counted, and (save) a complete checkpoint as the job writes
    it. World 1 unless RANK / WORLD_SIZE / MASTER_PORT are set (one process per rank, `workdir` shared)."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531").items():
        os.environ.setdefault(k, v)
    os.environ.update(LOCAL_RANK=os.environ["RANK"], DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from job.train.metrics import count_state_bytes

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    out = []
    for i, case in enumerate(cases):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(architecture.as_config(case["config"]))
        optimizer = build_optimizer(case["optimizer"], model)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                               config=ds_config(case["stage"], case["precision"], case["optimizer"]))
        zo = engine.optimizer
        x = torch.randint(0, case["config"]["vocab_size"], (1, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)
        grads_by_plan = count_state_bytes(engine)["gradients"]  # held now: count right after backward
        if getattr(zo, "averaged_gradients", None):  # ZeRO 1-3: the rank's gradient partition
            grads = sum(nbytes(t) for v in zo.averaged_gradients.values() if v is not None for t in v)
        else:
            grads = sum(nbytes(p.grad) for p in engine.module.parameters() if p.grad is not None)
        engine.step()
        if getattr(zo, "bit16_groups_flat", None):  # ZeRO 1/2: the model's weights are views of this
            params = sum(nbytes(t) for t in zo.bit16_groups_flat)
        else:
            params = sum(nbytes(p) for p in engine.module.parameters())
        master = sum(nbytes(t) for t in getattr(zo, "single_partition_of_fp32_groups", None) or [])
        master += sum(nbytes(t) for g in getattr(zo, "fp32_groups", None) or [] for t in g)
        lp = {t.data_ptr() for t in getattr(zo, "fp16_partitioned_groups_flat", None) or []}
        master += sum(nbytes(t) for t in getattr(zo, "fp32_partitioned_groups_flat", None) or []
                      if t.data_ptr() not in lp)  # ZeRO 3 (in fp32 the master is the weights themselves)
        basic = getattr(zo, "optimizer", zo)
        record = {**case, "rank": rank, "wrapper": type(zo).__name__, "parameters": params, "master": master,
                  "gradients": grads, "optimizer_states": optimizer_state_tensor_bytes(basic),
                  "seen_shapes": [list(p.shape) for p in basic.state],
                  "counted_by_plan": {**count_state_bytes(engine), "gradients": grads_by_plan}}
        if case.get("save"):
            record["checkpoint_files"] = save_checkpoint(engine, workdir / f"ckpt-{i}", rank)
        out.append(record)
    return out


def save_checkpoint(engine, root: Path, rank: int = 0) -> dict[str, int]:
    """A complete checkpoint with the files the job's checkpoint save writes (job/train/checkpoint.py):
    engine.save_checkpoint(tmp, tag="ds", save_latest=False), this rank's RNG file, trainer_state.json and
    the COMPLETE.json marker (size and sha256 of every file). file -> bytes."""
    import hashlib
    import random

    import numpy as np
    import torch

    path = root / "step-00000001"
    engine.save_checkpoint(str(path), tag="ds", save_latest=False)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               path / f"rng-rank{rank:05d}.pt")
    torch.distributed.barrier()
    if rank != 0:
        torch.distributed.barrier()
        return {}
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": 1, "tokens": 16, "epoch": 0, "step_in_epoch": 1, "world_size": 1, "global_batch": 1,
         "grad_accum": 1, "total_steps": 1, "attempt": 1, "rollbacks": 0, "blocks_per_step": 1,
         "eval_history": []}, indent=1))
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size,
                                        "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in sorted(path.rglob("*")) if f.is_file()}
    (path / "COMPLETE.json").write_text(json.dumps({"step": 1, "tokens": 16, "epoch": 0, "world_size": 1,
                                                    "data": "0" * 16, "time": "2026-01-01T00:00:00+0000",
                                                    "files": files}, indent=1))
    torch.distributed.barrier()
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def start_measure(cases: list[dict], world: int = 1) -> dict:
    """measure_engines in `world` fresh processes (ranks of one gloo group), started now; finish_measure
    collects them."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = tempfile.TemporaryDirectory()
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                   TRANSFORMERS_VERBOSITY="error", RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(cases), tmp.name], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return {"procs": procs, "tmp": tmp}


def finish_measure(handle: dict, timeout: float = 300) -> list[dict]:
    """Every rank's records, rank 0's first."""
    out = []
    try:
        for proc in handle["procs"]:
            stdout, stderr = proc.communicate(timeout=timeout)
            lines = [line for line in stdout.splitlines() if line.startswith("MEASURED ")]
            assert proc.returncode == 0 and lines, stderr[-3000:]
            out += json.loads(lines[-1][len("MEASURED "):])
    finally:
        for proc in handle["procs"]:
            if proc.poll() is None:
                proc.kill()
        handle["tmp"].cleanup()
    return out


def run_measure(cases: list[dict], timeout: float = 300, world: int = 1) -> list[dict]:
    return finish_measure(start_measure(cases, world), timeout)


ENGINE_CASES = [
    {"config": DEMO_SHAPE, "stage": 1, "optimizer": "adamw", "precision": "fp32", "save": True},
    {"config": DEMO_SHAPE, "stage": 1, "optimizer": "adafactor", "precision": "fp32", "save": True},
    {"config": DEMO_SHAPE, "stage": 0, "optimizer": "adafactor", "precision": "bf16", "save": True},
    {"config": DEMO_SHAPE, "stage": 2, "optimizer": "adamw", "precision": "bf16", "save": True},
]


@pytest.fixture(scope="module", autouse=True)
def _engines_started(request):
    """Start the engine processes with the module's first test, so they run beside the in-process tests
    (only when a selected test needs them)."""
    wanted = any("engines" in item.fixturenames for item in request.session.items)
    handle = start_measure(ENGINE_CASES) if wanted else None
    yield handle
    if handle is not None:
        for proc in handle["procs"]:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def engines(_engines_started):
    return finish_measure(_engines_started)


# ------------------------------------------------------------------ steps: hand-computed schedules


@pytest.mark.parametrize("blocks, world, mb, ga, epochs, max_steps, per_epoch, total", [
    (75_000, 1, 64, 2, 10, None, 586, 5860),  # the original run: 128 sequences per step, 10 epochs
    (100, 2, 8, 2, 3, None, 4, 12),  # 32 per step: 100 blocks = 3 full steps + a short one
    (100, 3, 5, 1, 1.5, None, 7, 11),  # 15 per step, ceil(1.5 x 7) = 11
    (100, 1, 8, 1, 2, 5, 13, 5),  # max_steps wins over epochs
    (96, 2, 8, 3, 0.5, None, 2, 1),  # exactly 2 steps per epoch; half an epoch is one step
    (7, 4, 2, 1, 1, None, 1, 1),  # fewer blocks than a global batch: one short step
])
def test_steps_match_the_schedule(blocks, world, mb, ga, epochs, max_steps, per_epoch, total):
    assert plan.schedule_steps(blocks, world, mb, ga, epochs, max_steps) == (per_epoch, total)
    t = {"epochs": epochs, "max_steps": max_steps, "micro_batch": mb, "grad_accum": ga, "eval_every": 0,
         "checkpoint_every": 1000, "sample_every": 0}
    s = plan.steps_plan(blocks, 10, world, 64, t)
    assert (s.steps_per_epoch, s.total_steps) == (per_epoch, total)
    assert s.sequences_per_step == world * mb * ga and s.tokens_per_step == world * mb * ga * 64
    # tokens trained: the worker's blocks_in_step, step by step (an epoch's last step takes what is left)
    per_step = world * mb * ga
    blocks_seen = sum(min(per_step, blocks - (k % per_epoch) * per_step) for k in range(total))
    assert s.tokens_trained == blocks_seen * 64


def test_evaluation_checkpoint_and_sample_counts():
    # 5860 steps, eval every 500: before, 11 in between (500..5500), after; checkpoints at 1000..5000 + final
    t = {"epochs": 10, "max_steps": None, "micro_batch": 64, "grad_accum": 2, "eval_every": 500,
         "checkpoint_every": 1000, "sample_every": 1000}
    s = plan.steps_plan(75_000, 18_000, 1, 64, t)
    assert (s.total_steps, s.evaluations, s.checkpoints, s.sample_rounds) == (5860, 13, 6, 7)
    assert plan.steps_plan(75_000, 0, 1, 64, t).evaluations == 0  # no validation blocks, no evaluation
    t.update(max_steps=1000)  # a checkpoint due at the last step is the final one, not two
    assert plan.steps_plan(75_000, 10, 1, 64, t).checkpoints == 1


def test_make_plan_steps_from_a_manifest():
    spec = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml")
    manifest = {"block_size": 64, "rows_read": 3300, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 2635, "tokens": 4_800_600, "blocks": 75_009, "shards": []},
                           "valid": {"documents": 659, "tokens": 1_152_000, "blocks": 18_000, "shards": []}}}
    p = make_plan(plan.RUGPT3SMALL, spec, manifest, free_bytes=10**12)
    assert (p.world, p.precision, p.device) == (1, "fp16", "cuda")  # procs_per_node 1, fp16 means a GPU
    assert (p.steps.steps_per_epoch, p.steps.total_steps) == (587, 5870)  # ceil(75009 / 128) = 587 (128 x 586 = 75008)
    assert p.steps.tokens_per_step == 8192 and p.data.documents == {"train": 2635, "valid": 659}


def test_the_plan_evaluates_a_subset_of_a_big_split_and_says_its_share_of_the_run():
    """The original settings evaluate all 18,000 validation blocks; 50 GB of text (valid_fraction 0.2)
    would evaluate 40M blocks 626 times without train.eval_blocks: auto keeps each evaluation at
    128K blocks, a small share of the run. A corpus not prepared yet: prepare's time and its peak on the
    volume (text and tokens twice, while the shards are copied) are in the plan."""
    spec = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml")
    manifest = {"block_size": 64, "rows_read": 3300, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 2635, "tokens": 4_800_600, "blocks": 75_009, "shards": []},
                           "valid": {"documents": 659, "tokens": 1_152_000, "blocks": 18_000, "shards": []}}}
    p = make_plan(plan.RUGPT3SMALL, spec, manifest, free_bytes=10**12)
    assert p.time.eval_blocks == 18_000 and p.time.full_eval_blocks == 0
    assert "eval     13 evaluations x 18,000 of 18,000 validation blocks" in p.to_text()

    spec.train.epochs, spec.train.global_batch = 1, 512
    big = plan.DataFigures("estimate from 2,000 sampled rows", 64, 40_000_000, {"train": 40_000_000, "valid": 10_000_000},
                           {"train": 10_240_000_000, "valid": 2_560_000_000}, {"train": 160_000_000, "valid": 40_000_000},
                           50 * 10**9, 25 * 10**9)
    p = make_plan(plan.RUGPT3SMALL, spec, data=big, free_bytes=10**12)
    assert p.steps.evaluations == 626 and p.time.eval_blocks == 127_796
    assert 0.05 < p.time.eval_share < 0.2, p.time.eval_share
    everything = plan.time_plan(p.model, p.steps, 40_000_000, p.checkpoint.total, p.export_bytes, device="cuda",
                                world=p.world)
    assert everything.eval_s > 50 * p.time.eval_s  # what evaluating every block would have cost
    assert p.time.prepare_s > 0 and "+ prepare" in p.to_text()
    assert p.volume.need_bytes == big.prepare_peak_bytes == 2 * big.data_bytes  # 150 GB while preparing
    assert "preparing the data needs 150.00 GB for a while" in p.volume.message
    spec.train.final_eval = "full"
    full = make_plan(plan.RUGPT3SMALL, spec, data=big, free_bytes=10**12)
    assert full.time.full_eval_blocks == 40_000_000 and full.time.eval_s > p.time.eval_s
    assert "+ one pass over all 40,000,000" in full.to_text()


# ------------------------------------------------------------------ exact state bytes: arithmetic


def test_partition_padding_hand_computed():
    # ZeRO 1/2 pad the flat buffer to a multiple of 2 x world elements, then split it evenly
    assert plan.zero_partition(149_440, 1) == 149_440
    assert plan.zero_partition(10, 4) == 4  # 10 -> 16 -> 4 each
    assert plan.zero_partition(125_231_616, 8) == 15_653_952
    assert plan.zero_partition(125_231_617, 8) == 15_653_954  # 125231617 -> 125231632 -> /8
    st = plan.state_bytes(arch(plan.RUGPT3SMALL), "fp16", 1, "adamw", 8)
    assert (st.parameters, st.master, st.gradients) == (2 * 125_231_616, 4 * 15_653_952, 2 * 15_653_952)
    assert st.optimizer_states == 8 * 15_653_952 + 4


def test_ruGPT3small_parameter_count():
    # wte 50264x768 + wpe 2048x768 + 12 x 7,087,872 per layer + ln_f 1536 (lm_head tied)
    rug = arch(plan.RUGPT3SMALL)
    assert rug.n_params == 125_231_616 and rug.tied and rug.lookup_parameters == 2048 * 768
    assert rug.largest_layer_parameters == 7_087_872
    assert arch(dict(plan.RUGPT3SMALL, tie_word_embeddings=False)).n_params == 125_231_616 + 50264 * 768
    # the reference FLOPs per token the time plan scales by are this model's own
    assert rug.flops_per_token(plan.REFERENCE_BLOCK) == plan.REFERENCE_FLOPS_PER_TOKEN


# ------------------------------------------------------------------ exact state bytes: real tensors, ZeRO 0


def count_zero0(config: dict, optimizer: str, device: str) -> dict:
    """fp32, no DeepSpeed wrapper (what ZeRO 0 fp32 runs): parameters, gradients after backward, optimizer
    state tensors after one step, counted on a real model (meta device: real shapes and dtypes, no data)."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.train.metrics import count_state_bytes

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(architecture.as_config(config))
    x = torch.randint(0, config["vocab_size"], (1, 16), device=device)
    model(input_ids=x, labels=x).loss.backward()
    grads = sum(nbytes(p.grad) for p in model.parameters())
    opt = build_optimizer(optimizer, model)
    opt.step()
    return {"parameters": sum(nbytes(p) for p in model.parameters()), "gradients": grads,
            "optimizer_states": optimizer_state_tensor_bytes(opt),
            "counted_by_plan": count_state_bytes(model, opt)}


@pytest.mark.parametrize("config, device", [(DEMO_SHAPE, "cpu"), (plan.RUGPT3SMALL, "meta")],
                         ids=["demo", "ruGPT3small"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_zero0_fp32_state_bytes_equal_real_tensors(config, device, optimizer):
    got = count_zero0(config, optimizer, device)
    st = plan.state_bytes(arch(config), "fp32", 0, optimizer, 1)
    assert (st.parameters, st.master, st.gradients, st.optimizer_states) == \
        (got["parameters"], 0, got["gradients"], got["optimizer_states"])
    assert got["counted_by_plan"] == {"parameters": got["parameters"], "master": 0, "gradients": got["gradients"],
                                      "optimizer_states": got["optimizer_states"]}
    if optimizer == "adafactor":  # factored: far below AdamW's 8 B per parameter
        assert st.optimizer_states < 0.05 * 8 * st.parameters / 4


def test_demo_assets_config_plans_exactly(demo_assets):
    """The demo's real config.json (the tiny model `make demo` trains), read as the job reads it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(demo_assets.model)
    got = count_zero0(config.to_dict(), "adamw", "cpu")
    st = plan.state_bytes(architecture.describe(config), "fp32", 0, "adamw", 1)
    assert (st.parameters, st.gradients, st.optimizer_states) == \
        (got["parameters"], got["gradients"], got["optimizer_states"])


# ------------------------------------------------------------------ exact state bytes: real DeepSpeed engines


def test_engine_state_bytes_equal_real_tensors(engines):
    shape = arch(DEMO_SHAPE)
    for m in engines:
        st = plan.state_bytes(shape, m["precision"], m["stage"], m["optimizer"], 1)
        want = {"parameters": st.parameters, "master": st.master, "gradients": st.gradients,
                "optimizer_states": st.optimizer_states}
        got = {k: m[k] for k in want}
        assert got == want, (m["stage"], m["precision"], m["optimizer"], m["wrapper"])
        assert m["counted_by_plan"] == got
        assert [tuple(s) for s in m["seen_shapes"]] == [tuple(s) for s in st.seen_shapes]


def test_what_the_optimizer_sees(engines):
    """ZeRO 1-2 hand the optimizer one flat fp32 partition (Adafactor cannot factor it); ZeRO 0 with bf16
    hands it an fp32 copy of each real tensor (Adafactor factors the 2-D ones)."""
    by = {(m["stage"], m["optimizer"], m["precision"]): m for m in engines}
    n = arch(DEMO_SHAPE).n_params
    assert by[(1, "adafactor", "fp32")]["seen_shapes"] == [[n]]
    assert by[(1, "adafactor", "fp32")]["optimizer_states"] == 4 * n + 4  # exp_avg_sq + RMS: not factored
    z0 = by[(0, "adafactor", "bf16")]
    assert z0["wrapper"] == "FP16_UnfusedOptimizer" and [515, 64] in z0["seen_shapes"]
    assert z0["master"] == 4 * n and z0["optimizer_states"] < n


def test_checkpoint_estimate_within_10_percent(engines):
    shape = arch(DEMO_SHAPE)
    for m in engines:
        real = sum(m["checkpoint_files"].values())
        est = plan.checkpoint_bytes(shape, m["precision"], m["stage"], m["optimizer"], 1).total
        assert abs(est - real) <= 0.10 * real, (m["stage"], m["precision"], m["optimizer"], est, real,
                                                m["checkpoint_files"])


# ------------------------------------------------------------------ activations: the trace against real CPU graphs


def real_saved_bytes(model, batch: int, block: int, vocab: int) -> int:
    """Every distinct storage autograd saves in one real forward on CPU (parameters and the loss's
    vocabulary-sized tensors aside): what architecture.trace_activations counts on the meta device."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and not (t.dim() and t.shape[-1] == vocab):
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, vocab, (batch, block))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(saved.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_gpt2_activation_trace_equals_saved_tensors(dropout, attention):
    """GPT-2 with and without dropout (CPU's math attention path then), both attention kernels, two batch
    shapes: the meta-device trace equals the bytes a real forward saves, exactly. (Other families:
    tests/unit/test_families.py.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(DEMO_SHAPE, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation=attention)).train()
    assert model.config._attn_implementation == attention
    for b, t in ((2, 64), (3, 40)):
        traced = architecture.trace_activations(model.config, b, t, "fp32", "cpu", attention)
        assert traced["bytes"] == real_saved_bytes(model, b, t, cfg["vocab_size"]), (b, t)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_peak_equals_the_allocator_peak(dtype):
    """HF's causal-LM loss on logits of t x V (lm_head's output in the model dtype), then backward: the
    allocator's peak (torch profiler memory events) is 12 x V x t bytes, as logits_bytes says."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.loss.loss_utils import ForCausalLMLoss

    t, v = 512, 8000
    dt = getattr(torch, dtype)
    h = torch.randn(t, 64, dtype=dt, requires_grad=True)
    w = torch.randn(64, v, dtype=dt)
    labels = torch.randint(0, v, (1, t))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = (h @ w).view(1, t, v)
        loss = ForCausalLMLoss(logits, labels, v)
        del logits  # the worker keeps only .loss of the model's output
        loss.backward()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler does not expose memory events")
    current = peak = 0
    for _, size in sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"):
        current += size
        peak = max(peak, current)
    shape = arch(dict(vocab_size=v, n_positions=t, n_embd=64, n_layer=1, n_head=1))
    want = plan.logits_bytes(shape, 1, t, "fp32" if dtype == "float32" else "bf16")["peak"]
    assert abs(peak - want) <= 0.01 * want, (peak, want)


def test_memory_table_orders_stages_and_checkpointing():
    shape = arch(plan.RUGPT3SMALL)
    acts = architecture.trace_activations(plan.RUGPT3SMALL, 8, 1024, "fp16", "cuda")
    kw = dict(precision="fp16", optimizer="adamw", world=8, micro_batch=8, block_size=1024, device="cuda")
    plans = [plan.memory_plan(shape, acts, zero_stage=z, **kw) for z in range(4)]
    states = [p.state.total for p in plans]
    # ZeRO 1 partitions the master and optimizer states; the gradients it holds after the boundary are its
    # partition, as under ZeRO 2, but it keeps whole ones until then (its gradient buffers); ZeRO 3
    # partitions the weights too.
    assert states[0] > states[1] == states[2] > states[3]
    assert plans[1].item("gradient buffers") > plans[2].item("gradient buffers")
    assert plans[1].peak_bytes > plans[2].peak_bytes
    ckpt = plan.memory_plan(shape, acts, zero_stage=1, gradient_checkpointing=True, **kw)
    assert ckpt.item("activations") < plans[1].item("activations") / 5
    huge_acts = architecture.trace_activations(plan.RUGPT3SMALL, 512, 1024, "fp16", "cuda")
    huge = plan.memory_plan(shape, huge_acts, zero_stage=1, **dict(kw, micro_batch=512), limit_bytes=80 * plan.GiB)
    assert huge.fits is False and "DOES NOT FIT" in huge.verdict
    # offload: the optimizer's share leaves the GPU for host memory; with "all" the parameters too
    opt = plan.memory_plan(shape, acts, zero_stage=3, offload="optimizer", **kw)
    every = plan.memory_plan(shape, acts, zero_stage=3, offload="all", **kw)
    st = plans[3].state
    assert opt.item("optimizer states") == opt.item("master weights") == 0
    assert opt.host_bytes == st.master + st.optimizer_states + 4 * st.partition
    assert every.item("parameters") == 0 and every.host_bytes == opt.host_bytes + st.parameters
    assert every.peak_bytes < opt.peak_bytes < plans[3].peak_bytes


# ------------------------------------------------------------------ volume


def test_volume_refuses_when_free_space_is_short():
    gb = 10**9
    v = plan.volume_plan(data_bytes=1 * gb, checkpoint=2 * gb, keep_checkpoints=2, export=gb // 2,
                         free_bytes=5 * gb, other_bytes=0)
    assert v.need_bytes == 1 * gb + 3 * 2 * gb + 2 * gb // 2 == 8 * gb
    assert v.ok is False
    for figure in ("8.00 GB", "5.00 GB", "short by 3.00 GB",
                   "3 checkpoints (2 kept + 1 being written) x 2.00 GB"):
        assert figure in v.message, v.message
    with pytest.raises(Exception) as err:
        plan.require_space(v)
    assert getattr(err.value, "exit_code", None) == 74 and "8.00 GB" in str(err.value)
    # what is already on the volume (the prepared data) is not written again
    assert plan.volume_plan(gb, 2 * gb, 2, gb // 2, 7 * gb, present_bytes=gb, other_bytes=0).ok is True
    assert plan.volume_plan(gb, 2 * gb, 2, gb // 2, 8 * gb, other_bytes=0).ok is True  # exactly enough
    assert plan.volume_plan(gb, 2 * gb, 2, gb // 2, None).ok is None


def test_make_plan_refuses_a_small_volume():
    spec = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml")
    manifest = {"block_size": 64, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 10, "tokens": 64_000, "blocks": 1000, "shards": []},
                           "valid": {"documents": 2, "tokens": 6400, "blocks": 100, "shards": []}}}
    p = make_plan(plan.RUGPT3SMALL, spec, manifest, free_bytes=10**9)
    assert p.volume.ok is False and not p.ok
    assert any(f.code == "volume" and f.severity == "error" for f in p.findings)


# ------------------------------------------------------------------ time, warnings, output forms


def test_time_from_given_and_reference_speed():
    shape = arch(plan.RUGPT3SMALL)
    assert plan.reference_tokens_per_s(shape, 64) == pytest.approx(156_000)  # the reference's own shape
    assert plan.reference_tokens_per_s(shape, 1024) < 156_000  # attention FLOPs grow with the block
    t = {"epochs": 1, "max_steps": 1000, "micro_batch": 8, "grad_accum": 1, "eval_every": 0,
         "checkpoint_every": 10**6, "sample_every": 0}
    steps = plan.steps_plan(10**6, 0, 2, 128, t)
    tp = plan.time_plan(shape, steps, 0, checkpoint=2 * 10**9, export=5 * 10**8, device="cuda", world=2,
                        tokens_per_s=20_480.0)
    assert tp.train_s == pytest.approx(1000 * 2048 / 20_480) and tp.step_s == pytest.approx(0.1)
    assert tp.one_checkpoint_s == pytest.approx(7.2)  # 2.0 GB at the measured 2.0 GB / 7.2 s
    assert tp.grace_s == 120 and tp.slurm_time.count(":") == 2
    assert tp.active_deadline_s >= tp.total_s * plan.TIME_MARGIN
    assert plan.slurm_time(3601) == "01:01:00" and plan.slurm_time(90_000) == "1-01:00:00"
    slow = plan.time_plan(shape, steps, 0, checkpoint=100 * 10**9, export=0, device="cuda", world=2,
                          tokens_per_s=20_480.0)  # 360 s to write: 2 x (0.1 + 360) + 30 -> 760 s
    assert slow.grace_s == 760
    cpu = plan.time_plan(shape, steps, 0, 10**9, 10**8, device="cpu", world=2)
    assert cpu.total_s is None and "tokens/s" in cpu.source


def test_findings_rules():
    base = dict(plan.RUGPT3SMALL)
    spec = spec_lib.from_dict({"name": "w", "output_dir": "/o", "data": {"database": "d", "table": "t",
                               "block_size": 4096}, "model": {"path": "m"},
                               "train": {"precision": "fp16", "micro_batch": 64, "grad_accum": 2},
                               "resources": {"procs_per_node": 0}})
    manifest = {"block_size": 4096, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 5, "tokens": 5 * 4096, "blocks": 5, "shards": []},
                           "valid": {"documents": 1, "tokens": 0, "blocks": 0, "shards": []}}}
    codes = {f.code: f.severity for f in make_plan(base, spec, manifest, gpus=4).findings}
    assert codes["block_over_positions"] == "error"
    assert codes["fewer_blocks_than_batch"] == "error"
    assert codes["batch_depends_on_world"] == "warning" and codes["no_validation"] == "warning"
    assert "fp16_overflow" not in codes  # plain GPT-2 config: no reason given
    for risky in ({"torch_dtype": "bfloat16"}, {"reorder_and_upcast_attn": True}):
        found = {f.code: f.message for f in make_plan(dict(base, **risky), spec, manifest, gpus=4).findings}
        assert "train.precision: bf16" in found["fp16_overflow"], risky
    spec.data.block_size, manifest["block_size"] = 64, 64
    manifest["splits"]["train"]["blocks"] = 300  # a micro-batch per GPU, but less than 4 x 64 x 2
    codes = {f.code for f in make_plan(base, spec, manifest, gpus=4).findings}
    assert "fewer_blocks_than_global_batch" in codes and "block_over_positions" not in codes


def test_global_batch_and_gradient_checkpointing_from_the_spec():
    """train.global_batch fixes the batch on any number of GPUs (the worker derives grad_accum from it);
    train.gradient_checkpointing picks the memory column."""
    raw = {"name": "g", "output_dir": "/o", "data": {"database": "d", "table": "t", "block_size": 128},
           "model": {"path": "m"}, "resources": {"procs_per_node": 0},
           "train": {"micro_batch": 8, "global_batch": 64, "epochs": 1, "gradient_checkpointing": True}}
    manifest = {"block_size": 128, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 9, "tokens": 0, "blocks": 6400, "shards": []},
                           "valid": {"documents": 1, "tokens": 0, "blocks": 64, "shards": []}}}
    spec = spec_lib.from_dict(raw)
    for gpus, accum in ((1, 8), (2, 4), (8, 1)):
        p = make_plan(plan.RUGPT3SMALL, spec, manifest, gpus=gpus)
        assert (p.world, p.grad_accum, p.steps.sequences_per_step, p.steps.total_steps) == (gpus, accum, 64, 100)
        assert "batch_depends_on_world" not in {f.code for f in p.findings}
        assert p.gradient_checkpointing and p.chosen_memory is p.memory_checkpointing[1]
    codes = {f.code: f.severity for f in make_plan(plan.RUGPT3SMALL, spec, manifest, gpus=3).findings}
    assert codes["global_batch"] == "error"  # 64 / (3 x 8) does not divide: the job refuses


def test_text_and_json_forms():
    spec = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml")
    manifest = {"block_size": 64, "rows_read": 3300, "tokenizer": {"vocab_size": 50264},
                "splits": {"train": {"documents": 2635, "tokens": 4_800_000, "blocks": 75_000,
                                     "shards": [{"text_bytes": 10**7, "tokens_bytes": 9_600_064}]},
                           "valid": {"documents": 659, "tokens": 1_152_000, "blocks": 18_000,
                                     "shards": [{"text_bytes": 2 * 10**6, "tokens_bytes": 2_304_064}]}}}
    p = make_plan(plan.RUGPT3SMALL, spec, manifest, free_bytes=50 * 10**9)
    text = p.to_text()
    for needle in ("125,231,616 parameters", "5,860 steps", "8,192 tokens", "#SBATCH --time=",
                   "activeDeadlineSeconds", "terminationGracePeriodSeconds", "reference, not an ftjob measurement",
                   "flat fp32 partition", "1 *"):
        assert needle in text, needle
    d = json.loads(p.to_json())
    assert d["steps"]["total_steps"] == 5860 and d["run"]["zero_stage"] == 1 and d["ok"] is True
    assert [(m["zero_stage"], m["offload"]) for m in d["memory"]] == plan.MEMORY_VARIANTS
    assert d["memory"][1]["items"]["optimizer states"]["exact"] is True
    assert d["volume"]["ok"] is True and d["data"]["data_bytes"] > 0


def test_import_is_light():
    code = "import sys, job.plan; sys.exit(int(any(m in sys.modules for m in ('torch', 'deepspeed', 'transformers'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_estimate_from_a_sample(demo_assets, tmp_path):
    """Without a manifest: rows counted exactly, tokens from a sample, with a stated error that covers the
    figures prepare gives (the demo table: 600 rows, 36 unusable)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets.model)
    data = spec_lib.from_dict({"name": "e", "output_dir": str(tmp_path), "model": {"path": "m"},
                               "data": {"database": str(demo_assets.database), "table": "en",
                                        "text_column": "body_text", "block_size": 64}}).data
    full = plan.estimate_data_from_sample(data, tok, sample_rows=10_000)  # every row: exact
    est = plan.estimate_data_from_sample(data, tok, sample_rows=150, seed=1)
    assert full.rows_read == est.rows_read == 600 and full.relative_error == 0
    assert full.documents == {"train": 451, "valid": 113}  # 564 usable, ceil(0.2 x 564) = 113 valid
    total = full.tokens["train"] + full.tokens["valid"]
    got = est.tokens["train"] + est.tokens["valid"]
    assert 0 < est.relative_error < 0.5 and "±" in est.error
    assert abs(got - total) <= est.relative_error * total


if __name__ == "__main__":  # the engine measurement, run in fresh processes by run_measure
    print("MEASURED " + json.dumps(measure_engines(json.loads(sys.argv[1]), Path(sys.argv[2]))), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: DeepSpeed/gloo threads can hang at exit
