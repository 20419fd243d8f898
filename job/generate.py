"""Samples from a model with the spec's prompts and sampling parameters, as JSON lines and markdown."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .rundir import atomic_write
from .spec import GenerationSpec

log = logging.getLogger("ftjob")


def generate_samples(model, tokenizer, gen: GenerationSpec, device=None, synced_gpus: bool = False) -> list[dict]:
    """One record per prompt. Seeds per prompt, so the same weights give the same samples."""
    import torch

    was_training = model.training
    model.eval()
    device = torch.device(device or next(model.parameters()).device)
    records = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sampling seeds the RNG per prompt: the training run's RNG (dropout) is put back afterwards, so samples
    # taken during training never change the steps that follow (a resumed run must reproduce them).
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for i, prompt in enumerate(gen.prompts):
            torch.manual_seed(gen.seed + i)
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            # max_length counts the prompt (as in the original run); a prompt longer than that still gets
            # a few new tokens rather than an error after hours of training.
            max_length = max(gen.max_length, enc["input_ids"].shape[1] + 8)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=gen.do_sample, num_beams=gen.num_beams,
                                     temperature=gen.temperature if gen.do_sample else None,
                                     top_p=gen.top_p if gen.do_sample else None, max_length=max_length,
                                     num_return_sequences=gen.num_return_sequences, pad_token_id=pad,
                                     synced_gpus=synced_gpus)
            records.append({"prompt": prompt, "samples": tokenizer.batch_decode(out, skip_special_tokens=True)})
    model.train(was_training)
    return records


def write_samples(records: list[dict], directory: Path, name: str, **meta) -> Path:
    """samples/<name>.jsonl plus samples/<name>.md for reading."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    atomic_write(path, "".join(json.dumps({**meta, **r}, ensure_ascii=False) + "\n" for r in records))
    lines = [f"# Samples: {name}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    for r in records:
        lines.append(f"## {r['prompt']}")
        lines += [f"{j + 1}. {s}" for j, s in enumerate(r["samples"])] + [""]
    atomic_write(directory / f"{name}.md", "\n".join(lines))
    return path


def log_samples(records: list[dict], name: str) -> None:
    """The first sample of each prompt, one line each, for the console and the run's log."""
    for r in records:
        log.info("sample (%s) %r -> %r", name, r["prompt"], r["samples"][0])


def samples_from_directory(model_dir: Path, gen: GenerationSpec, device: str | None = None) -> list[dict]:
    """Load a Hugging Face directory with plain transformers and sample from it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return generate_samples(model.to(device), tok, gen, device)
