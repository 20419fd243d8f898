"""The import directions of docs/architecture.md, read from the code: every `import` and `from ... import`
of every module in job/ (function-level ones too) must be allowed for its layer. Training never imports
the report, the status or the orchestrator; reading a run's files (status, report) never imports torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "job"

# module (or package prefix ending in ".") -> the job modules it may import. Mirrors docs/architecture.md.
BASE = {"job.errors", "job.humanize"}
FILES = BASE | {"job.rundir"}
ALLOWED = {
    "job.errors": set(),
    "job.humanize": set(),
    "job.faults": set(),
    "job.logs": set(),
    "job.families": set(),
    "job.cache": set(),
    "job.architecture": {"job.families", "job.cache"},
    "job.progress": {"job.humanize"},
    "job.spec": {"job.errors"},
    "job.rundir": {"job.errors"},
    "job.pretrained": {"job.errors", "job.families", "job.cache"},
    "job.plan": {"job.errors", "job.architecture"},
    "job.status": FILES,
    "job.report": FILES,
    "job.generate": {"job.rundir", "job.spec"},
    "job.cluster": FILES | {"job.spec"},
    "job.demo": {"job.rundir"},
    "job.data": set(),
    "job.train": set(),
    "job.data.": FILES | {"job.spec", "job.progress", "job.pretrained", "job.families", "job.data"},
    "job.train.": FILES | {"job.spec", "job.progress", "job.logs", "job.faults", "job.pretrained", "job.architecture",
                           "job.generate", "job.cluster", "job.data", "job.train"},
    "job.bench": FILES | {"job.spec", "job.architecture", "job.data", "job.train", "job.demo"},
    "job.pipeline": FILES | {"job.spec", "job.logs", "job.progress", "job.pretrained", "job.architecture",
                             "job.cluster", "job.data", "job.train", "job.generate", "job.report", "job.status",
                             "job.plan", "job.demo"},
    "job.smoke": FILES | {"job.spec", "job.logs", "job.pretrained", "job.pipeline"},
    "job.cli": {"job", "job.errors", "job.logs", "job.pipeline", "job.smoke", "job.bench"},
    "job": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(JOB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def job_imports(path: Path) -> set[str]:
    """The job modules `path` imports, relative imports resolved, at any depth in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "job"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "job":
                continue
            # `from . import errors` imports the module job.errors; `from .errors import X` imports job.errors.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _is_module(candidate) else target)
    return found - {name}


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (JOB / rel).with_suffix(".py").exists() or (JOB / rel / "__init__.py").exists()


def rule_for(name: str) -> set[str]:
    if name in ALLOWED:
        return ALLOWED[name]
    prefix = max((p for p in ALLOWED if p.endswith(".") and name.startswith(p)), key=len, default=None)
    assert prefix, f"{name} has no import rule: add it to docs/architecture.md and this test"
    return ALLOWED[prefix]


def allowed(target: str, rule: set[str]) -> bool:
    return any(target == r or target.startswith(r + ".") for r in rule)


MODULES = sorted(JOB.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_layers(path):
    name = module_name(path)
    bad = sorted(t for t in job_imports(path) if not allowed(t, rule_for(name)))
    assert not bad, f"{name} imports {bad}, which docs/architecture.md does not allow"


def test_the_import_reader_sees_relative_and_nested_imports(tmp_path):
    """The checker itself, on code whose imports are known: it must not pass by seeing nothing."""
    assert job_imports(JOB / "train" / "worker.py") >= {"job.errors", "job.faults", "job.rundir", "job.generate",
                                                        "job.train.checkpoint", "job.data.schedule"}
    assert "job.report" in job_imports(JOB / "pipeline.py")  # imported inside a function
    assert not allowed("job.report", ALLOWED["job.train."]) and allowed("job.data.shards", ALLOWED["job.data."])


def test_every_module_has_a_rule():
    for path in MODULES:
        rule_for(module_name(path))


def test_status_imports_no_torch(tmp_path):
    """`ftjob status` on a login node reads files only: no torch, DeepSpeed or transformers import."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"stage": "train", "step": 3}')
    code = ("import sys; from job.cli import main\n"
            "try:\n    main(['status', sys.argv[1]])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'numpy', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "stage:" in out.stdout and "HEAVY []" in out.stdout, out.stdout
