"""The facts job/cache.py keeps: a tokenizer as transformers builds it (the `ftjob` process then tokenises
exactly as transformers does, without importing it), a config's model type, size and positions, and the
plan's model description. A repeated `ftjob` needs neither torch nor transformers; a changed file is read
again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from families import CONVENTIONS, write_family_model
from job import pretrained
from job.spec import ModelSpec

TEXTS = ["The gardener reads a book.", "  two  spaces\nand a newline ", "", "Über naïve café — 1234"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2"])
def test_the_cached_tokenizer_is_transformers_own(family, demo_assets, tmp_path, monkeypatch):
    """Ids with and without special tokens, size, special tokens, BOS habit and fingerprint equal those of
    transformers' AutoTokenizer for the same directory, the first time and from the cache."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("FTJOB_CACHE_DIR", str(tmp_path / "cache"))
    model = write_family_model(family, tmp_path / family, demo_assets.model)
    hf = AutoTokenizer.from_pretrained(model)
    for attempt in ("computed", "cached"):
        tok = pretrained.load_tokenizer(str(model))
        for special in (True, False):
            assert tok(TEXTS, add_special_tokens=special)["input_ids"] == \
                hf(TEXTS, add_special_tokens=special)["input_ids"], (attempt, special)
            assert tok(TEXTS[0], add_special_tokens=special)["input_ids"] == hf(TEXTS[0], add_special_tokens=special)["input_ids"]
        assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
            (len(hf), hf.bos_token_id, hf.eos_token_id, hf.pad_token_id), attempt
        assert pretrained.adds_bos(tok) == CONVENTIONS[family][3]
    assert len(list((tmp_path / "cache" / "tokenizer").iterdir())) == 1  # computed once


def test_a_changed_tokenizer_or_config_is_read_again(demo_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("FTJOB_CACHE_DIR", str(tmp_path / "cache"))
    model = write_family_model("llama", tmp_path / "llama", demo_assets.model)
    spec_model = ModelSpec(path=str(model))
    assert pretrained.load_tokenizer(str(model)).bos_token_id is not None
    assert pretrained.model_facts(spec_model)["vocab_size"] == 469
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(dict(config, bos_token=None)))
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    assert pretrained.load_tokenizer(str(model)).bos_token_id is None
    time.sleep(0.01)  # a new modification time even on coarse clocks
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(cfg, vocab_size=600)))
    assert pretrained.model_facts(spec_model)["vocab_size"] == 600


def test_a_repeated_plan_imports_neither_torch_nor_transformers(demo_assets, tmp_path):
    """`ftjob plan` of the demo twice with an empty cache: the first builds the tokenizer, config and model
    with transformers (on the meta device), the second reads them back and prints the same plan."""
    code = ("import sys; from job import cli\n"
            "try:\n    cli.main(['plan', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = dict(os.environ, FTJOB_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    runs = [subprocess.run([sys.executable, "-c", code, str(demo_assets.spec)], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    first, second = (r.stdout.splitlines() for r in runs)
    assert first[-1] == "IMPORTED True True", runs[0].stderr[-2000:]
    assert second[-1] == "IMPORTED False False", runs[1].stderr[-2000:]
    volume = lambda lines: [line for line in lines if not line.startswith(("volume", "IMPORTED"))]  # noqa: E731
    assert volume(first) == volume(second) and any("146,368 parameters" in line for line in second)
