"""Finding and loading pretrained models and tokenizers with transformers, offline.

Clusters rarely reach the Hugging Face Hub, so a model is a local directory or an id already in the local
cache; nothing here ever downloads (the `ftjob` entrypoint sets HF_HUB_OFFLINE=1 for itself and its workers).
Every problem with what the spec points at is a BadInput naming the key.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

from .cache import cached, files_identity, library_versions, source_hash
from .errors import BadInput, permission_denied
from .families import DEFAULT_MODEL_TYPE, family


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


class Tokenizer:
    """A tokenizer as transformers' AutoTokenizer builds it, reduced to what the `ftjob` process uses: the
    Rust backend (rebuilt from the JSON transformers made of it, so it tokenises exactly as transformers
    does), its size, its special tokens and whether it starts a text with BOS by itself. Those facts are
    kept in job/cache.py's cache, keyed by the tokenizer directory's files and the library versions, so a
    repeated or resumed run reads its tokenizer without importing transformers (and torch)."""

    is_fast = True

    def __init__(self, facts: dict):
        from tokenizers import Tokenizer as Backend

        self.facts = facts
        self.backend_tokenizer = Backend.from_str(facts["backend"])
        self.bos_token_id, self.eos_token_id = facts["bos_token_id"], facts["eos_token_id"]
        self.pad_token_id = facts["pad_token_id"]

    def __len__(self) -> int:
        return self.facts["len"]

    def __call__(self, text, add_special_tokens: bool = True) -> dict:
        """{"input_ids": ...} of a text or a list of texts, as transformers' tokenizer(text) gives."""
        if isinstance(text, str):
            return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}
        encodings = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def load_tokenizer(name: str, key: str = "model.tokenizer") -> Tokenizer:
    """The tokenizer of `name` for the `ftjob` process (see Tokenizer); the first time transformers builds it."""
    directory = resolve_model_dir(name, key)
    identity = {"directory": str(directory.resolve()), "files": files_identity(directory, WEIGHT_SUFFIXES),
                "code": source_hash(__file__), "libraries": library_versions()}
    return Tokenizer(cached("tokenizer", identity, lambda: _tokenizer_facts(load_hf_tokenizer(name, key))))


def _tokenizer_facts(tok) -> dict:
    return {"backend": tok.backend_tokenizer.to_str(), "len": len(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "adds_bos": _adds_bos(tok),
            "fingerprint": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]}


def load_hf_tokenizer(name: str, key: str = "model.tokenizer"):
    """transformers' AutoTokenizer of `name` (the workers: samples, the export's tokenizer files)."""
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


def adds_bos(tok: Tokenizer) -> bool:
    """Whether the tokenizer starts every text with its BOS token by itself (Llama's and Mistral's do)."""
    return tok.facts["adds_bos"]


def _adds_bos(tok) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id and ids != tok("a", add_special_tokens=False)["input_ids"]


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A hash of what the tokenizer does (not where it lives), for the data manifest."""
    return tok.facts["fingerprint"]


def model_config(spec_model):
    """The config of the model the run trains: the checkpoint's, or a fresh one from `from_config`."""
    from transformers import AutoConfig

    if spec_model.from_config is not None:
        return fresh_config(spec_model.from_config)
    directory = resolve_model_dir(spec_model.path)
    if not (directory / "config.json").exists():
        raise BadInput(f"model.path: {directory} has no config.json (is it a Hugging Face model directory?)")
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise BadInput(f"model.path: cannot read {directory / 'config.json'}: {type(e).__name__}: "
                       f"{_first_line(e)}") from None


def config_identity(spec_model) -> dict:
    """Everything the model's config depends on, without reading it: `model.from_config`'s fields, or
    where config.json is and its size and time (a cache key, see model_facts)."""
    if spec_model.from_config is not None:
        return {"from_config": spec_model.from_config}
    directory = resolve_model_dir(spec_model.path)
    return {"directory": str(directory.resolve()),
            "files": [f for f in files_identity(directory, WEIGHT_SUFFIXES) if f[0] == "config.json"]}


def model_facts(spec_model) -> dict:
    """model_type, vocab_size and positions of the model the run trains, as transformers reads its config
    (cached with config_identity as the key: the `ftjob` process of a repeated run needs no transformers)."""
    def compute() -> dict:
        config = model_config(spec_model)
        return {"model_type": config.model_type, "vocab_size": int(config.vocab_size),
                "positions": max_positions(config)}

    key = {**config_identity(spec_model), "code": source_hash(__file__), "libraries": library_versions()}
    return cached("config", key, compute)


