#!/usr/bin/env bash
# One GPU-machine call for the fused nvlink path (issue 21): its GPU tests (ranks sharing the GPU when
# there is one), the kernels' GPU tests, and host time per call of both paths. Results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/deep_ep_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1; head -2 "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 2 ]; then export DEEP_EP_TEST_SHARE_GPU=${DEEP_EP_TEST_SHARE_GPU:-2}; fi
timeout ${HT_TIMEOUT:-120} python3 -m deep_ep.tools host-time --world 1 --json "$OUT/host_time_w1.json" > "$OUT/host_time_w1.txt" 2>&1
echo "host-time world=1 rc=$?"; tail -14 "$OUT/host_time_w1.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -m "gpu or kernels" -x -q -p no:cacheprovider tests/test_fused.py tests/test_kernels.py tests/test_fused_kernels.py ${K:+-k "$K"} > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?"; tail -30 "$OUT/gpu_tests.txt"
if [ -n "${W2:-}" ]; then  # 2 ranks (sharing the GPU when there is one: waits not representative)
  timeout ${HT_TIMEOUT:-120} python3 -m deep_ep.tools host-time --world 2 --repeats 3 --json "$OUT/host_time_w2.json" \
    > "$OUT/host_time_w2.txt" 2>&1
  echo "host-time world=2 rc=$?"; tail -14 "$OUT/host_time_w2.txt"
fi
