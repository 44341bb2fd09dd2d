"""Expert parallelism for Hugging Face MoE models: :func:`patch_moe_model` (docs/api.md, deep_ep.integrations).

How it plugs in. In transformers 5.x every supported MoE block is a router
followed by an *experts module* (``MixtralExperts``, ``Qwen3MoeExperts``,
``GptOssExperts``, ...) that is called as ``experts(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`` and whose weights are
3-D tensors with the expert index first. Its forward goes through
transformers' experts-implementation registry (``eager``, ``grouped_mm``,
``batched_mm``, ...). The patch leaves the block, its router and its shared
experts untouched, and changes only the experts module, the way transformers'
own expert parallelism does (a forward installed on the experts module):

1. the expert-dim parameters keep this rank's slice ``r*L .. (r+1)*L-1`` (the
   full tensors are released) and ``num_experts`` becomes ``L``;
2. its forward dispatches the tokens to the ranks of their experts
   (:func:`deep_ep.ops.dispatch`, one copy of a token per rank), runs the
   module's *own* forward (whatever experts implementation the config names:
   the model's gate/up layout, activation, GPT-OSS clamp and biases) on the
   received (token, local expert) pairs with their routing weights, and
   combines the weighted outputs back (:func:`deep_ep.ops.combine`).

The router's output reaches the experts through the differentiable dispatch,
so the router, the experts and everything before them get the same gradients
as in the unpatched model. With ``use_deep_ep=False`` the same happens over a
plain :func:`torch.distributed.all_to_all_single` (one row per (token,
expert) pair, no deduplication), for A/B comparisons.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..buffer import Buffer
from ..errors import DeepEPError
from ..settings import Settings
from ..waiting import agree_verdicts

log = logging.getLogger("deep_ep")

__all__ = [
    "patch_moe_model",
    "UnsupportedMoEError",
    "EPInfo",
    "SUPPORTED_FAMILIES",
    "expert_parameters",
    "deep_ep_experts",
    "average_gradients",
]

#: MoE block classes known to work, by family (tested on CPU against the unpatched model).
#: Any other block whose ``experts`` module follows the transformers experts interface works the same way.
SUPPORTED_FAMILIES: Dict[str, str] = {
    "MixtralSparseMoeBlock": "Mixtral",
    "Qwen2MoeSparseMoeBlock": "Qwen2-MoE",
    "Qwen3MoeSparseMoeBlock": "Qwen3-MoE",
    "DeepseekV3MoE": "DeepSeek-V3",
    "OlmoeSparseMoeBlock": "OLMoE",
    "GptOssMLP": "GPT-OSS",
}

#: MoE blocks that cannot be expert-parallelised this way, with the reason.
_KNOWN_UNSUPPORTED: Dict[str, str] = {
    "Llama4TextMoe": "its experts run densely on router-scaled copies of every token (no top-k index reaches them)",
}


class UnsupportedMoEError(DeepEPError, TypeError):
    """A model (or one of its MoE blocks) that :func:`patch_moe_model` cannot expert-parallelise.

    The message names the module's class and its path in the model.
    """


@dataclass
class EPInfo:
    """What :func:`patch_moe_model` did, stored on the model as ``model.deep_ep_info``.

    ``group`` the expert-parallel process group, ``rank`` / ``size`` this
    rank's index in it and its size, ``num_local_experts`` per block path,
    ``blocks`` the patched MoE blocks' paths and ``families`` their family
    names, ``use_deep_ep`` which path moves the tokens, ``buffer`` the
    :class:`deep_ep.Buffer` (``None`` for the plain path), ``replica_group``
    the ranks holding the same experts as this one (one per EP group; ``None``
    when the EP group is the whole world or was passed explicitly).
    """

    group: Any
    rank: int
    size: int
    use_deep_ep: bool
    buffer: Optional[Buffer]
    replica_group: Any = None
    blocks: List[str] = field(default_factory=list)
    families: List[str] = field(default_factory=list)
    num_local_experts: Dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- discovery


def _follows_experts_interface(experts: nn.Module) -> Optional[str]:
    """``None`` when ``experts`` follows the transformers experts interface, else why not."""
    E = getattr(experts, "num_experts", None)
    if not isinstance(E, int) or E <= 0:
        return "it has no integer num_experts"
    if not hasattr(experts, "is_transposed"):
        return "its class is not declared with transformers' @use_experts_implementation"
    try:
        params = list(inspect.signature(type(experts).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in positional):
        return "its forward does not take (hidden_states, top_k_index, top_k_weights)"
    if not _expert_tensors(experts, E):
        return f"none of its parameters has the expert dimension ({E}) first"
    return None


def _expert_tensors(experts: nn.Module, num_experts: int) -> List[Tuple[str, bool]]:
    """Names of the experts module's own parameters / buffers whose first dimension is the expert index."""

    def first_dim(t: torch.Tensor) -> int:
        # A DTensor (transformers' own expert parallelism) counts its local shard.
        return t.to_local().size(0) if hasattr(t, "to_local") else t.size(0)

    out = []
    for name, p in experts._parameters.items():
        if p is not None and p.dim() >= 1 and first_dim(p) == num_experts:
            out.append((name, True))
    for name, b in experts._buffers.items():
        if b is not None and b.dim() >= 1 and first_dim(b) == num_experts:
            out.append((name, False))
    return out


