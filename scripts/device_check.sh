#!/usr/bin/env bash
# Everything one GPU-machine call needs: versions, GPU tests, the benchmark and any measurement tools,
# results under $OUT. Run from the repository root on a GPU machine:
#   bash scripts/device_check.sh [pytest -k expr]
# (>= 2 GPUs for the benchmarks; on one GPU the multi-rank tests share it, DEEP_EP_TEST_SHARE_GPU=4)
# Switches (environment): SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS, SWEEPS, LL=1, DECODE=1, DEMO=1, TOOLS (below),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds, default 420 each).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/deep_ep_out}; mkdir -p "$OUT"
STAMP=$(date +%Y-%m-%d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } > "$OUT/gpus.txt" 2>&1
head -3 "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
python3 -m deep_ep info > "$OUT/info.txt" 2>&1; tail -15 "$OUT/info.txt"
K=${1:-}
# With fewer than 2 GPUs the multi-rank tests run with ranks sharing the GPU (README, Tests), unless set
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 2 ] && [ -z "${DEEP_EP_TEST_SHARE_GPU+x}" ]; then export DEEP_EP_TEST_SHARE_GPU=4; fi
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -m gpu tests -p no:cacheprovider ${K:+-k "$K"} > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; tail -25 "$OUT/gpu_tests.txt"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m deep_ep bench --no-progress --json "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.txt" 2>&1
  echo "bench rc=$?"; tail -30 "$OUT/bench.txt"
fi
# More bench runs, one per ';'-separated argument list, leading VAR=value words set the environment:
# SWEEPS="--sweep --backend nvlink;DEEP_EP_NVLINK_DISPATCH=push --backend nvlink --no-baselines"
i=0
IFS=';' read -ra RUNS <<< "${SWEEPS:-}"
for args in "${RUNS[@]}"; do
  i=$((i + 1))
  envs=(); rest=()
  for w in $args; do if [[ ${#rest[@]} -eq 0 && "$w" == *=* ]]; then envs+=("$w"); else rest+=("$w"); fi; done
  timeout ${BENCH_TIMEOUT:-420} env "${envs[@]}" python3 -m deep_ep bench --no-progress --json "$OUT/bench$i.json" \
    "${rest[@]}" > "$OUT/bench$i.txt" 2>&1
  echo "bench $i ($args) rc=$?"; tail -22 "$OUT/bench$i.txt"
done
# The low-latency benchmark, the decode benchmark and the demo (LL=1, DECODE=1, DEMO=1), results under $OUT
if [ -n "${LL:-}" ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m deep_ep bench --mode low-latency --no-progress --json "$OUT/low_latency.json" \
    > "$OUT/low_latency.txt" 2>&1
  echo "low-latency bench rc=$?"; tail -12 "$OUT/low_latency.txt"
fi
if [ -n "${DECODE:-}" ]; then     # ExpertParallelMoE.decode, 1 and 2 micro-batches, on every GPU
  timeout ${BENCH_TIMEOUT:-420} torchrun --nproc-per-node "${NGPU:-1}" benchmarks/bench_decode.py \
    --json "$OUT/decode.json" ${DECODE_ARGS:-} > "$OUT/decode.txt" 2>&1
  echo "decode bench rc=$?"; grep -v "^W" "$OUT/decode.txt" | tail -8
fi
if [ -n "${DEMO:-}" ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m deep_ep demo --no-progress ${DEMO_ARGS:-} --json "$OUT/demo.json" \
    --png "$OUT/demo.png" > "$OUT/demo.txt" 2>&1
  echo "demo rc=$?"; tail -8 "$OUT/demo.txt"
fi
# Measurement tools (deep_ep/tools, `python -m deep_ep.tools` lists them), one per ';'-separated entry, each
# a tool name and its arguments, output in $OUT/tool_<name>.txt:
# TOOLS="call-profile --out $OUT;ll-probe 128;host-breakdown 1024 2048;share-gpu 4"
IFS=';' read -ra TOOL_RUNS <<< "${TOOLS:-}"
for entry in "${TOOL_RUNS[@]}"; do
  read -ra words <<< "$entry"
  [ ${#words[@]} -eq 0 ] && continue
  timeout ${BENCH_TIMEOUT:-420} python3 -m deep_ep.tools "${words[@]}" > "$OUT/tool_${words[0]}.txt" 2>&1
  echo "tool ${words[0]} rc=$?"; grep -v "^USDT\|^W[0-9]" "$OUT/tool_${words[0]}.txt" | tail -15
done
