#!/usr/bin/env bash
# Check every Mac of a hostfile before a multi-host run: ssh without a prompt, the same
# Python/MLX/distopt/mpi4py/Open MPI versions, the project folder, IPs and ring ports,
# then the bandwidth between them. Usage: launch/check-hosts.sh HOSTFILE [doctor options]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 HOSTFILE [distopt doctor options]" >&2
  exit 2
fi
hostfile=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
distopt=${DISTOPT:-$here/.venv/bin/distopt}
[ -x "$distopt" ] || distopt=distopt
exec "$distopt" doctor --hostfile "$hostfile" "$@"
