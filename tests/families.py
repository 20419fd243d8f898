"""Tiny random models of several families, saved as a user's checkpoint directory would be: a config of
the family (`AutoConfig.for_model`), random weights (`save_pretrained`), and a tokenizer that keeps the
family's BOS/EOS/pad conventions, built from the demo's byte-level BPE (trained on the demo corpus):

| family   | BOS / EOS / pad                       | the tokenizer adds BOS by itself |
|----------|---------------------------------------|----------------------------------|
| gpt2     | <|endoftext|> is BOS and EOS, no pad   | no                               |
| llama    | <s> / </s>, no pad                    | yes                              |
| mistral  | <s> / </s>, no pad                    | yes                              |
| gemma2   | <bos> / <eos> / <pad>                 | yes                              |
| qwen2    | none / <|endoftext|> / <|endoftext|>  | no (and the embedding is 64 rows larger than the tokenizer, as Qwen pads it) |
| phi3     | <s> / <|endoftext|> / <|endoftext|>   | no                               |
| gpt_neox | <|endoftext|> is BOS and EOS, no pad   | no                               |
"""
from __future__ import annotations

from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)
# family -> (bos, eos, pad, adds BOS, extra embedding rows, config fields besides TINY's)
CONVENTIONS = {
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None, False, 0,
             dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "llama": ("<s>", "</s>", None, True, 0, TINY),
    "mistral": ("<s>", "</s>", None, True, 0, dict(TINY, sliding_window=None)),
    "gemma2": ("<bos>", "<eos>", "<pad>", True, 0, TINY),
    "qwen2": (None, "<|endoftext|>", "<|endoftext|>", False, 64, dict(TINY, tie_word_embeddings=True)),
    "phi3": ("<s>", "<|endoftext|>", "<|endoftext|>", False, 0, {k: v for k, v in TINY.items() if k != "head_dim"}),
    "gpt_neox": ("<|endoftext|>", "<|endoftext|>", None, False, 0,
                 {k: v for k, v in TINY.items() if k not in ("head_dim", "num_key_value_heads")}),
}
FAMILY_JOIN = {"gpt2": "newline", "llama": "bos_eos", "mistral": "bos_eos", "gemma2": "bos_eos", "qwen2": "eos",
               "phi3": "eos", "gpt_neox": "eos"}  # what data.join: auto must pick for each (job/families.py)


def family_tokenizer(family: str, demo_model: Path):
    """The demo BPE with the family's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, adds_bos, _, _ = CONVENTIONS[family]
    tk = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    tk.add_special_tokens([t for t in dict.fromkeys((bos, eos, pad)) if t])
    if adds_bos:
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tk.token_to_id(bos))])
        tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                   model_max_length=256)


def family_config(family: str, tokenizer, **fields):
    """The family's tiny config: the tokenizer's vocabulary (plus Qwen-style padding rows) and its ids."""
    from transformers import AutoConfig

    _, _, _, _, extra_rows, base = CONVENTIONS[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(family, vocab_size=len(tokenizer) + extra_rows, **ids, **dict(base, **fields))


def write_family_model(family: str, directory: Path, demo_model: Path, weights: bool = True, seed: int = 0) -> Path:
    """A checkpoint directory of the family (weights=False: config and tokenizer only)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = family_tokenizer(family, demo_model)
    tok.save_pretrained(directory)
    config = family_config(family, tok)
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------ checks of a finished run, shared by the
# family runs (tests/system/test_families.py) and the GPT-2 demo run (tests/system/test_e2e.py)


def plan_equals_the_engine(run: Path, family_label: str) -> None:
    """plan.json (made before training) against what rank 0 counted at its first step: parameters, fp32
    master, gradients and optimizer states byte for byte; the workers' peak RSS within 25%; the model line
    naming the family in the plan, `ftjob status` and the report."""
    import json

    from conftest import jsonl, run_ftjob, run_state

    plan = json.loads((run / "plan.json").read_text())
    counted = run_state(run)["state_bytes"]
    assert plan["plan"]["state_bytes"] == {k: counted[k] for k in plan["plan"]["state_bytes"]}
    rss = max(m["peak_rss_mib"] for m in jsonl(run / "metrics.jsonl"))
    assert abs(plan["estimates"]["peak_rss_mib"] - rss) <= 0.25 * rss, (plan["estimates"]["peak_rss_mib"], rss)
    described = plan["plan"]["model"]["describe"]
    assert described.startswith(family_label), described
    assert described in run_ftjob("status", run).stdout
    assert described in (run / "report.md").read_text()


def first_document_tokens_are_bounded(run: Path, model_dir: Path, join: str) -> None:
    """The manifest's join is `join`, and the first training block starts with the first document between
    the boundaries that join gives (data/prepare.py document_boundaries), tokenised as transformers does."""
    import json

    import numpy as np
    from transformers import AutoTokenizer

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["join"] == join
    tok = AutoTokenizer.from_pretrained(model_dir)
    shard = manifest["splits"]["train"]["shards"][0]
    header = 64  # job/data/shards.py
    blocks = np.fromfile(run / "data" / shard["tokens"], dtype=manifest["dtype"], offset=header)
    first_text = json.loads((run / "data" / shard["text"]).read_text().splitlines()[0])["text"]
    first = tok(first_text, add_special_tokens=False)["input_ids"]
    want = {"newline": first + tok("\n", add_special_tokens=False)["input_ids"],
            "eos": first + [tok.eos_token_id], "bos_eos": [tok.bos_token_id] + first + [tok.eos_token_id]}[join]
    assert blocks[: len(want)].tolist() == want
