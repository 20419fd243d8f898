"""Model families in-process: what job/architecture.py reads from a model built on the meta device against
the same model built for real (parameters, FLOPs, the activations autograd saves), the family table's
rules (document boundaries, fp16), and `model.from_config` for any family."""
from __future__ import annotations

import json

import pytest

from families import CONVENTIONS, family_config, family_tokenizer
from job import architecture, families, pretrained
from job.errors import BadInput

FAMILIES = list(CONVENTIONS)


@pytest.fixture(scope="module")
def tokenizers(demo_assets):
    return {f: family_tokenizer(f, demo_assets.model) for f in FAMILIES}


def real_model(family: str, tokenizer, **fields):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(family, tokenizer, **fields)).train()


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_description_equals_the_real_model(family, tokenizers):
    """Every parameter's name and shape, tied or not, the state_dict's size: exact for each family."""
    model = real_model(family, tokenizers[family])
    arch = architecture.describe(model.config)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == list(arch.parameters)
    assert arch.n_params == sum(p.numel() for p in model.parameters())
    assert arch.state_dict_entries == len(model.state_dict())
    assert arch.tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert arch.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert arch.model_type == family and arch.describe().startswith(f"{families.family(family).name} ({family})")
    # FLOPs: 6 x the parameters in matrix products (not the tables only looked up) + attention
    lookups = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Embedding"
                  and m.weight is not model.get_output_embeddings().weight)
    attention = 12 * arch.layers * arch.heads * arch.head_dim * 64
    assert arch.flops_per_token(64) == 6 * (arch.n_params - lookups) + attention


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_traced_activations_match_the_real_cpu_graph(family, precision, tokenizers, request):
    """The meta-device trace against the tensors a real CPU forward saves (3 layers, 2 x 48 tokens, dropout
    0.1 where the family has dropout): equal for the families whose attention output the fused kernel
    lays out as the model reads it; within one hidden-size tensor per layer (8%) for those that copy it."""
    import torch

    from test_plan import real_saved_bytes

    model = real_model(family, tokenizers[family], num_hidden_layers=3).to(getattr(torch, architecture.DTYPES[precision]))
    real = real_saved_bytes(model, 2, 48, model.get_input_embeddings().weight.shape[0])
    traced = architecture.trace_activations(model.config, 2, 48, precision, "cpu")["bytes"]
    if family in ("phi3", "gpt_neox"):
        assert 0.92 * real <= traced <= real, (traced, real)
    else:
        assert abs(traced - real) <= 0.003 * real, (traced, real)


def test_gradient_checkpointing_and_gpu_attention_figures(tokenizers):
    """With checkpointing a layer keeps its input only, plus one layer rebuilt: far below the full figure;
    on a GPU attention is what the fused kernels keep, never the T x T scores."""
    config = family_config("llama", tokenizers["llama"], num_hidden_layers=8)
    cpu = architecture.trace_activations(config, 4, 256, "bf16", "cpu")
    gpu = architecture.trace_activations(config, 4, 256, "bf16", "cuda")
    assert cpu["bytes"] == gpu["bytes"]  # no attention dropout: the fused kernel on both
    assert cpu["checkpointed"] == cpu["once"] + 8 * 4 * 256 * 64 * 2 + cpu["per_layer"]
    assert cpu["checkpointed"] < cpu["bytes"] / 2
    eager = architecture.trace_activations(config, 4, 256, "bf16", "cuda", attention="eager")
    assert eager["per_layer"] - gpu["per_layer"] >= 4 * 4 * 256 * 256 * 2  # heads x T x T scores, at least


def test_join_defaults_and_fallbacks():
    assert families.join_for("gpt2", False, True, True) == "newline"  # the original run
    assert families.join_for("llama", True, True, True) == "bos_eos"
    assert families.join_for("qwen2", False, False, True) == "eos"
    assert families.join_for("phi3", False, True, True) == "eos"  # not in the table's joins: the tokenizer's habit
    assert families.join_for("phi3", True, True, True) == "bos_eos"
    assert families.join_for("some_new_family", True, True, True) == "bos_eos"
    assert families.join_for("llama", True, False, True) == "eos"  # no BOS token: leave it out
    assert families.join_for("qwen2", False, False, False) == "newline"  # no EOS either


def test_fp16_problems():
    assert "Gemma" in families.fp16_problem("gemma2", {})
    assert "bfloat16" in families.fp16_problem("llama", {"torch_dtype": "bfloat16"})
    assert "reorder_and_upcast_attn" in families.fp16_problem("gpt2", {"reorder_and_upcast_attn": True})
    assert families.fp16_problem("llama", {"dtype": "float16"}) is None


def test_from_config_for_any_family():
    config = pretrained.fresh_config({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "num_hidden_layers": 1})
    assert config.model_type == "qwen2" and config.num_key_value_heads == 2
    assert pretrained.fresh_config({"n_layer": 1}).model_type == "gpt2"  # no model_type: GPT-2, as before
    with pytest.raises(BadInput, match="not a Gemma2Config field; did you mean 'head_dim'"):
        pretrained.fresh_config({"model_type": "gemma2", "head_dims": 16})


def test_an_8b_llama_plans_from_its_config_alone():
    """Llama 3.1 8B's published shape, on the meta device: its exact parameter count, in about a second."""
    config = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 131072, "tie_word_embeddings": False}
    arch = architecture.describe(config)
    assert arch.n_params == 8_030_261_248 and arch.kv_heads == 8 and arch.head_dim == 128
    assert arch.largest_layer_parameters == 218_112_000  # 4 attention + 3 MLP projections + 2 norms
    assert json.loads(json.dumps(arch.to_dict()))["n_params"] == arch.n_params


def test_the_readme_lists_each_family_join():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8").splitlines()
    rows = [f"| `{t}` | {name} | {join} |" for t, name, join in families.join_table()]
    assert [r for r in rows if r not in readme] == []


def test_the_plan_names_bf16_for_a_family_that_overflows_in_fp16(tokenizers):
    """precision auto on a GPU is fp16 (the original run); for Gemma 2 the plan says why that is risky and
    names the setting to change (the run logs the same line before it launches)."""
    from test_plan import job_spec, make_plan

    manifest = {"block_size": 16, "tokenizer": {"vocab_size": 470},
                "splits": {"train": {"documents": 9, "tokens": 0, "blocks": 640, "shards": []},
                           "valid": {"documents": 1, "tokens": 0, "blocks": 64, "shards": []}}}
    config = family_config("gemma2", tokenizers["gemma2"]).to_dict()
    found = {f.code: f.message for f in make_plan(config, job_spec(), manifest, gpus=1).findings}
    assert "Gemma" in found["fp16_overflow"] and "set train.precision: bf16" in found["fp16_overflow"]
    assert "train.precision: auto trains in fp16 on GPUs" in found["fp16_overflow"]
    bf16 = job_spec(precision="bf16")
    assert "fp16_overflow" not in {f.code for f in make_plan(config, bf16, manifest, gpus=1).findings}
