"""The one place that knows model families: their names, how their documents start and end, and which
of them do not train in fp16. Everything else about a model is read from the model itself (job/architecture.py
builds it on the meta device), so a family missing from this table still trains, plans and exports: it
gets its tokenizer's own boundaries and no fp16 warning beyond what its config says.

No torch or transformers here: `ftjob status` and the plan's arithmetic import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_MODEL_TYPE = "gpt2"  # model.from_config without a model_type: the original run's family

JOINS = ("newline", "eos", "bos_eos")


@dataclass(frozen=True)
class Family:
    name: str
    # How documents are joined into the token stream, as the family's models were pretrained: "newline"
    # (the original ruGPT3small run), "eos" (each document ends with EOS), "bos_eos" (starts with BOS
    # and ends with EOS). None: what the tokenizer does by itself (bos_eos where it adds BOS, else eos).
    join: Optional[str] = None
    # Why fp16 is a poor choice for the family, where its authors said so; None: no known problem.
    fp16_problem: Optional[str] = None
    # Config fields of the MLP's width besides the usual intermediate_size, which `ftjob smoke` shrinks too.
    width_fields: tuple[str, ...] = ()


_GEMMA_FP16 = "Gemma's activations exceed fp16's range (its authors train and run it in bf16)"

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT-2", join="newline", width_fields=("n_inner",)),
    "llama": Family("Llama", join="bos_eos"),
    "mistral": Family("Mistral", join="bos_eos"),
    "mixtral": Family("Mixtral", join="bos_eos"),
    "qwen2": Family("Qwen2", join="eos"),
    "qwen3": Family("Qwen3", join="eos"),
    "gemma": Family("Gemma", join="bos_eos", fp16_problem=_GEMMA_FP16),
    "gemma2": Family("Gemma 2", join="bos_eos", fp16_problem=_GEMMA_FP16),
    "gemma3_text": Family("Gemma 3", join="bos_eos", fp16_problem=_GEMMA_FP16),
    "phi3": Family("Phi-3"),
    "phi": Family("Phi"),
    "gpt_neox": Family("GPT-NeoX", join="eos"),
    "olmo": Family("OLMo", join="eos"),
    "olmo2": Family("OLMo 2", join="eos"),
    "starcoder2": Family("StarCoder2", join="eos"),
    "stablelm": Family("StableLM", join="eos"),
}

# GPT-2 config flags that exist because fp16 attention overflowed in deep GPT-2 runs: a checkpoint that
# sets them was trained by someone who hit that.
_FP16_FLAGS = ("reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx")


def family(model_type: str) -> Family:
    return FAMILIES.get(model_type) or Family(model_type)


def join_for(model_type: str, adds_bos: bool, has_bos: bool, has_eos: bool) -> str:
    """data.join: auto. The family's documented join where it is in the table, else the tokenizer's own
    habit; a boundary token the tokenizer lacks is left out (no BOS: eos; no EOS either: newline)."""
    join = family(model_type).join or ("bos_eos" if adds_bos else "eos")
    if join == "bos_eos" and not has_bos:
        join = "eos"
    if join == "eos" and not has_eos:
        join = "newline"
    return join


def fp16_problem(model_type: str, config: dict) -> Optional[str]:
    """Why fp16 may overflow for this model (None if no reason is known): the family, a checkpoint saved in
    bfloat16 (trained where fp16's 65504 range was never enforced), or GPT-2's fp16 flags."""
    why = []
    if family(model_type).fp16_problem:
        why.append(family(model_type).fp16_problem)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    if "bfloat16" in dtype:
        why.append("its checkpoint was saved in bfloat16")
    why += [f"its config sets {f}" for f in _FP16_FLAGS if config.get(f)]
    return "; ".join(why) or None


def join_table() -> list[tuple[str, str, str]]:
    """(model_type, name, join default) for the README."""
    return [(t, f.name, f.join or "from the tokenizer (bos_eos if it adds BOS, else eos)")
            for t, f in FAMILIES.items()]
