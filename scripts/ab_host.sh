#!/usr/bin/env bash
# Host (and graph-replayed GPU) time of the nvlink device path, this tree against a base tree, alternating
# runs in one call (this machine's host time drifts between runs): on a GPU machine, from the repo root,
#   git archive <base-commit> deep_ep | tar -x -C .ab/base    (once, here; .ab/ is ignored; carry it)
#   bash scripts/ab_host.sh [.ab/base]        -> $OUT/host_{base,new}_{1,2,3}.txt and a summary
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BASE=${1:-.ab/base}
OUT=${OUT:-/tmp/deep_ep_out}; mkdir -p "$OUT"
for i in 1 2 3; do
  for v in base new; do
    if [ $v = base ]; then P=$PWD/$BASE; else P=$PWD; fi
    PYTHONPATH=$P python scripts/host_breakdown.py 1024 2048 > "$OUT/host_${v}_$i.txt" 2>&1
    echo "== $v run $i rc=$?"; grep -E "us (host|GPU)" "$OUT/host_${v}_$i.txt" | grep -E "fresh|combine|cached|layout|graph"
  done
done
