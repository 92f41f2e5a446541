#!/usr/bin/env bash
# Start a Dask scheduler and N single-threaded workers on this machine, for `tilemask run --scheduler`.
#
#   cluster/start-local.sh 2            # scheduler on tcp://127.0.0.1:8786, 2 workers
#   tilemask run workflows/demo_landsat.yaml --scheduler tcp://127.0.0.1:8786
#
# On several machines: run `dask scheduler` on one, `dask worker tcp://SCHEDULER:8786 --nthreads 1`
# on each of the others (one worker per core, or one per GPU), all with tilemask installed and the
# inputs, weights and output folder on a shared file system (the same paths everywhere).
set -euo pipefail
workers=${1:-$(nproc)}
port=${PORT:-8786}
dask scheduler --host 127.0.0.1 --port "$port" &
sleep 3
for i in $(seq "$workers"); do
  dask worker "tcp://127.0.0.1:$port" --nthreads 1 --name "worker-$i" &
done
echo "scheduler: tcp://127.0.0.1:$port ($workers workers); Ctrl-C stops them"
wait
