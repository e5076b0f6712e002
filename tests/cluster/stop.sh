#!/usr/bin/env bash
# Stop the cluster that start.sh brought up in DIR: first its jobs (SIGKILL to every process of every
# job, through slurm: slurmstepd and the job's processes are no children of slurmd), then the daemons
# by the PIDs start.sh recorded, nothing else: slurmd, slurmctld, munged; SIGKILL after a deadline.
#   bash tests/cluster/stop.sh /tmp/cluster
set -uo pipefail

DIR=${1:?usage: stop.sh DIR}
TIMEOUT=${CLUSTER_TIMEOUT:-15}

export SLURM_CONF=$DIR/slurm.conf
if [ -s "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086  # one job id per word
        scancel --full --signal=KILL $jobs 2>/dev/null
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        deadline=$((SECONDS + TIMEOUT))
        while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.3; done
    fi
fi

for d in slurmd2 slurmd slurmctld munged; do  # slurmd2: the second node of NODES=2
    f=$DIR/pids/$d.pid
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        deadline=$((SECONDS + TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $d ($pid) ignored SIGTERM for ${TIMEOUT}s; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$f"
done
echo "cluster: stopped ($DIR)"
