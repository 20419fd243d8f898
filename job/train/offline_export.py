"""`ftjob export`: a checkpoint of this job -> a Hugging Face directory, without starting DeepSpeed.

ZeRO checkpoints hold the fp32 master weights split across the optimizer's partitions; DeepSpeed's own
zero_to_fp32 merges them. Without ZeRO (stage 0) the model states file holds the weights whole.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import model as model_lib
from .. import spec as spec_lib
from ..data.prepare import read_manifest
from ..errors import BadInput
from ..paths import RunPaths
from . import checkpoint

log = logging.getLogger("ftjob")


def checkpoint_state_dict(path: Path) -> dict:
    ds_dir = path / checkpoint.DS_TAG
    if list(ds_dir.glob("zero_*optim_states.pt")):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=checkpoint.DS_TAG)
        except ValueError:
            pass  # not a ZeRO checkpoint (stage 0 with a client optimizer): the module states hold it all
    # The job's own file from its own run directory, hence weights_only=False (DeepSpeed pickles).
    states = torch.load(next(ds_dir.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(paths: RunPaths, ckpt: Path | None = None, out: Path | None = None) -> Path:
    ckpt = ckpt or checkpoint.newest_complete(paths.checkpoints)
    if ckpt is None or checkpoint.verify_checkpoint(ckpt) is not None:
        raise BadInput(f"no complete checkpoint to export in {ckpt or paths.checkpoints}")
    step = checkpoint.read_marker(ckpt)["step"]
    out = out or paths.root / f"export-step-{step:08d}"
    if out.exists():
        raise BadInput(f"{out} exists; choose another --out (nothing is overwritten)")
    spec = spec_lib.load(paths.spec)
    manifest = read_manifest(paths) or {"tokenizer": {"vocab_size": None}}
    model = model_lib.load_model(spec.model, manifest["tokenizer"]["vocab_size"])
    missing, unexpected = model.load_state_dict(checkpoint_state_dict(ckpt), strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]
    if missing or unexpected:
        raise BadInput(f"checkpoint {ckpt} does not match the spec's model (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    model_lib.load_tokenizer(spec.model.tokenizer or spec.model.path).save_pretrained(out)
    log.info("exported %s (step %d) to %s", ckpt.name, step, out)
    return out
