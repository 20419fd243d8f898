"""The CI recipes of examples/ci/ are valid for their CI systems (checked against the GitHub workflow and
GitLab CI schemas that check-jsonschema ships, offline), fail when broken, and run what the README says:
ftjob from the lock files, the CPU torch CI tests with, `ftjob smoke` of the production spec."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}
SMOKE = "ftjob smoke examples/wikibooks-ru.yaml --database tests-fixture.sqlite"


def check(path: Path, schema: str) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    return subprocess.run([exe, "--builtin-schema", schema, str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid_and_a_broken_one_is_not(name, tmp_path):
    path = ROOT / "examples" / "ci" / name
    ok = check(path, RECIPES[name])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load(path.read_text())
    if name == "github-actions.yml":
        del broken["jobs"]["smoke"]["runs-on"]  # a job with nowhere to run
    else:
        broken["ftjob-smoke"]["when"] = "sometimes"  # not one of GitLab's when values
    bad = tmp_path / name
    bad.write_text(yaml.safe_dump(broken))
    assert check(bad, RECIPES[name]).returncode != 0


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_installs_from_the_locks_and_smokes_the_spec(name):
    text = (ROOT / "examples" / "ci" / name).read_text()
    torch = re.search(r"^TORCH \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install {torch} " in text  # the CPU build CI itself tests with
    assert "pip install -r requirements.lock" in text and "pip install --no-deps ." in text
    assert SMOKE in text and "HF_HUB_OFFLINE" in text
    assert SMOKE in (ROOT / "README.md").read_text()
