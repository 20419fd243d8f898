#!/usr/bin/env bash
# The GPU path proven and measured in one call, on one GPU machine with no network:
#   (a) installs what the machine lacks from wheels carried in .whl/ (into /tmp/site, on PYTHONPATH),
#   (b) prints the card, driver, versions and the date,
#   (c) runs tests/system/test_gpu.py, then `python -m job.bench` at the ruGPT3small shape,
#   (d) prints ONE table last: test outcomes, the figures the tests measured, the benchmark.
# Budget: under 8 minutes on one H100, each part under `timeout`. Where no GPU is present it stops at
# once with one line (exit 3). Exit 0: all passed; 1: a test or a bench variant failed; 2: setup failed.
#
# Make the wheels here, once, on a machine with PyPI (repo root; /.whl/ is git-ignored), with the exact
# versions of requirements.lock / requirements-test.lock (about 8 MB in all):
#   DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
#     deepspeed==0.19.8 -w .whl        # pure Python, ops JIT-built on first use (none is used by ftjob)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 accelerate==1.15.0 \
#     pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0 Pygments==2.21.0 packaging==26.4
# The GPU machines seen so far have Python 3.12 with a CUDA torch, transformers, tokenizers, numpy, pandas,
# scikit-learn, matplotlib, pyyaml, safetensors (datasets is not needed: ftjob does not import it).
# Which wheels get installed there: deepspeed always; packaging and Pygments only where missing; the pytest
# family only where the machine has no pytest (so its own plugins stay consistent); the others where the
# machine lacks them or has an older version (pydantic 2.14 needs typing_extensions >= 4.16).
#
# Run it on the lent GPU machine (device tool), carrying the wheels:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Environment knobs: PARTS (tests,bench), TOTAL_S / TESTS_S / BENCH_S (time limits), ONLY, WARMUP, STEPS (bench).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests,bench}
TOTAL_S=${TOTAL_S:-465}  # the whole script, table included; the parts below shrink to fit it
TESTS_S=${TESTS_S:-270}
BENCH_S=${BENCH_S:-150}
ONLY=${ONLY:-hf_trainer_original,ftjob_original,ftjob_b64,ftjob_b64_zero0,ftjob_b1024,ftjob_b64_compile}
WARMUP=${WARMUP:-5}
STEPS=${STEPS:-15}
T0=$(date +%s)

die() { echo "gpu_check: $2" >&2; exit "$1"; }
left() { echo $(( TOTAL_S - ($(date +%s) - T0) - $1 )); }  # seconds left, keeping $1 in reserve

# ---- no GPU: one line, non-zero, before anything is installed or started
command -v nvidia-smi >/dev/null 2>&1 || die 3 "no GPU here: nvidia-smi not found (run this on a GPU machine, with .whl carried)"
timeout 30 nvidia-smi -L 2>/dev/null | grep -q '^GPU' || die 3 "no GPU here: nvidia-smi lists no device"
command -v "$PY" >/dev/null 2>&1 || die 2 "no $PY on PATH (set PYTHON=...)"
timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 \
  || die 3 "no usable GPU: torch.cuda.is_available() is False for $PY"
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"

# ---- (a) install what this machine lacks, from the carried wheels, into /tmp/site
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 60 "$PY" - .whl >"/tmp/gpu_check_wheels.txt" <<'EOF' || die 2 "could not read .whl/ with $PY"
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # plain release numbers compare well enough as tuples
    def Version(v):
        return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))

ALWAYS = {"deepspeed"}                                      # the lock's version, whatever the machine has
PYTEST = {"pytest", "pluggy", "iniconfig", "pytest-timeout"}  # all or none, with the machine's plugins in mind
IF_MISSING = {"packaging", "pygments"}                      # widely shared: never shadow the machine's own

