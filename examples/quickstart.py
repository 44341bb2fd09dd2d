# Run: torchrun --nproc-per-node 2 examples/quickstart.py   (CPU with gloo, or one GPU per rank with NCCL)
import sys

import torch
import torch.distributed as dist

import deep_ep

try:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
except ValueError:  # started without torchrun: no RANK, WORLD_SIZE, MASTER_ADDR to meet the other ranks
    sys.exit(f"{sys.argv[0]} runs as 2 ranks; start it with:  torchrun --nproc-per-node 2 {sys.argv[0]}")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
if dev.type == "cuda":
    torch.cuda.set_device(dev)
buffer = deep_ep.Buffer(dist.group.WORLD)  # backend='auto'
num_experts, hidden, topk = 8 * world, 256, 2
x = torch.randn(128, hidden, dtype=torch.bfloat16, device=dev)
topk_weights, topk_idx = torch.randn(128, num_experts, device=dev).softmax(-1).topk(topk, dim=-1)
per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
    x,
    num_tokens_per_rank=per_rank,
    is_token_in_rank=in_rank,
    num_tokens_per_expert=per_expert,
    topk_idx=topk_idx,
    topk_weights=topk_weights,
)
y = recv_x * recv_w.sum(-1, keepdim=True).to(recv_x.dtype)  # your local experts go here (weights applied)
out, _, _ = buffer.combine(y, handle)  # summed over ranks, back in token order
torch.testing.assert_close(out.float(), x.float() * topk_weights.sum(-1, keepdim=True), atol=3e-2, rtol=3e-2)
print(f"rank {rank}: got {recv_x.shape[0]} tokens, {counts} per local expert; combine OK")
dist.destroy_process_group()