def fresh_config(fields: dict):
    """A config for `model.from_config`: any family AutoConfig knows (`model_type`, GPT-2 without one) and
    that family's fields. A config class takes any keyword silently (a misspelt num_hidden_layer would
    train the default 32 layers), so every key is checked against the family's own fields first."""
    import difflib

    from transformers import AutoConfig, CONFIG_MAPPING

    fields = dict(fields)
    model_type = fields.pop("model_type", DEFAULT_MODEL_TYPE)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        raise BadInput(f"model.from_config.model_type: {model_type!r} is not a model type transformers knows" +
                       (f"; did you mean '{close[0]}'?" if close else " (see AutoConfig's model types)"))
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(cls.attribute_map) | set(inspect.signature(cls.__init__).parameters)
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise BadInput(f"model.from_config.{key}: not a {cls.__name__} field" +
                           (f"; did you mean '{close[0]}'?" if close else ""))
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as e:
        raise BadInput(f"model.from_config: {_first_line(e)}") from None
    heads = config.num_attention_heads
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        raise BadInput(f"model.from_config: hidden size {config.hidden_size} is not divisible by "
                       f"{heads} attention heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise BadInput(f"model.from_config: {heads} attention heads are not a multiple of {kv} key-value heads")
    return config


TOY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "intermediate_size": 128}


def toy_config(config) -> dict:
    """`model.from_config` fields of the same family at toy size (`ftjob smoke`): 2 layers, width 64, 4
    heads (grouped-query attention kept: 32 heads over 8 key-value heads become 4 over 1), MLP width 128;
    the vocabulary, positions, tie, attention kind, token ids and every other field as they are."""
    from transformers import CONFIG_MAPPING

    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None)
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version", "architectures")}
    cls = CONFIG_MAPPING[config.model_type]
    names = set(cls().to_dict()) | set(cls.attribute_map)
    for name, value in TOY.items():
        if name in names and (name != "head_dim" or getattr(config, "head_dim", None)):
            fields[cls.attribute_map.get(name, name)] = value
    if kv:
        fields["num_key_value_heads"] = max(1, TOY["num_attention_heads"] * int(kv) // heads)
    for name in family(config.model_type).width_fields:
        if fields.get(name):
            fields[name] = TOY["intermediate_size"]
    if isinstance(fields.get("layer_types"), list):  # one kind per layer (sliding / full attention)
        fields["layer_types"] = fields["layer_types"][: TOY["num_hidden_layers"]]
    return fields


def training_config(spec_model, tokenizer, dropout: float | None = None):
    """The config exactly as the workers build the model from it (the plan describes the same one): a
    fresh model's vocabulary grown to the tokenizer's and its special tokens taken from it; train.dropout
    on every dropout rate; the attention kernel asked for."""
    config = model_config(spec_model)
    if spec_model.from_config is not None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if name not in spec_model.from_config:
                setattr(config, name, getattr(tokenizer, name, None))
    if dropout is not None:
        for key, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
                setattr(config, key, dropout)
    if spec_model.attn_implementation != "auto":
        config._attn_implementation = spec_model.attn_implementation
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
    for f in files:
        try:
            check_safetensors(f)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"model.path: {f} is not a readable safetensors file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else 'damaged'}); copy the model again") from None


# Bytes per element of the safetensors dtypes (the format's own names).
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> None:
    """What safetensors checks when it opens a file, read without it (its "pt" framework imports torch,
    seconds of the `ftjob` process for a header): an 8-byte header length, a JSON header, and for every
    tensor a known dtype whose bytes (its shape's product) fill its data offsets, the offsets contiguous
    and inside the file (a file cut short has fewer bytes than its header says)."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header length {n} is past the end of the file ({size} bytes)")
        header = json.loads(f.read(n))
    tensors = sorted((v["data_offsets"], k, v) for k, v in header.items() if k != "__metadata__")
    end = 0
    for (start, stop), name, info in tensors:
        numel = 1
        for d in info["shape"]:
            numel *= d
        if start != end or stop - start != numel * SAFETENSORS_DTYPE_BYTES[info["dtype"]]:
            raise ValueError(f"tensor {name}: offsets {start}-{stop} do not hold its {info['dtype']} {info['shape']}")
        end = stop
    if size < 8 + n + end:
        raise ValueError(f"truncated: {size} bytes, the header needs {8 + n + end}")


def load_model(spec_model, tokenizer, dropout: float | None = None):
    """The model to train: pretrained weights from `path`, or fresh weights from `from_config`, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    config = training_config(spec_model, tokenizer, dropout)
    attention = {} if spec_model.attn_implementation == "auto" else {"attn_implementation": spec_model.attn_implementation}
    if spec_model.from_config is not None:
        # fp32 whatever the config's dtype says (from_config would build a bf16 config's model in bf16):
        # DeepSpeed casts to the training precision itself.
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **attention)
    directory = resolve_model_dir(spec_model.path)
    try:
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype="float32", **attention)
    except Exception as e:
        raise BadInput(f"model.path: cannot load weights from {directory}: {type(e).__name__}: "
                       f"{_first_line(e)}") from None


def max_positions(config) -> int:
    """max_position_embeddings (GPT-2's n_positions through its config's attribute map); 0 when unstated."""
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""