def have(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

machine_pytest = have("pytest")
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    dist = name.lower().replace("_", "-")
    current = have(dist)
    if dist in ALWAYS:
        use = True
    elif dist in PYTEST:
        use = machine_pytest is None or (dist == "pytest-timeout" and current is None)
    elif dist in IF_MISSING:
        use = current is None
    else:
        use = current is None or Version(current) < Version(version)
    print(f"{'install' if use else 'keep   '} {dist} {version} (machine: {current or 'none'})", file=sys.stderr)
    if use:
        print(wheel)
EOF
  mapfile -t WHEELS <"/tmp/gpu_check_wheels.txt"
  if [ "${#WHEELS[@]}" -gt 0 ]; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${WHEELS[@]}" >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; die 2 "pip install from .whl/ failed"; }
  fi
else
  echo "gpu_check: no .whl/ (carry it: see the header); using what the machine has" >&2
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=9.0  # the image's "9.0a" breaks DeepSpeed's op builder (int('0a'))
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 FTJOB_PROGRESS=log TOKENIZERS_PARALLELISM=false
export FTJOB_GPU_REPORT="$OUT/test_gpu_figures.jsonl" FTJOB_GPU_PIDFILE=/tmp/gpu_check_pids.txt
rm -f "$FTJOB_GPU_REPORT" "$FTJOB_GPU_PIDFILE"

# ---- (b) what this is, and can ftjob import everything it needs
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "gpu: $(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  timeout 90 "$PY" - <<'EOF'
import platform, torch, transformers, deepspeed, pydantic
import job.cli, job.pipeline, job.train.worker, job.bench  # every module `ftjob run` and the bench load
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, pydantic {pydantic.__version__}")
try:
    import pytest
    print(f"pytest {pytest.__version__}")
except ImportError:
    print("pytest: missing")
EOF
} 2>&1 | tee "$OUT/versions.txt"
grep -q '^python ' "$OUT/versions.txt" || die 2 "ftjob or its dependencies do not import (see above); add the missing wheels to .whl/"

# ---- (c) the tests, then the benchmark
TEST_RC=-
if [[ $PARTS == *tests* ]]; then
  (( $(left 60) < TESTS_S )) && TESTS_S=$(( $(left 60) > 30 ? $(left 60) : 30 ))
  echo "== tests/system/test_gpu.py (limit ${TESTS_S}s)"
  timeout -k 15 "$TESTS_S" "$PY" -m pytest tests/system/test_gpu.py -p no:cacheprovider -s -v -rfEs --tb=short \
    --junitxml="$OUT/test_gpu.xml" >"$OUT/pytest.log" 2>&1
  TEST_RC=$?
  if [[ $TEST_RC == 124 || $TEST_RC == 137 ]] && [ -s "$FTJOB_GPU_PIDFILE" ]; then
    # The test's `ftjob run`s have their own process groups (so a test can end one whole): end those
    # groups, which the timeout did not reach, before the benchmark needs the GPU to itself.
    while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null; done <"$FTJOB_GPU_PIDFILE"
  fi
  tail -n 40 "$OUT/pytest.log"
fi
BENCH_RC=-
if [[ $PARTS == *bench* ]] && (( $(left 20) < 30 )); then
  echo "== bench skipped: no time left within TOTAL_S=${TOTAL_S}s"
elif [[ $PARTS == *bench* ]]; then
  (( $(left 20) < BENCH_S )) && BENCH_S=$(left 20)
  echo "== python -m job.bench --only $ONLY --warmup $WARMUP --steps $STEPS (limit ${BENCH_S}s)"
  timeout -k 15 "$BENCH_S" "$PY" -m job.bench --only "$ONLY" --warmup "$WARMUP" --steps "$STEPS" \
    --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
  BENCH_RC=$?
  tail -n 5 "$OUT/bench.log"
fi

