# Sourced by the benchmarks/*_gpu_host.sh scripts, which measure on the lent GPU machine's
# 16 CPU cores after `source .gpu-b/setup.sh`: prints the cores and MLX, and defines
#   run ARGS...   one `distopt launch ARGS`, cut off after $RUN_TIMEOUT s (default 120),
#                 the watchdog's "alive:" heartbeats and the probes' OVERLAP lines left out.
# It also points MLX_MPI_LIBNAME, when unset, at the host's system Open MPI (for the MPI runs).
set -u
export PYTHONUNBUFFERED=1
system_libmpi=$(ls /usr/lib/x86_64-linux-gnu/libmpi.so.40 /usr/lib/x86_64-linux-gnu/openmpi/lib/libmpi.so.40 2>/dev/null | head -1)
if [ -z "${MLX_MPI_LIBNAME:-}" ] && [ -n "$system_libmpi" ]; then export MLX_MPI_LIBNAME=$system_libmpi; fi
nproc; python3 -c "import mlx.core as mx; print(mx.__version__, mx.default_device())"
run() { echo "== $*"; timeout "${RUN_TIMEOUT:-120}" python3 -m distopt.cli launch "$@" 2>&1 | grep -v "alive:\|OVERLAP"; }
