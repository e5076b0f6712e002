#!/usr/bin/env bash
# Install the Debian packages for the one-node test cluster (SLURM 22.05 on bookworm + MUNGE).
# Idempotent: does nothing when the binaries are already there. Needs root (CI runs as root).
#   bash tests/cluster/install.sh
set -euo pipefail

need=(munged slurmctld slurmd sbatch srun scontrol squeue scancel)
missing=()
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "cluster: slurm and munge already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "cluster: missing ${missing[*]} and not root: install slurm-wlm slurmctld slurmd slurm-client munge by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps it to the daemons and clients (no docs, no mail server).
apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
echo "cluster: installed $(dpkg-query -W -f="slurm-client \${Version}" slurm-client)"