# ---- (d) one table, last
"$PY" - "$OUT" "$TEST_RC" "$BENCH_RC" "$(( $(date +%s) - T0 ))" "$ONLY" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, test_rc, bench_rc, wall, only = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
print("\n" + "=" * 100)
print((out / "versions.txt").read_text().strip() if (out / "versions.txt").exists() else "")
if test_rc != "-":
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failed = []
    try:
        for case in ET.parse(out / "test_gpu.xml").getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            counts["failed" if kind == "failure" else kind] += 1
            if kind in ("failure", "error"):
                msg = next(c for c in case if c.tag == kind).get("message", "")
                failed.append(f"  {kind.upper()} {case.get('name')}: {msg.splitlines()[0][:150] if msg else ''}")
    except (OSError, ET.ParseError):  # killed before its report: count the verbose lines it printed
        failed.append("  no junit report: pytest did not finish (timeout or crash); outcomes read from pytest.log")
        log = out / "pytest.log"
        for line in (log.read_text(errors="replace").splitlines() if log.exists() else []):
            if line.startswith("tests/system/test_gpu.py::"):
                for word, kind in ((" PASSED", "passed"), (" FAILED", "failed"), (" ERROR", "error"), (" SKIPPED", "skipped")):
                    if word in line:
                        counts[kind] += 1
                        if kind in ("failed", "error"):
                            failed.append("  " + line.split(" ")[0])
                        break
    note = " (killed at its time limit)" if test_rc in ("124", "137") else ""
    print(f"\ntests/system/test_gpu.py: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['error']} errors, {counts['skipped']} skipped; exit {test_rc}{note}")
    if failed:
        print("\n".join(failed))
    figures = out / "test_gpu_figures.jsonl"
    rows = [json.loads(l) for l in figures.read_text().splitlines()] if figures.exists() else []
    for r in rows:
        t = r.get("test")
        try:
            if t == "small_runs":
                print(f"  small runs: {r['attempts']} concurrent `ftjob run` attempts in {r['wall_s']} s")
            elif t == "small_run":
                print(f"  {r['case']:<11} eval {r['eval_before']:.3f} -> {r['eval_after']:.3f}; final/ with transformers "
                      f"{r['exported_valid_loss']:.4f} (rel diff {r['export_rel_diff']:.1e}), loads as {','.join(r['param_dtypes'])}")
            elif t == "resume":
                print(f"  resume: stopped at {r['stopped_at']}, compared through {r['compared_through']}; max rel loss diff "
                      f"{r['max_rel_diff_before_stop']:.1e} before the stop, {r['max_rel_diff_after_resume']:.1e} after (tolerance {r['tolerance']:.0e})")
            elif t == "loss_scale":
                s = r["resumed_run"]
                print(f"  loss scale (fp16 ZeRO-1, resumed run): {s[0]:g} -> {s[-1]:g}, overflow forced in step {r['second_overflow_step']}")
            elif t == "diverge":
                s = [x for x in r["loss_scales"] if x is not None]
                print(f"  divergence run: exit {r['exit']} after {r['steps_logged']} logged steps, loss scale {s[0] if s else '-'} -> {s[-1] if s else '-'}")
            elif t == "rugpt3small":
                mfu = f"{100 * r['mfu'][-1]:.1f}%" if r["mfu"][-1] is not None else "-"
                print(f"  ruGPT3small shape, {r['optimizer']:<9} (64x2x64, fp16, ZeRO-1, last 10 steps): "
                      f"{r['tokens_per_s'][-1]:,.0f} tokens/s, MFU {mfu}, peak {r['peak_mem_gib']} GiB, run {r['wall_s']} s")
        except (KeyError, IndexError, TypeError, ValueError):
            print("  " + json.dumps(r))
if bench_rc != "-":
    results = []
    log = out / "bench.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    done = {r.get("variant") or r.get("failed") for r in results} | {"data" if k == "data_path" else k for r in results for k in r}
    note = " (killed at its time limit)" if bench_rc in ("124", "137") else ""
    print(f"\nbench (synthetic tokens, one process; exit {bench_rc}{note})")
    base = next((r["tokens_per_s"] for r in results if r.get("variant") == "hf_trainer_original"), None)
    print(f"  {'variant':<22} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs HF':>6} {'batch':>7}")
    for r in results:
        if "failed" in r:
            last = (r.get("stderr") or "").strip().splitlines()[-1:] or [""]
            print(f"  {r['failed']:<22} FAILED (exit {r.get('rc')}): {last[0][:120]}")
            continue
        if "variant" not in r:  # loader / data path / checkpoint figures: in bench.log
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"  {r['variant']:<22} {r['tokens_per_s']:>10,} {mfu:>6} {str(r.get('peak_mem_gib') or '-'):>9} {ratio:>6} {r.get('batch', ''):>7}")
    for name in only.split(","):
        if name and name not in done:
            print(f"  {name:<22} not measured (time limit)")
ok = test_rc in ("0", "-") and bench_rc in ("0", "-") and not (test_rc != "-" and counts["skipped"])
if test_rc != "-" and counts["skipped"]:
    print("  tests were skipped on a machine with a GPU: that counts as a failure here")
print(f"\ngpu_check: {'PASS' if ok else 'FAIL'}, {wall} s in all; logs in {out}")
sys.exit(0 if ok else 1)
EOF
