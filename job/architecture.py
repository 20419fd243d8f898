"""What the plan needs to know about a model, read from the model itself: transformers builds it from its
config on the meta device (real shapes and dtypes, no data, no memory), so the figures are exact for any
family and any size, and need no weights: a config.json alone describes a 70B model in about a second.

- Parameters: every tensor `model.parameters()` yields (a tied weight once), as DeepSpeed partitions them.
- Activations: the tensors autograd saves in one training forward, counted while the model runs on the
  meta device at the run's micro-batch, block and precision (`trace_activations`). That is the family's
  own code, whatever its blocks are (grouped-query attention, gated MLPs, RMSNorm, rotary embeddings,
  soft-capping, untied heads), not a formula per family.

The resulting `Architecture` is plain values (no torch), so job/plan.py's arithmetic and plan.json use it
without importing torch. Both are kept in job/cache.py's cache, keyed by everything they depend on.
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import families
from .cache import cached, library_versions, source_hash

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int  # rows of the input embedding (may exceed the tokenizer: Qwen pads to 151,936)
    positions: int  # max_position_embeddings (0 when the config states none)
    tied: bool  # lm_head shares the input embedding
    parameters: tuple = field(repr=False)  # ((name, shape), ...) in model.parameters() order
    lookup_parameters: int  # in embedding tables that are only looked up (no matmul: no FLOPs)
    largest_layer_parameters: int  # the biggest decoder layer: what ZeRO-3 gathers at once
    state_dict_entries: int  # tensors in the module's state_dict (a tied weight twice)
    fp16_problem: Optional[str] = None
    dtype: Optional[str] = None  # the dtype the checkpoint was saved in, where its config says

    def numels(self) -> list[int]:
        out = []
        for _, shape in self.parameters:
            n = 1
            for d in shape:
                n *= d
            out.append(n)
        return out

    @property
    def n_params(self) -> int:
        return sum(self.numels())

    def flops_per_token(self, block_size: int) -> float:
        """Training FLOPs per token: 6 N + 12 L (heads x head_dim) T (PaLM, appendix B), N being the
        parameters that take part in matrix products (embedding tables that are only looked up do not;
        a tied input embedding does, as the output projection)."""
        n = self.n_params - self.lookup_parameters
        return 6 * n + 12 * self.layers * self.heads * self.head_dim * block_size

    def describe(self) -> str:
        kv = f" ({self.kv_heads} key-value)" if self.kv_heads != self.heads else ""
        return (f"{self.family} ({self.model_type}), {self.layers} layers x {self.hidden}, {self.heads} heads{kv}, "
                f"vocab {self.vocab_size:,}, {self.positions:,} positions: {self.n_params:,} parameters")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parameters"] = [[n, list(s)] for n, s in self.parameters]
        d["n_params"] = self.n_params
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["parameters"] = tuple((n, tuple(s)) for n, s in d["parameters"])
        return cls(**fields)


# ------------------------------------------------------------------ cached


def describe_cached(key: dict, config_fn) -> Architecture:
    """describe(config_fn()), kept in job/cache.py's cache under `key`: every input of the config the run
    builds (pretrained.config_identity). A repeated or resumed run of the same model reads it back without
    importing transformers' modeling code (3-4 s of CPU)."""
    full = {**key, "code": source_hash(__file__), "libraries": library_versions()}
    return Architecture.from_dict(cached("architecture", full, lambda: describe(config_fn()).to_dict()))


def trace_cached(key: dict, config_fn, micro_batch: int, block_size: int, precision: str, device: str,
                 attention: str | None = None) -> dict:
    """trace_activations(config_fn(), ...), cached as describe_cached is."""
    full = {**key, "code": source_hash(__file__), "libraries": library_versions(), "batch": micro_batch,
            "block": block_size, "precision": precision, "device": device, "attention": attention}
    return cached("activations", full, lambda: trace_activations(config_fn(), micro_batch, block_size, precision,
                                                                 device, attention))


# ------------------------------------------------------------------ from a config


def as_config(config: Any):
    """A transformers config from a config object or a plain dict of its fields (GPT-2 without model_type)."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type", families.DEFAULT_MODEL_TYPE), **fields)


def describe(config: Any) -> Architecture:
    """The Architecture of the model `config` builds (as AutoModelForCausalLM.from_config would)."""
    return describe_model(build_on_meta(as_config(config)))


def describe_model(model) -> Architecture:
    """The Architecture of a built model (on the meta device, or the live one a worker trains)."""
    import torch

    config = model.config
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    out_weight = getattr(model.get_output_embeddings(), "weight", None)
    in_weight = model.get_input_embeddings().weight
    lookup = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Embedding) and m.weight is not out_weight)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    return Architecture(
        model_type=config.model_type, family=families.family(config.model_type).name,
        layers=int(text.num_hidden_layers), hidden=hidden, heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        vocab_size=int(in_weight.shape[0]), positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        tied=out_weight is not None and out_weight is in_weight,
        parameters=tuple(params), lookup_parameters=int(lookup),
        largest_layer_parameters=_largest_layer(params), state_dict_entries=len(model.state_dict()),
        fp16_problem=families.fp16_problem(config.model_type, config.to_dict()), dtype=_saved_dtype(config))


def build_on_meta(config, dtype: str = "fp32", attention: str | None = None):
    """The model `config` describes, on the meta device (no memory), in the training dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attention} if attention and attention != "auto" else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(getattr(torch, DTYPES[dtype]))


