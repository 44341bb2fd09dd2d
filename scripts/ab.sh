#!/usr/bin/env bash
# One command, this tree against a base tree, alternating runs in one machine call (the lent machine's host
# time drifts between runs). On a GPU machine, from the repo root:
#   mkdir -p .ab/base && git archive <base-commit> deep_ep | tar -x -C .ab/base   (here, once; .ab/ is ignored:
#                                                                                 carry it to the device)
#   bash scripts/ab.sh .ab/base NAME RUNS CMD...    -> $OUT/NAME_{base,new}_{1..RUNS}.txt, tails printed
# e.g. bash scripts/ab.sh .ab/base host 3 python scripts/host_breakdown.py 1024 2048
#      bash scripts/ab.sh .ab/base ll 2 python -m deep_ep bench --mode low-latency --world-size 1 --backend nvlink
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BASE=$1; NAME=$2; RUNS=$3; shift 3
OUT=${OUT:-/tmp/deep_ep_out}; mkdir -p "$OUT"
ROOT=$PWD
[ -e "$BASE/scripts" ] || ln -s "$ROOT/scripts" "$BASE/scripts"     # (the base runs in its own root: python -m
for i in $(seq 1 "$RUNS"); do                                        #  and scripts put their own folder first)
  for v in base new; do
    if [ $v = base ]; then P=$ROOT/$BASE; else P=$ROOT; fi
    (cd "$P" && PYTHONPATH=$P "$@") > "$OUT/${NAME}_${v}_$i.txt" 2>&1
    echo "== $NAME $v run $i rc=$?"; grep -E "us (host|GPU)|^nvlink|dispatch|combine" "$OUT/${NAME}_${v}_$i.txt" | grep -v "^\s*$" | tail -8
  done
done
