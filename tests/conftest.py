"""Shared fixtures: the demo database and tiny model (built once per session, offline), a spec that
points at them, and a helper that runs the `ftjob` command exactly as a user would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTJOB_PROGRESS", "log")


@dataclass
class DemoAssets:
    directory: Path
    database: Path
    model: Path
    spec: Path  # examples/demo.yaml with paths made absolute, output_dir in a temp dir


def ftjob_command() -> list[str]:
    exe = shutil.which("ftjob")
    return [exe] if exe else [sys.executable, "-m", "job.cli"]


def run_ftjob(*args, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(ftjob_command() + [str(a) for a in args], env=full_env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


def write_spec(path: Path, base: dict, **sections) -> Path:
    """A copy of `base` with whole keys or dotted keys replaced, written as YAML."""
    spec = yaml.safe_load(yaml.safe_dump(base))
    for key, value in sections.items():
        node = spec
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> DemoAssets:
    from job.demo import write_demo_assets

    directory = tmp_path_factory.mktemp("demo-assets")
    out = write_demo_assets(directory)
    spec = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    spec["data"]["database"] = str(out["database"])
    spec["model"]["path"] = str(out["model"])
    spec["output_dir"] = str(directory / "runs")
    spec_path = directory / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return DemoAssets(directory, out["database"], out["model"], spec_path)


@pytest.fixture()
def demo_spec(demo_assets) -> dict:
    """The demo spec as a dict, to modify per test."""
    return yaml.safe_load(demo_assets.spec.read_text())
