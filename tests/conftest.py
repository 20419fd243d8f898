"""Shared fixtures: the demo database and tiny model (built once per session, offline), a spec that
points at them, and a helper that runs the `ftjob` command exactly as a user would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FTJOB_PROGRESS", "log")
# The pytest workers share the machine's cores: one thread per process. Torch's default (a thread per core)
# makes OpenMP threads spin against the other workers' processes: a quarter more CPU time for the same runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The plan's model descriptions (job/architecture.py's cache) start cold in every test session, away from ~.
os.environ.setdefault("FTJOB_CACHE_DIR", tempfile.mkdtemp(prefix="ftjob-test-cache-"))


@dataclass
class DemoAssets:
    directory: Path
    database: Path
    model: Path
    spec: Path  # examples/demo.yaml with paths made absolute, output_dir in a temp dir


def ftjob_command() -> list[str]:
    exe = shutil.which("ftjob")
    return [exe] if exe else [sys.executable, "-m", "job.cli"]


def run_ftjob(*args, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
              umask: int = -1) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(ftjob_command() + [str(a) for a in args], env=full_env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True, umask=umask)


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


# Readers of what a run leaves on the volume, shared by the system tests.
def jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file; none when it does not exist (yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_state(run: Path) -> dict:
    """state.json of a run directory; {} while it is not written."""
    try:
        return json.loads((run / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def not_umask_modes(root: Path, umask: int) -> list[str]:
    """Files and directories under `root` whose mode is not what a plain write gets under `umask` (0644 and
    0755 under 022, 0640 and 0750 under 027; files with an x bit count as executables)."""
    wrong = []
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        if mode != (0o777 if p.is_dir() or mode & 0o111 else 0o666) & ~umask:
            wrong.append(f"{oct(mode)} {p.relative_to(root)}")
    return wrong


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def start_ftjob(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(ftjob_command() + [str(a) for a in args], env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(predicate, timeout: float = 120, what: str = "condition", poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


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


# The longest files first: with workers taking whole files (--dist loadfile), a long file started last
# runs alone at the end. Seconds each file took with three workers on 2 cores, measured; unlisted files
# are short. (`make test` passes --no-loadscope-reorder: xdist would otherwise order files by their number
# of tests, which put the two longest files, of one and two tests, last.)
LONG_FILES = {"test_families.py": 330, "test_smoke.py": 150, "test_world_size.py": 265, "test_stops.py": 240, "test_resume.py": 212, "test_integrity.py": 200,
              "test_one_writer.py": 190, "test_slurm.py": 150, "test_e2e.py": 150, "test_multinode.py": 122,
              "test_plan_real.py": 85, "test_k8s.py": 70, "test_prepare_scale.py": 40, "test_bench.py": 35}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONG_FILES.get(item.path.name, 0))  # stable: order within a file is kept
