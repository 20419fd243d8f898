"""Hugging Face directories (safetensors, config, tokenizer) that load with no ftjob code: `final/` from
the live engine at the end of training, `best/` and `ftjob export` from a checkpoint on disk.

Weights are exported in fp32 whatever the training precision: fp16 -> fp32 is exact, and fp32 is what a
user loading with from_pretrained gets by default. Written with atomic_dir: a failure (a full volume)
leaves the previous directory, or none, never half of one.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .. import faults, pretrained
from ..errors import BadInput
from ..rundir import DS_TAG, RunPaths, atomic_dir, read_marker, verify_checkpoint, writing

log = logging.getLogger("ftjob")


def export_final(engine, tokenizer, out_dir: Path, rank: int, zero_stage: int) -> None:
    """Collective under ZeRO-3 (parameters are gathered from all ranks); rank 0 writes."""
    import torch

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    module = engine.module
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    with writing(out_dir, "the final model", RunPaths(out_dir.parent)), atomic_dir(out_dir) as tmp:
        if faults.ACTIVE:
            faults.delay("export")
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        # save_pretrained records the module's own dtype (fp16/bf16 in training), and from_pretrained
        # would load the fp32 weights in it: the config says fp32, as the weights are.
        module.config.dtype = torch.float32
        module.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("exported the trained model to %s", out_dir)


def checkpoint_state_dict(path: Path) -> dict:
    """fp32 weights of a checkpoint. ZeRO checkpoints hold the fp32 master weights split across the
    optimizer's partitions (DeepSpeed's zero_to_fp32 merges them); ZeRO 0 keeps them whole."""
    import torch

    ds_dir = path / DS_TAG
    if list(ds_dir.glob("zero_*optim_states.pt")):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
        except ValueError:
            pass  # not a ZeRO checkpoint (stage 0 with a client optimizer): the module states hold it all
    # The job's own file from its own run directory, hence weights_only=False (DeepSpeed pickles).
    states = torch.load(next(ds_dir.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(ckpt: Path, out: Path, spec, replace: bool = False) -> Path:
    """A checkpoint of this job -> a Hugging Face directory, without starting DeepSpeed."""
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise BadInput(f"checkpoint {ckpt} is not complete ({problem})")
    if out.exists() and not replace:
        raise BadInput(f"{out} exists; choose another --out (nothing is overwritten)")
    tokenizer = pretrained.load_hf_tokenizer(spec.model.tokenizer or spec.model.path)
    model = pretrained.load_model(spec.model, tokenizer)
    missing, unexpected = model.load_state_dict(checkpoint_state_dict(ckpt), strict=False)
    # Buffers (rotary frequencies, masks) are rebuilt by the model and a tied head is its embedding:
    # only a missing trainable tensor means the checkpoint is of another model.
    trainable = {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k in trainable]
    if missing or unexpected:
        raise BadInput(f"checkpoint {ckpt} does not match the spec's model (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    model.tie_weights()
    with writing(out, f"the export of {ckpt.name}"), atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("exported %s (step %d) to %s", ckpt.name, read_marker(ckpt)["step"], out)
    return out
