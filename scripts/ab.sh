#!/usr/bin/env bash
# One command, this tree against a base tree, alternating runs in one machine call (the lent machine's host
# time drifts between runs). On a GPU machine, from the repo root:
#   mkdir -p .ab/base && git archive <base-commit> deep_ep | tar -x -C .ab/base   (here, once; .ab/ is ignored:
#                                                                                 carry it to the device)
#   bash scripts/ab.sh .ab/base NAME RUNS CMD...    -> $OUT/NAME_{base,new}_{1..RUNS}.txt, tails printed
# e.g. bash scripts/ab.sh .ab/base host 3 python -m deep_ep.tools host-breakdown 1024 2048
#      bash scripts/ab.sh .ab/base ll 2 python -m deep_ep bench --mode low-latency --world-size 1 --backend nvlink
# Each run takes deep_ep from its own tree (python -m puts the working directory first). A base from before
# the tools package gets this tree's measuring code linked in (deep_ep/tools, and the launch and timing helpers
# of deep_ep/bench they use; timing.py only adds to older ones), so that the same tool measures both trees.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BASE=$1; NAME=$2; RUNS=$3; shift 3
OUT=${OUT:-/tmp/deep_ep_out}; mkdir -p "$OUT"
ROOT=$PWD
case $BASE in /*) ;; *) BASE=$ROOT/$BASE ;; esac
if [ ! -e "$BASE/deep_ep/tools" ]; then
  ln -s "$ROOT/deep_ep/tools" "$BASE/deep_ep/tools"
  for f in launch.py timing.py; do
    cmp -s "$ROOT/deep_ep/bench/$f" "$BASE/deep_ep/bench/$f" || ln -sf "$ROOT/deep_ep/bench/$f" "$BASE/deep_ep/bench/$f"
  done
fi
for i in $(seq 1 "$RUNS"); do
  for v in base new; do
    if [ $v = base ]; then P=$BASE; else P=$ROOT; fi
    (cd "$P" && PYTHONPATH=$P "$@") > "$OUT/${NAME}_${v}_$i.txt" 2>&1
    echo "== $NAME $v run $i rc=$?"; grep -E "us (host|GPU)|^nvlink|dispatch|combine" "$OUT/${NAME}_${v}_$i.txt" | grep -v "^\s*$" | tail -8
  done
done