def _find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """Every ``(path, block, experts)`` of the model; raises :class:`UnsupportedMoEError` on a block it cannot patch."""
    found = []
    for path, module in model.named_modules():
        cls = type(module).__name__
        if cls in _KNOWN_UNSUPPORTED:
            raise UnsupportedMoEError(
                f"patch_moe_model does not support {cls} (at '{path}'): {_KNOWN_UNSUPPORTED[cls]}"
            )
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        if getattr(experts, "_deep_ep_state", None) is not None:
            raise UnsupportedMoEError(f"{cls} at '{path}' is already patched by patch_moe_model")
        why = _follows_experts_interface(experts)
        if why is not None:
            hint = (
                " (transformers >= 5 stores experts as one fused module; 4.x ModuleList experts are not supported)"
                if isinstance(experts, nn.ModuleList)
                else ""
            )
            raise UnsupportedMoEError(
                f"patch_moe_model does not support {cls} (at '{path}'): its experts "
                f"{type(experts).__name__} cannot be sharded because {why}{hint}"
            )
        found.append((path, module, experts))
    return found


# ---------------------------------------------------------------------------- groups and buffers

_ep_groups: Dict[Tuple[int, int], Any] = {}
_buffers: Dict[Tuple[Any, ...], Buffer] = {}


