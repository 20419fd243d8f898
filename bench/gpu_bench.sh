#!/usr/bin/env bash
# The benchmark alone on the lent GPU machine: bench/gpu_check.sh without the tests, with longer runs per
# variant. Same wheels, same call (device tool: carry [".whl"], timeout_s 600); see gpu_check.sh's header.
exec env PARTS=bench TOTAL_S="${TOTAL_S:-540}" BENCH_S="${BENCH_S:-500}" WARMUP="${WARMUP:-10}" STEPS="${STEPS:-40}" \
  bash "$(dirname "$0")/gpu_check.sh" "$@"
