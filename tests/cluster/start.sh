#!/usr/bin/env bash
# Bring up a one-node SLURM cluster in DIR: munged + slurmctld + slurmd, as root, without systemd or
# cgroups, on loopback only. Writes DIR/slurm.conf, DIR/env (source it: exports SLURM_CONF) and one
# PID file per daemon in DIR/pids/, then waits (deadline $CLUSTER_TIMEOUT s) until the node is idle.
#   bash tests/cluster/install.sh && bash tests/cluster/start.sh /tmp/cluster
#   . /tmp/cluster/env; sbatch ...; bash tests/cluster/stop.sh /tmp/cluster
# Knobs: SLURMCTLD_PORT (default 16817), SLURMD_PORT (16818), CLUSTER_TIMEOUT (30), NODES (1).
# Non-default ports keep clear of a real slurmctld on the same host.
# NODES=2 emulates a two-node cluster on this one host: a second slurmd (`slurmd -N localhost`) serves a
# node named localhost on SLURMD2_PORT (default SLURMD_PORT + 1), each node offering all of this host's
# CPUs. Node names must resolve to this host, since batch scripts rendezvous at the head node's name:
# the host name and localhost do. Debian's slurm 22.05 refuses two nodes with one NodeHostname ("Duplicated
# NodeHostName"), so each node keeps its own name as its host name.
set -euo pipefail

DIR=${1:?usage: start.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CTLD_PORT=${SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}
TIMEOUT=${CLUSTER_TIMEOUT:-30}
NODES=${NODES:-1}
SLURMD2_PORT=${SLURMD2_PORT:-$((SLURMD_PORT + 1))}
HOST=$(hostname -s)
case "$NODES" in
    1) names=("$HOST") ;;
    2) [ "$HOST" != localhost ] || { echo "start.sh: NODES=2 needs a host name other than localhost" >&2; exit 1; }
       names=("$HOST" localhost) ;;
    *) echo "start.sh: NODES=$NODES is not 1 or 2" >&2; exit 1 ;;
esac

for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { echo "start.sh: $b not found; run tests/cluster/install.sh" >&2; exit 1; }
done
if [ -s "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
    echo "start.sh: a cluster already runs from $DIR (stop it with stop.sh $DIR)" >&2
    exit 1
fi

# munged refuses keys and sockets in folders others can write to: every folder here is 755 or tighter.
chmod 755 "$DIR"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/pids" "$DIR/run"
chmod 755 "$DIR/munge"  # clients (srun, slurmstepd) must reach the socket
chmod 700 "$DIR/state" "$DIR/spool"
if [ ! -s "$DIR/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
fi
chown root:root "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
SOCK=$DIR/munge/munge.socket

# Memory the node offers: 90% of what is there, so slurmd's own check never finds less than declared.
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

cat >"$DIR/slurm.conf" <<CONF
# Written by tests/cluster/start.sh: a one-node test cluster, root everywhere, no cgroups, no accounting.
ClusterName=nanokimi-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$SOCK,cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# Bind to the address the host name resolves to (127.0.0.1 here), not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
# Keep finished jobs visible to 'scontrol show job' for 10 minutes (there is no accounting database).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL when a job is cancelled or times out: room for a final checkpoint.
KillWait=30
InactiveLimit=0
SchedulerType=sched/backfill
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
CONF
if [ "$NODES" = 2 ]; then
    echo "NodeName=localhost NodeAddr=127.0.0.1 Port=$SLURMD2_PORT CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN" \
        >>"$DIR/slurm.conf"
fi
echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$DIR/slurm.conf"

cat >"$DIR/env" <<ENV
export SLURM_CONF=$DIR/slurm.conf
ENV
export SLURM_CONF=$DIR/slurm.conf

# Each daemon runs in the foreground (-F / -D) as our child in the background, so $! is its PID.
munged -F --force --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
    --log-file="$DIR/log/munged.log" --pid-file="$DIR/run/munged.pid" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/munged.out" 2>&1 &
echo $! >"$DIR/pids/munged.pid"

deadline=$((SECONDS + TIMEOUT))
until [ -S "$SOCK" ]; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$(cat "$DIR/pids/munged.pid")" 2>/dev/null; then
        echo "start.sh: munged did not come up; see $DIR/log/munged.log:" >&2
        tail -n 5 "$DIR/log/munged.log" "$DIR/log/munged.out" >&2 || true
        exit 1
    fi
    sleep 0.2
done

slurmctld -D -c -f "$DIR/slurm.conf" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
echo $! >"$DIR/pids/slurmctld.pid"
slurmd -D -c -f "$DIR/slurm.conf" </dev/null >>"$DIR/log/slurmd.out" 2>&1 &
echo $! >"$DIR/pids/slurmd.pid"
daemons=(slurmctld slurmd)
if [ "$NODES" = 2 ]; then
    slurmd -D -c -N localhost -f "$DIR/slurm.conf" </dev/null >>"$DIR/log/slurmd2.out" 2>&1 &
    echo $! >"$DIR/pids/slurmd2.pid"
    daemons+=(slurmd2)
fi

# Poll (not sleep-and-hope) until every node reports idle.
state=""
want=$(printf 'idle %.0s' "${names[@]}")
until [ "$state" = "$want" ]; do
    for d in "${daemons[@]}"; do
        if ! kill -0 "$(cat "$DIR/pids/$d.pid")" 2>/dev/null; then
            echo "start.sh: $d exited; last lines of its logs in $DIR/log/:" >&2
            tail -n 10 "$DIR"/log/slurm*.log "$DIR/log/$d.out" >&2 || true
            exit 1
        fi
    done
    if [ $SECONDS -ge $deadline ]; then
        echo "start.sh: nodes ${names[*]} not all idle after ${TIMEOUT}s (states '${state}'); see $DIR/log/" >&2
        exit 1
    fi
    sleep 0.3
    state=$(for n in "${names[@]}"; do printf '%s ' "$(sinfo -h -n "$n" -o %t 2>/dev/null || true)"; done)
done
echo "cluster: node(s) ${names[*]} idle ($(nproc) CPUs each, ${MEM_MB} MiB); export SLURM_CONF=$DIR/slurm.conf"