def _resolve_group(num_gpus: Optional[int], group: Any) -> Any:
    """The expert-parallel group of this rank: ``group``, the world, or one of ``world // num_gpus`` groups."""
    if not dist.is_available() or not dist.is_initialized():
        raise DeepEPError(
            "patch_moe_model needs torch.distributed initialised "
            "(torch.distributed.init_process_group(...), e.g. under torchrun)"
        )
    if group is not None:
        if num_gpus is not None and num_gpus != dist.get_world_size(group):
            raise ValueError(
                f"num_gpus={num_gpus} disagrees with the size of the given group ({dist.get_world_size(group)})"
            )
        return group
    world, rank = dist.get_world_size(), dist.get_rank()
    n = world if num_gpus is None else num_gpus
    if not isinstance(n, int) or n <= 0 or world % n != 0:
        raise ValueError(f"num_gpus must be a positive divisor of the world size {world}, got {num_gpus!r}")
    if n == world:
        return dist.group.WORLD
    key = (world, n)
    if key not in _ep_groups:
        # new_group is collective over the world: every rank creates every group, in the same order.
        groups = [dist.new_group(list(range(g * n, (g + 1) * n))) for g in range(world // n)]
        replicas = [dist.new_group(list(range(i, world, n))) for i in range(n)]
        _ep_groups[key] = (groups, replicas)
    groups, replicas = _ep_groups[key]
    return groups[rank // n]


def _group_size(num_gpus: Optional[int], group: Any) -> int:
    """The expert-parallel group size :func:`_resolve_group` will give (checks ``num_gpus``; no collective)."""
    if group is not None:
        if num_gpus is not None and num_gpus != dist.get_world_size(group):
            raise ValueError(
                f"num_gpus={num_gpus} disagrees with the size of the given group ({dist.get_world_size(group)})"
            )
        return dist.get_world_size(group)
    world = dist.get_world_size()
    n = world if num_gpus is None else num_gpus
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or world % n != 0:
        raise ValueError(f"num_gpus must be a positive divisor of the world size {world}, got {num_gpus!r}")
    return n


def _replica_group(num_gpus: Optional[int], group: Any) -> Any:
    """The group of ranks holding the same experts as this one (made by :func:`_resolve_group`), or ``None``."""
    world = dist.get_world_size()
    if group is not None or num_gpus is None or num_gpus == world:
        return None
    return _ep_groups[(world, num_gpus)][1][dist.get_rank() % num_gpus]


def _get_buffer(
    group: Any, backend: str, ep_buffer_size: Optional[int], compression_level: Any, topology_aware: bool
) -> Buffer:
    """One :class:`deep_ep.Buffer` per (group, settings), shared by every layer and every patched model."""
    key = (id(group), backend, ep_buffer_size, compression_level, topology_aware)
    buf = _buffers.get(key)
    if buf is None or buf._destroyed or buf._waiter.broken:
        buf = _buffers[key] = Buffer(
            group,
            backend=backend,
            ep_buffer_size=ep_buffer_size,
            compression_level=compression_level,
            topology_aware=topology_aware,
        )
    return buf


# ---------------------------------------------------------------------------- the expert-parallel forward


@dataclass
class _EPState:
    """Per experts module: where its experts live and how tokens move."""

    group: Any
    rank: int
    size: int
    num_local: int
    num_experts: int
    buffer: Optional[Buffer]
    path: str


def _empty_result(x: torch.Tensor, weights: Optional[torch.Tensor], forward) -> torch.Tensor:
    """A zero result for no received rows that is still connected to everything the others' results depend on.

    Backward runs collectives (the combine's cached dispatch, the dispatch's
    combine); they must run on every rank or none, so this rank's result has
    to require grad whenever another rank's does: it depends on ``x``, the
    weights and the experts' parameters (scalar terms, no elements are touched).
    """
    y = x * 0
    extra = [weights] if weights is not None else []
    module = getattr(forward, "__self__", None)
    if isinstance(module, nn.Module):
        extra += [p for p in module.parameters(recurse=False) if p.requires_grad and p.numel()]
    for t in extra:
        if t.requires_grad and t.numel():
            y = y + t.reshape(-1)[:1].sum().to(y.dtype) * 0
    return y


def _run_local_experts(forward, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The module's own forward on received rows: ``local_idx`` ``[N, K]`` (``-1`` = not here), weights ``[N, K]``.

    Every (row, local expert) pair becomes a top-1 row, so any experts
    implementation (eager, grouped_mm, ...) runs it without knowing about
    expert parallelism; the pairs' weighted outputs are summed per row in
    float32. Returns ``[N, H]`` in ``x``'s dtype.
    """
    rows, slots = (local_idx >= 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return _empty_result(x, weights, forward)
    pair_x = x.index_select(0, rows)
    pair_idx = local_idx[rows, slots].unsqueeze(1)
    pair_w = weights[rows, slots].unsqueeze(1)
    out = forward(pair_x, pair_idx, pair_w)
    y = torch.zeros((x.size(0), out.size(-1)), dtype=torch.float32, device=x.device)
    y = y.index_add(0, rows, out.float())
    return y.to(x.dtype)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with explicit split sizes (backward: the reverse exchange)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: List[int], in_splits: List[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return g, None, None, None


def deep_ep_experts(
    buffer: Buffer,
    num_experts: int,
    forward,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Expert-parallel MoE step over ``buffer``: dispatch, this rank's experts, combine; differentiable.

    ``hidden_states`` ``[T, H]`` and ``top_k_index`` / ``top_k_weights``
    ``[T, K]`` (global expert ids of ``num_experts``) are this rank's tokens;
    ``forward(x [N, H], local_idx [N, 1], weights [N, 1]) -> [N, H]`` runs
    this rank's experts (ids ``0..L-1``) and applies the weights, as a
    transformers experts module does. Returns ``[T, H]``: for each token, the
    sum over its experts of weight x expert output, whichever rank holds them.
    """
    w_dtype = top_k_weights.dtype
    recv_x, recv_idx, recv_w, _, handle = ops.dispatch(
        buffer, hidden_states, top_k_index.to(torch.int64), top_k_weights.to(torch.float32), num_experts=num_experts
    )
    y = _run_local_experts(forward, recv_x, recv_idx, recv_w.to(w_dtype))
    out, _ = ops.combine(buffer, y, handle)
    return out.to(hidden_states.dtype)


def _forward_all_to_all(state: _EPState, forward, hidden_states, top_k_index, top_k_weights):
    T, K = top_k_index.shape
    R, L = state.size, state.num_local
    dev = hidden_states.device
    flat = top_k_index.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, hence by owner rank
    send_x = hidden_states.index_select(0, order // K)
    per_expert = torch.bincount(flat, minlength=R * L).to(torch.int64)
    recv_per_expert = torch.empty_like(per_expert)
    dist.all_to_all_single(recv_per_expert, per_expert, group=state.group)  # [R*L]: counts of each source rank
    both = torch.stack([per_expert.view(R, L).sum(1), recv_per_expert.view(R, L).sum(1)]).tolist()
    send_splits, recv_splits = both
    recv_x = _AllToAll.apply(send_x, recv_splits, send_splits, state.group)
    local = torch.arange(L, device=dev, dtype=torch.int64).repeat(R)
    recv_idx = local.repeat_interleave(recv_per_expert, output_size=sum(recv_splits)).unsqueeze(1)
    ones = torch.ones_like(recv_idx, dtype=top_k_weights.dtype)
    if recv_x.size(0):
        y = forward(recv_x, recv_idx, ones)
    else:
        y = _empty_result(recv_x, None, forward)
    back = _AllToAll.apply(y, send_splits, recv_splits, state.group)
    pairs = torch.empty_like(back)
    pairs = pairs.index_copy(0, order, back)  # back to (token, k) order
    out = (pairs.view(T, K, back.size(-1)).float() * top_k_weights.unsqueeze(-1).float()).sum(dim=1)
    return out.to(hidden_states.dtype)


def _ep_experts_forward(self, hidden_states, top_k_index=None, top_k_weights=None, *args, **kwargs):
    """Forward installed on a patched experts module (see the module docstring)."""
    state: _EPState = self._deep_ep_state
    forward = super(type(self), self).forward
    if args or kwargs or top_k_index is None or top_k_weights is None:
        raise TypeError(
            f"{type(self).__name__} patched by deep_ep takes (hidden_states, top_k_index, top_k_weights) only"
        )
    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, shape[-1])
    top_k_index = top_k_index.reshape(hidden_states.size(0), -1)
    top_k_weights = top_k_weights.reshape(hidden_states.size(0), -1)
    if state.buffer is not None:
        out = deep_ep_experts(state.buffer, state.num_experts, forward, hidden_states, top_k_index, top_k_weights)
    else:
        out = _forward_all_to_all(state, forward, hidden_states, top_k_index, top_k_weights)
    return out.view(shape)


_patched_classes: Dict[type, type] = {}


def _ep_class(cls: type) -> type:
    """A subclass of the experts class whose forward is the expert-parallel one (made once per class)."""
    sub = _patched_classes.get(cls)
    if sub is None:
        sub = type(
            f"DeepEP{cls.__name__}",
            (cls,),
            {
                "forward": _ep_experts_forward,
                "__doc__": f"{cls.__name__} sharded over an expert-parallel group by deep_ep.patch_moe_model.",
                "__module__": __name__,
            },
        )
        _patched_classes[cls] = sub
    return sub


def _shard(experts: nn.Module, rank: int, num_local: int) -> None:
    """Keep experts ``rank*L .. (rank+1)*L-1`` of every expert-dim tensor; release the full tensors."""
    E = experts.num_experts
    lo, hi = rank * num_local, (rank + 1) * num_local
    for name, is_param in _expert_tensors(experts, E):
        if is_param:
            old = experts._parameters[name]
            with torch.no_grad():
                new = nn.Parameter(old.data[lo:hi].clone(), requires_grad=old.requires_grad)
            for attr, value in vars(old).items():  # keep markers such as _is_hf_initialized
                if not attr.startswith("_grad") and attr not in vars(new):
                    try:
                        setattr(new, attr, value)
                    except Exception:
                        pass
            experts._parameters[name] = new
        else:
            experts._buffers[name] = experts._buffers[name][lo:hi].clone()
    experts.num_experts = num_local


# ---------------------------------------------------------------------------- public entry point


def patch_moe_model(
    model: nn.Module,
    num_gpus: Optional[int] = None,
    use_deep_ep: bool = True,
    *,
    group: Any = None,
    ep_buffer_size: Optional[int] = None,
    compression_level: Any = 16,
    topology_aware: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Shard a Hugging Face MoE model's experts over an expert-parallel group; returns the model, patched in place.

    Every MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE,
    GPT-OSS, and any block whose ``experts`` follows transformers' experts
    interface) keeps only this rank's experts: rank ``r`` of a group of ``R``
    ranks keeps experts ``r*L .. (r+1)*L-1`` (``L = E // R``) and the others'
    weights are released. The block's router, shared experts and everything
    else stay as they are, replicated. In forward, each block's tokens go to
    the ranks of their experts (:class:`deep_ep.Buffer` dispatch), run through
    the model's own expert code there, and come back weighted and summed
    (combine); autograd flows through both, so outputs and gradients match
    the unpatched model's.

    Arguments: ``num_gpus`` the expert-parallel group size (default: the
    whole world); smaller than the world, the world is split into groups of
    ``num_gpus`` consecutive ranks, each holding all experts once (replicas
    across groups). For data-parallel training call
    :func:`average_gradients` after backward (not DistributedDataParallel,
    which would average different ranks' experts together). ``group`` an
    explicit process group instead. ``use_deep_ep=False`` moves tokens with a
    plain :func:`torch.distributed.all_to_all_single` (for A/B comparisons).
    ``ep_buffer_size``, ``compression_level`` (16, 8, 4, 'auto': the wire
    format of the tokens sent to the experts; gradients stay 16-bit),
    ``topology_aware`` and ``backend`` ('auto', 'collective',
    'nvlink') configure the :class:`deep_ep.Buffer`, one per group shared by
    all layers.

    Every rank of the group must call this (it is collective), with the same
    model, before creating the optimizer, and then run the same number of
    forward passes (with ``generate`` on different prompts pass
    ``synced_gpus=True``). Raises :class:`UnsupportedMoEError` naming the
    class for a MoE block it cannot shard (e.g. Llama4's dense-score
    experts), and for a model with no MoE block. The result is stored as
    ``model.deep_ep_info`` (:class:`EPInfo`).
    """
    # Every check of this rank's arguments travels in one bounded exchange before any collective (group
    # creation, the Buffer): a bad argument on one rank makes every rank raise instead of waiting.
    problem: Optional[BaseException] = None
    blocks: list = []
    try:
        if not isinstance(model, nn.Module):
            raise TypeError(f"patch_moe_model takes a torch.nn.Module, got {type(model).__name__}")
        blocks = _find_moe_blocks(model)
        if not blocks:
            raise UnsupportedMoEError(
                f"patch_moe_model found no MoE block in {type(model).__name__} (looked for "
                f"modules with an 'experts' child following the transformers experts interface)"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise DeepEPError(
                "patch_moe_model needs torch.distributed initialised "
                "(torch.distributed.init_process_group(...), e.g. under torchrun)"
            )
        size = _group_size(num_gpus, group)
        for path, block, experts in blocks:
            if experts.num_experts % size != 0:
                raise ValueError(
                    f"{type(block).__name__} at '{path}' has {experts.num_experts} experts, not a multiple "
                    f"of the expert-parallel group size {size}"
                )
    except (TypeError, ValueError, UnsupportedMoEError) as e:
        problem = e
    if not dist.is_available() or not dist.is_initialized():  # nobody to tell
        raise problem
    agree_verdicts(group, problem, "patch_moe_model", Settings.resolve().timeout_s)
    user_group = group
    group = _resolve_group(num_gpus, group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    buffer = _get_buffer(group, backend, ep_buffer_size, compression_level, topology_aware) if use_deep_ep else None
    info = EPInfo(
        group=group,
        rank=rank,
        size=size,
        use_deep_ep=bool(use_deep_ep),
        buffer=buffer,
        replica_group=_replica_group(num_gpus, user_group),
    )
    for path, block, experts in blocks:
        E = experts.num_experts
        L = E // size
        _shard(experts, rank, L)
        experts._deep_ep_state = _EPState(
            group=group, rank=rank, size=size, num_local=L, num_experts=E, buffer=buffer, path=path
        )
        experts.__class__ = _ep_class(type(experts))
        info.blocks.append(path)
        info.families.append(SUPPORTED_FAMILIES.get(type(block).__name__, type(block).__name__))
        info.num_local_experts[path] = L
    model.deep_ep_info = info
    log.info(
        "deep_ep.patch_moe_model: %d MoE blocks, rank %d/%d of the EP group keeps %s experts each (%s)",
        len(blocks),
        rank,
        size,
        sorted(set(info.num_local_experts.values())),
        "deep_ep" if use_deep_ep else "all_to_all_single",
    )
    return model


def expert_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every expert-dim parameter of the model's MoE experts (patched or not).

    Handy to count expert memory per rank or to treat expert and replicated
    parameters differently (e.g. average only the latter over data-parallel
    ranks of one EP group).
    """
    out = []
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        state = getattr(experts, "_deep_ep_state", None)
        E = experts.num_experts if state is None else state.num_local
        if not isinstance(E, int):
            continue
        for name, is_param in _expert_tensors(experts, E):
            if is_param:
                out.append((f"{path}.experts.{name}" if path else f"experts.{name}", experts._parameters[name]))
    return out


def _all_reduce_flat(grads: List[torch.Tensor], group: Any) -> None:
    """Sum ``grads`` over ``group`` in one all-reduce per dtype."""
    by_dtype: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(model: nn.Module, replica_group: Any = None) -> None:
    """Data-parallel gradient averaging for a patched model, in place; collective over the world.

    After each rank's ``loss.backward()``, makes every gradient that of the
    mean of all ranks' losses: replicated parameters are summed over the
    world, expert parameters over the ranks that hold the same experts (their
    tokens already reached them through dispatch, so within an EP group
    nothing is summed twice), then all are divided by the world size. Use it
    instead of ``DistributedDataParallel`` (which would average different
    ranks' experts together). ``replica_group`` is needed only when the
    model was patched with an explicit ``group`` smaller than the world.
    Parameters without a gradient count as zeros.
    """
    info: Optional[EPInfo] = getattr(model, "deep_ep_info", None)
    if info is None:
        raise DeepEPError("average_gradients needs a model patched by patch_moe_model")
    world = dist.get_world_size()
    replicas = replica_group if replica_group is not None else info.replica_group
    if replicas is None and info.size != world:
        raise ValueError(
            f"the EP group has {info.size} of {world} ranks: pass replica_group (the ranks holding "
            f"the same experts as this one)"
        )
    experts = {id(p) for _, p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if id(p) in experts else dense).append(p.grad)
    if world > 1:
        _all_reduce_flat(dense, None)
        if replicas is not None and dist.get_world_size(replicas) > 1:
            _all_reduce_flat(expert, replicas)
    for g in dense + expert:
        g.div_(world)
