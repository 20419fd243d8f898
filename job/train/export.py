"""The final model in Hugging Face format (safetensors, config, tokenizer), loadable with no ftjob code."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger("ftjob")


def export_final(engine, tokenizer, out_dir: Path, rank: int, zero_stage: int) -> None:
    """Collective under ZeRO-3 (parameters are gathered from all ranks); rank 0 writes."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    module = engine.module
    # Weights are exported in fp32 whatever the training precision: fp16 -> fp32 is exact, and fp32 is what
    # a user loading with from_pretrained gets by default.
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.config.torch_dtype = torch.float32
    module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported the trained model to %s", out_dir)