def _largest_layer(params: list[tuple[str, tuple]]) -> int:
    """Parameters of the biggest numbered block (`model.layers.7.`, `transformer.h.7.`, ...)."""
    layers: dict[str, int] = {}
    total = 0
    for name, shape in params:
        n = 1
        for d in shape:
            n *= d
        total += n
        m = re.match(r"(.*?\.\d+)\.", name)
        if m:
            layers[m.group(1)] = layers.get(m.group(1), 0) + n
    return max(layers.values(), default=total)


def _saved_dtype(config) -> Optional[str]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


# ------------------------------------------------------------------ activations


def trace_activations(config: Any, micro_batch: int, block_size: int, precision: str, device: str,
                      attention: str | None = None) -> dict:
    """Bytes autograd saves for backward in one training forward of `micro_batch` x `block_size` tokens,
    the vocabulary-sized tensors of the loss aside (job/plan.py's logits_bytes counts those), found by
    running the model on the meta device with a saved-tensors hook: each distinct storage once,
    parameters not counted.

    Two models are run, of 1 and 2 layers, and the rest is arithmetic: per_layer = t(2) - t(1), once =
    t(1) - per_layer, activations = once + layers x per_layer. With gradient checkpointing a layer keeps
    only its input (tokens x hidden in the training dtype) and one layer's activations are rebuilt at a time
    in backward: checkpointed = once + layers x input + per_layer.

    Where it is approximate: scaled_dot_product_attention is counted as the fused kernels save (q, k, v,
    the output and a float32 log-sum-exp per head and token), which is what CUDA's flash / memory-efficient
    kernels and CPU's flash kernel keep; CPU with attention dropout takes torch's math path (the T x T
    probabilities, counted as such); a family that copies the attention output before o_proj where the
    kernel's layout would not need it is off by one hidden-size tensor per layer. Temporaries that are
    not saved (a matmul's output before the next op) come and go and are not counted; mixture-of-experts
    routing cannot run on the meta device (figures None)."""
    import torch

    config = as_config(config)
    dtype = getattr(torch, DTYPES[precision])
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    tokens = micro_batch * block_size
    fused = device != "cpu" or not _attention_dropout(config)
    try:
        t1, t2 = (_saved_bytes(_with_layers(config, n), micro_batch, block_size, precision, attention, fused)
                  for n in (1, 2))
    except Exception as e:  # noqa: BLE001 - data-dependent code (MoE routing) has no meta kernels
        return {"bytes": None, "checkpointed": None, "per_layer": None, "method": f"not traced ({type(e).__name__})"}
    per_layer = t2 - t1
    once = t1 - per_layer
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    return {"bytes": once + layers * per_layer,
            "checkpointed": once + layers * tokens * hidden * bytes_per + per_layer,
            "per_layer": per_layer, "once": once,
            "method": "traced on the meta device" + (" (attention as the fused kernels save it)" if fused else "")}


def _attention_dropout(config) -> float:
    """The attention-probability dropout rate, whatever the config calls it."""
    rates = [v for k, v in config.to_dict().items() if isinstance(v, float) and ("attn" in k or "attention" in k)
             and ("dropout" in k or "pdrop" in k)]
    return max(rates, default=0.0)


def _with_layers(config, n: int):
    c = copy.deepcopy(config)
    c.num_hidden_layers = n
    if isinstance(getattr(c, "layer_types", None), list):  # per-layer kinds (sliding / full attention)
        c.layer_types = c.layer_types[:n]
    return c


def _saved_bytes(config, micro_batch: int, block_size: int, precision: str, attention: str | None,
                 fused: bool) -> int:
    import torch
    import torch.nn.functional as F

    model = build_on_meta(config, precision, attention).train()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    vocab = model.get_input_embeddings().weight.shape[0]
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in weights and key not in saved and not (t.dim() and t.shape[-1] == vocab):
            saved[key] = storage.nbytes()
        return t

    x = torch.zeros(micro_batch, block_size, dtype=torch.long, device="meta")
    original = F.scaled_dot_product_attention
    if fused:
        F.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x)
    finally:
        F.scaled_dot_product_attention = original
    return sum(saved.values())


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _fused_attention_function().apply(q, k, v)


@functools.cache
def _fused_attention_function():
    import torch

    class FusedAttention(torch.autograd.Function):
        """What the fused attention kernels keep for backward: q, k, v, the output (laid out batch, token,
        head as they write it) and a float32 log-sum-exp per head and token."""

        @staticmethod
        def forward(ctx, q, k, v):
            b, h, t, _ = q.shape
            out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)
            lse = q.new_empty(b, h, t, dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return FusedAttention
