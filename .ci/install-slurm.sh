#!/usr/bin/env bash
# Install a real Slurm (Debian's 22.05 packages) plus munge, so tests/system/test_slurm.py can start a
# one-node cluster with tests/system/slurm_harness.py. Idempotent: does nothing when sbatch is already on PATH.
# The packages' own services are not used (no systemd in CI); the harness starts the daemons itself.
set -euo pipefail
# The daemons live in /usr/sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

if command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1; then
    echo "install-slurm: Slurm already installed ($(slurmctld -V))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# slurmctld -V, because client commands need a slurm.conf even for --version.
echo "install-slurm: installed $(slurmctld -V)"
