"""`ftjob smoke` as a team's CI runs it: the project's own production spec, examples/wikibooks-ru.yaml, with
no edits. The model is what the spec names, ai-forever/rugpt3small_based_on_gpt2, found in a local Hugging
Face cache that holds only its config.json (ruGPT3small's shape) and a tokenizer, no weights; the database
is a small fixture of the Wikibooks schema (--database). Then the ways a smoke must fail: a query naming a
column the fixture lacks, a model type transformers does not know, and a resume that is not exact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_ftjob
from job import errors
from job.demo import write_database

pytestmark = pytest.mark.slow

SPEC = ROOT / "examples" / "wikibooks-ru.yaml"
MODEL_ID = "ai-forever/rugpt3small_based_on_gpt2"
RUGPT3SMALL = dict(vocab_size=50264, n_positions=2048, n_embd=768, n_layer=12, n_head=12)


def hf_cache_with_config_only(home: Path, demo_model: Path, model_id: str = MODEL_ID, **config) -> Path:
    """$HF_HOME holding `model_id` as `hf download` leaves it, but with config.json and tokenizer files only."""
    from transformers import AutoConfig

    revision = "0" * 40
    repo = home / "hub" / f"models--{model_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / f, snapshot / f)
    AutoConfig.for_model("gpt2", bos_token_id=0, eos_token_id=0, **dict(RUGPT3SMALL, **config)).save_pretrained(snapshot)
    return snapshot


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    """The Wikibooks schema (title, url, abstract, body_text, body_html), table `ru`, 400 rows."""
    return write_database(tmp_path_factory.mktemp("fixture") / "wikibooks-fixture.sqlite", n_rows=400, table="ru")


@pytest.fixture(scope="module")
def hf_home(demo_assets, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    hf_cache_with_config_only(home, demo_assets.model)
    return home


def test_the_production_spec_smokes_with_config_and_tokenizer_only(hf_home, fixture_db, tmp_path):
    proc = run_ftjob("smoke", SPEC, "--database", fixture_db, "--out", tmp_path / "smoke",
                     env={"HF_HOME": str(hf_home)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "smoke" / "wikibooks-ru-rugpt3small" / "smoke.json").read_text())
    assert record["ok"] and [s["name"] for s in record["stages"]] == \
        ["spec", "model", "data", "train", "stop", "resume", "export", "plan"]
    assert all(s["result"] == "ok" for s in record["stages"]), record["stages"]
    stages = {s["name"]: s["detail"] for s in record["stages"]}
    assert "gpt2 at toy size" in stages["model"] and "vocabulary 50,264" in stages["model"]
    assert "fp32 (the spec: fp16 on GPUs)" in stages["train"] and "adafactor" in stages["train"]
    assert "exit 75" in stages["stop"] and "equal the uninterrupted run's" in stages["resume"]
    # The verdict on the console, beside the real spec's plan at its real size (ruGPT3small on a GPU)
    assert "125,231,616 parameters" in proc.stdout and "smoke passed" in proc.stdout
    for name in record["stages"]:
        assert f"{name['name']:<7} ok" in proc.stdout
    # The scratch runs used the spec's data settings (its table, join, block size) on the fixture
    manifest = json.loads((tmp_path / "smoke" / "wikibooks-ru-rugpt3small" / "uninterrupted" / "data" /
                           "manifest.json").read_text())
    assert (manifest["join"], manifest["block_size"], manifest["rows_read"]) == ("newline", 64, 400)
    assert not Path("/output/wikibooks-ru-rugpt3small").exists()  # the spec's own volume, untouched


def test_a_query_column_the_fixture_lacks_is_one_line(hf_home, fixture_db, tmp_path):
    from bad_input_cases import assert_clean_error

    proc = run_ftjob("smoke", SPEC, "--database", fixture_db, "--out", tmp_path / "smoke",
                     "--set", "data.table=", "--set", "data.query=SELECT body_text FROM ru WHERE lang = 'ru'",
                     env={"HF_HOME": str(hf_home)})
    assert_clean_error(proc, ("smoke: stage data failed", "data.query", "no such column: lang"))
    record = json.loads((tmp_path / "smoke" / "wikibooks-ru-rugpt3small" / "smoke.json").read_text())
    assert record["exit_code"] == errors.BAD_INPUT and record["stages"][-1]["name"] == "data"


def test_an_unknown_model_type_is_one_line(demo_assets, fixture_db, tmp_path):
    from bad_input_cases import assert_clean_error

    snapshot = hf_cache_with_config_only(tmp_path / "hf", demo_assets.model)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps(dict(config, model_type="gpt3")))
    proc = run_ftjob("smoke", SPEC, "--database", fixture_db, "--out", tmp_path / "smoke",
                     env={"HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(proc, ("smoke: stage model failed", "model.path", "gpt3"))


def test_a_resume_that_is_not_exact_fails_the_smoke(demo_assets, tmp_path):
    """The resumed attempt draws another data order and other dropout (a test-only fault): the smoke sees
    the losses part from the uninterrupted run's and fails (exit 1) at its resume stage."""
    proc = run_ftjob("smoke", demo_assets.spec, "--out", tmp_path / "smoke",
                     env={"FTJOB_FAULTS": "reseed_on_resume=1"})
    assert proc.returncode == errors.FAILED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke: stage resume failed: resume is not exact" in proc.stderr.splitlines()[-1]
    record = json.loads((tmp_path / "smoke" / "demo" / "smoke.json").read_text())
    assert [(s["name"], s["result"]) for s in record["stages"]][-3:] == \
        [("train", "ok"), ("stop", "ok"), ("resume", "FAILED")]
