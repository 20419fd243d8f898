"""Finding and loading pretrained models and tokenizers with transformers, offline.

Clusters rarely reach the Hugging Face Hub, so a model is a local directory or an id already in the local
cache; nothing here ever downloads (the `ftjob` entrypoint sets HF_HUB_OFFLINE=1 for itself and its workers).
Every problem with what the spec points at is a BadInput naming the key.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import BadInput, permission_denied


def resolve_model_dir(name: str, key: str = "model.path") -> Path:
    """A local directory for `name`: the path itself, or the cached snapshot of a Hub id; its files
    readable by this user."""
    p = Path(name).expanduser()
    try:
        exists = p.exists()
    except PermissionError:
        raise permission_denied(key, p) from None
    if exists:
        if not p.is_dir():
            raise BadInput(f"{key}: {name} is a file; give the directory that holds config.json")
        return check_readable(p, key)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"{key}: directory not found: {name}")
    try:
        from huggingface_hub import snapshot_download
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except Exception:
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise BadInput(f"{key}: {name!r} is not a local directory and is not in the local Hugging Face cache "
                       f"({cache}); download it where there is network (`hf download {name}`) and mount "
                       "that cache, or give a local path") from None
    return check_readable(snapshot, key)


# What transformers opens in a model directory (weights, configs, tokenizer files).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def check_readable(directory: Path, key: str) -> Path:
    """Open every model file in `directory`: a file this user may not read (a model saved by another uid
    with mode 0600) is one line saying so, not a "no such file" or "not a tokenizer" from deep inside a
    library."""
    try:
        names = sorted(os.listdir(directory))
    except PermissionError:
        raise permission_denied(key, directory) from None
    for name in names:
        f = directory / name
        if name.endswith(MODEL_FILE_SUFFIXES) and f.is_file():
            try:
                with open(f, "rb"):
                    pass
            except PermissionError:
                raise permission_denied(key, f) from None
    return directory


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name: str, key: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    directory = resolve_model_dir(name, key)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone and tokenise every text to nothing.
        raise BadInput(f"{key}: no tokenizer files in {directory} (it needs tokenizer.json or vocab.json + "
                       "merges.txt); save the tokenizer next to the model, or set model.tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(directory, use_fast=True)
    except Exception as e:
        raise BadInput(f"{key}: no usable tokenizer in {directory} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); it needs tokenizer.json or "
                       "vocab.json + merges.txt") from None
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"{key}: the tokenizer in {directory} has no fast (Rust) version; save it with tokenizer.json")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A hash of what the tokenizer does (not where it lives), for the data manifest."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def model_config(spec_model):
    """The GPT-2 config of the model the run trains: the checkpoint's, or a fresh one from `from_config`."""
    from transformers import AutoConfig

    if spec_model.from_config is not None:
        return _fresh_config(spec_model.from_config)
    directory = resolve_model_dir(spec_model.path)
    if not (directory / "config.json").exists():
        raise BadInput(f"model.path: {directory} has no config.json (is it a Hugging Face model directory?)")
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise BadInput(f"model.path: cannot read {directory / 'config.json'}: {e}") from None


def _fresh_config(fields: dict):
    """GPT2Config takes any keyword silently (a misspelt n_layers would train the default 12 layers)."""
    import difflib

    from transformers import GPT2Config

    known = set(GPT2Config().to_dict()) | set(GPT2Config.attribute_map)
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise BadInput(f"model.from_config.{key}: not a GPT2Config field" +
                           (f"; did you mean '{close[0]}'?" if close else ""))
    try:
        config = GPT2Config(**fields)
    except (TypeError, ValueError) as e:
        raise BadInput(f"model.from_config: {e}") from None
    if config.n_embd % config.n_head:
        raise BadInput(f"model.from_config: n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    return config


def check_weights(spec_model) -> None:
    """Read the headers of the model's safetensors files (not the tensors): a truncated or foreign file
    fails here, before anything is written, instead of in every worker after launch."""
    if spec_model.from_config is not None:
        return
    directory = resolve_model_dir(spec_model.path)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("pytorch_model*.bin")):
        raise BadInput(f"model.path: no weights in {directory} (model.safetensors or pytorch_model.bin); "
                       "save the model with save_pretrained, or set model.from_config to train from scratch")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                st.keys()
            _check_safetensors_size(f)
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            raise BadInput(f"model.path: {f} is not a readable safetensors file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else 'damaged'}); copy the model again") from None


def _check_safetensors_size(path: Path) -> None:
    """The header says where each tensor's bytes end; a file cut short has fewer bytes than that."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + n + end:
        raise ValueError(f"truncated: {path.stat().st_size} bytes, the header needs {8 + n + end}")


def load_model(spec_model, vocab_size: int | None = None, dropout: float | None = None):
    """The model to train: pretrained weights from `path`, or fresh weights from `from_config`."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    config = model_config(spec_model)
    if dropout is not None:
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    config._attn_implementation = spec_model.attn_implementation
    if spec_model.from_config is not None:
        if vocab_size is not None and config.vocab_size < vocab_size:
            config.vocab_size = vocab_size
        return GPT2LMHeadModel(config)
    directory = resolve_model_dir(spec_model.path)
    try:
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype="float32",
                                                    attn_implementation=spec_model.attn_implementation)
    except Exception as e:
        raise BadInput(f"model.path: cannot load weights from {directory}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}") from None


def max_positions(config) -> int:
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)
