"""Expert weight migration: move expert weights (and optimizer state) to a new placement.

When the planner (:func:`~deep_ep.balance.rebalance_experts`) changes the
placement ``phy2log``, every physical slot of the new placement must receive
the weights of its logical expert. :func:`migrate_experts` does that over the
expert-parallel group:

* every rank computes the same *migration plan* (:func:`plan_migration`, in
  :mod:`deep_ep.balance.migration_plan`) from the two placements alone, with
  no communication;
* a new slot whose logical expert the rank already holds (in any old slot) is
  filled by a local copy: no bytes cross ranks for it;
* otherwise one copy of the expert crosses ranks per (destination rank,
  expert): a rank that needs two new replicas of an expert it did not hold
  receives it once and copies it into both slots. The source is a rank that
  holds the expert in the old placement, chosen deterministically: the holder
  that has been asked to send the fewest copies so far (spreading the send
  load), ties to the lowest old slot;
* the rows move as raw bytes in ``torch.distributed.all_to_all_single`` calls
  (tensors bucketed up to ``bucket_bytes`` per call), so any dtype (fp32,
  bf16, fp8, ints, bool, NaN payloads included) arrives bit-exactly;
* before anything moves, the ranks exchange a small vector (one
  ``all_gather``): each rank's verdict on its own inputs and checksums of the
  two placements, of the tensor layout and of the optimizer state. A rank with
  bad input raises its precise error and the others raise
  :class:`~deep_ep.errors.RemoteInputError` naming it; ranks that disagree
  raise :class:`~deep_ep.errors.RankMismatchError` on every rank, naming the
  odd ranks. Nothing is sent in either case.

Layout of the local tensors: for a 1-D placement ``[P]`` each tensor is
``[S, ...]`` with ``S = P // R`` (row ``i`` = local slot ``i``, i.e. global
slot ``rank * S + i``); for a 2-D placement ``[layers, P]`` each tensor is
``[layers, S, ...]``. The new tensors have ``S' = P' // R`` slots (the number
of physical slots may change between the placements).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeepEPInputError, DeepEPTypeError, RankMismatchError, RemoteInputError
from ..settings import DEFAULT_TIMEOUT_S, env_float
from ..transport import group_device
from ..waiting import Waiter
from .migration_plan import MigrationPlan, _as_placement, placement_moves, plan_migration

__all__ = ["MigrationPlan", "plan_migration", "placement_moves", "migrate_experts"]

log = logging.getLogger("deep_ep.balance")

#: Default upper bound of the bytes one all-to-all of :func:`migrate_experts` carries per rank.
DEFAULT_BUCKET_BYTES = 256 << 20

_MAGIC = 0x3E16
_F_MAGIC, _F_ERR, _F_OLD, _F_NEW, _F_PARAMS, _F_STATE, _F_SCALARS = range(7)
_FIELD_NAMES = {
    _F_OLD: "the old placement (old_phy2log)",
    _F_NEW: "the new placement (new_phy2log)",
    _F_PARAMS: "the expert tensors (names, count, per-slot shapes, dtypes, whether grads are present)",
    _F_STATE: "the optimizer state layout (which parameters have state, its keys, shapes, dtypes)",
    _F_SCALARS: "the optimizer's scalar state (e.g. Adam's 'step' counters, which are not per slot)",
}

_migration_calls = itertools.count()

Params = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor], torch.Tensor]


def _digest(*parts: Any) -> int:
    """A 63-bit deterministic checksum (blake2b) of bytes / strings / arrays."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(repr((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _items(local_params: Any) -> Tuple[str, List[Tuple[str, torch.Tensor]]]:
    if isinstance(local_params, torch.Tensor):
        return "tensor", [("0", local_params)]
    if isinstance(local_params, Mapping):
        items = list(local_params.items())
        for k, _v in items:
            if not isinstance(k, str):
                raise DeepEPTypeError(f"local_params keys must be str, got {type(k).__name__} ({k!r})")
        kind = "mapping"
    elif isinstance(local_params, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(local_params)]
        kind = type(local_params).__name__
    else:
        raise DeepEPTypeError(
            f"local_params must be a dict name -> tensor, a list/tuple of tensors or one tensor, "
            f"got {type(local_params).__name__}"
        )
    if not items:
        raise DeepEPInputError("local_params is empty: nothing to migrate")
    for k, v in items:
        if not isinstance(v, torch.Tensor):
            raise DeepEPTypeError(f"local_params[{k!r}] must be a tensor, got {type(v).__name__}")
    return kind, items


def _rebuild(kind: str, local_params: Any, values: List[torch.Tensor]) -> Any:
    if kind == "tensor":
        return values[0]
    if kind == "mapping":
        out = dict(zip(local_params.keys(), values))
        if type(local_params) is not dict:
            try:
                return type(local_params)(out)
            except Exception:
                return out
        return out
    return type(local_params)(values) if kind == "tuple" else list(values)


def _scalar_repr(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        c = v.detach().to("cpu").contiguous()
        return ("tensor", str(c.dtype), tuple(c.shape), bytes(c.reshape(-1).view(torch.uint8).numpy().tobytes()))
    return ("py", type(v).__name__, repr(v))


class _Unit:
    """One per-slot tensor to move, with a way to put the result back."""

    __slots__ = ("name", "src", "shape_tail", "dtype", "row_elems", "row_bytes")

    def __init__(self, name: str, src: torch.Tensor, lead: int) -> None:
        self.name = name
        self.src = src
        self.shape_tail = tuple(src.shape[lead:])
        self.dtype = src.dtype
        n = 1
        for d in self.shape_tail:
            n *= d
        self.row_elems = n
        self.row_bytes = n * src.element_size()


def _collect(items, optimizer, inplace: bool, lead: int, s_old: int, layers: int, layered: bool):
    """Validate the local tensors; return (units, param layout parts, state parts, scalar parts, device)."""
    units: List[_Unit] = []
    p_parts: List[Any] = [len(items), lead]
    st_parts: List[Any] = []
    sc_parts: List[Any] = []
    device = None
    want = (layers, s_old) if layered else (s_old,)
    opt_params = None
    if optimizer is not None:
        if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
            raise DeepEPTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    seen: Dict[int, str] = {}
    for name, t in items:
        if id(t) in seen:
            raise DeepEPInputError(f"local_params[{name!r}] is the same tensor as local_params[{seen[id(t)]!r}]")
        seen[id(t)] = name
        if t.layout != torch.strided or t.is_quantized:
            raise DeepEPInputError(f"local_params[{name!r}]: only dense strided tensors can migrate, got {t.layout}")
        if tuple(t.shape[:lead]) != want:
            dims = "[layers, slots_per_rank, ...]" if layered else "[slots_per_rank, ...]"
            raise DeepEPInputError(
                f"local_params[{name!r}] has shape {tuple(t.shape)}; expected {dims} with leading dims {want} "
                f"(the old placement gives this rank {s_old} slots)"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise DeepEPInputError(
                f"local_params[{name!r}] is on {t.device}, others on {device}: all must share one device"
            )
        units.append(_Unit(name, t, lead))
        has_grad = inplace and t.grad is not None
        p_parts.append((name, tuple(t.shape[lead:]), str(t.dtype), has_grad))
        if has_grad:
            g = t.grad
            if tuple(g.shape) != tuple(t.shape) or g.layout != torch.strided or g.device != device:
                raise DeepEPInputError(
                    f"local_params[{name!r}].grad has shape {tuple(g.shape)} on {g.device}; "
                    f"expected a dense gradient like the parameter"
                )
            units.append(_Unit(name + ".grad", g, lead))
        if optimizer is None:
            continue
        if id(t) not in opt_params:
            st_parts.append((name, "not in optimizer"))
            continue
        state = optimizer.state.get(t, None)
        if not state:
            st_parts.append((name, "no state"))
            continue
        for key in sorted(state.keys(), key=str):
            v = state[key]
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(t.shape) and v.dim() > 0:
                if v.layout != torch.strided or v.device != device:
                    raise DeepEPInputError(
                        f"optimizer state {key!r} of local_params[{name!r}] is on {v.device} "
                        f"({v.layout}); expected a dense tensor on {device}"
                    )
                units.append(_Unit(f"{name}.state[{key!r}]", v, lead))
                st_parts.append((name, str(key), "per-slot", str(v.dtype)))
            elif (
                (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() <= 1)
                or isinstance(v, (int, float, bool))
                or v is None
            ):
                st_parts.append(
                    (name, str(key), "scalar", str(v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__)
                )
                sc_parts.append((name, str(key), _scalar_repr(v)))
            else:
                desc = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"type {type(v).__name__}"
                raise DeepEPInputError(
                    f"optimizer state {key!r} of local_params[{name!r}] has {desc}: migrate_experts moves only "
                    f"state shaped like its parameter {tuple(t.shape)} (moved per slot) and scalars (kept; they "
                    f"must agree on every rank), so this optimizer is not supported"
                )
    return units, p_parts, st_parts, sc_parts, device


def _wait(work, waiter, stage: str) -> None:
    if waiter is not None:
        waiter.wait(work, stage)
    else:  # pragma: no cover - only without a waiter
        work.wait()


def _exchange(group, R: int, rank: int, vec: List[int], waiter) -> torch.Tensor:
    dev = group_device(group)
    inp = torch.tensor(vec, dtype=torch.int64, device="cpu").to(dev)
    out = torch.empty((R * len(vec),), dtype=torch.int64, device=dev)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, inp, group=group, async_op=True)
    _wait(work, waiter, "migrate_experts metadata")
    return out.view(R, len(vec)).cpu()


def _verdict(gathered: torch.Tensor, rank: int, problem: Optional[Exception]) -> None:
    R = gathered.size(0)
    errs = [r for r in range(R) if int(gathered[r, _F_ERR]) != 0]
    if errs:
        if problem is not None:
            raise problem
        raise RemoteInputError(
            f"deep_ep migrate_experts: rank(s) {errs} rejected their input; see that rank's error. Nothing was moved."
        )
    bad = [r for r in range(R) if int(gathered[r, _F_MAGIC]) != _MAGIC]
    if bad:
        raise RankMismatchError(
            f"deep_ep migrate_experts: rank(s) {bad} sent garbage metadata: they are running a "
            f"different collective. Nothing was moved."
        )
    for f in (_F_OLD, _F_NEW, _F_PARAMS, _F_STATE, _F_SCALARS):
        vals = [int(gathered[r, f]) for r in range(R)]
        if len(set(vals)) > 1:
            groups: Dict[int, List[int]] = {}
            for r, v in enumerate(vals):
                groups.setdefault(v, []).append(r)
            majority = max(groups.values(), key=len)  # ties: the group of the lowest rank
            odd = [r for r in range(R) if r not in majority]
            sets = "; ".join(f"ranks {g}" for g in groups.values())
            if sum(len(g) == len(majority) for g in groups.values()) > 1:
                sets += "; no majority, so the group of the lowest rank is taken as the reference"
            raise RankMismatchError(
                f"deep_ep migrate_experts: ranks disagree on {_FIELD_NAMES[f]}: disagreeing rank(s) {odd} "
                f"(ranks that agree with each other: {sets}). Every rank must pass the same placements and "
                f"tensors of the same layout. Nothing was moved."
            )


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` -> ``uint8 [N, k * element_size]``, bit for bit (a view where the layout allows)."""
    if t.size(1) == 0:
        return torch.empty((t.size(0), 0), dtype=torch.uint8, device=t.device)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _words(b: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, w]`` as the widest int words that divide ``w`` (fewer, larger copies).

    The word depends on ``w`` alone, so every view of one unit's rows agrees;
    a layout that cannot be viewed (odd offset) is first copied.
    """
    w = b.size(1)
    for word, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if w % size == 0:
            if not (b.stride(1) == 1 and b.storage_offset() % size == 0 and b.stride(0) % size == 0):
                b = b.clone(memory_format=torch.contiguous_format)
            return b.view(word)
    return b


def _buckets(units: Sequence["_Unit"], max_rows: int, bucket_bytes: int) -> List[List[int]]:
    """Group the units (same on every rank) into all-to-alls of at most ``bucket_bytes`` per rank (>= 1 unit each)."""
    buckets: List[List[int]] = []
    cur: List[int] = []
    cur_bytes = 0
    for i, u in enumerate(units):
        if u.row_bytes == 0:
            continue
        if cur and (cur_bytes + u.row_bytes) * max_rows > bucket_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += u.row_bytes
    if cur:
        buckets.append(cur)
    return buckets


def _columns(units: Sequence["_Unit"], bucket: List[int]) -> Iterator[Tuple[int, int, int]]:
    """``(unit, first byte column, row bytes)`` of each unit of ``bucket``, side by side in the wire rows."""
    off = 0
    for i in bucket:
        yield i, off, units[i].row_bytes
        off += units[i].row_bytes


def migrate_experts(
    local_params: Params,
    old_phy2log: Any,
    new_phy2log: Any,
    group: Optional[Any] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    inplace: Optional[bool] = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout_s: Optional[float] = None,
) -> Params:
    """Lay this rank's expert tensors out for ``new_phy2log``, fetching missing experts from other ranks.

    Collective over ``group`` (default: the default process group; without an
    initialised ``torch.distributed`` a single rank is assumed): every rank
    calls it with the same placements and tensors of the same layout.

    Args:
        local_params: this rank's per-slot tensors, stacked by local slot: a
            ``dict`` name -> tensor, a ``list``/``tuple`` of tensors, or one
            tensor. Each is ``[S, ...]`` for a 1-D placement, ``[layers, S,
            ...]`` for a 2-D one, ``S = num_replicas // num_ranks`` of the old
            placement; row ``i`` is local slot ``i`` (global slot ``rank * S +
            i``). Any dtype and trailing shape (they must agree across ranks);
            all on one device (CPU with gloo, this rank's GPU with NCCL).
        old_phy2log, new_phy2log: int ``[P]`` or ``[layers, P]`` (EPLB's
            ``phy2log``); ``P`` may differ between the two but must be a
            multiple of the group size. Every expert of the new placement must
            have a copy in the old one (per layer).
        group: the expert-parallel process group.
        optimizer: optional ``torch.optim.Optimizer`` whose parameters include
            the tensors of ``local_params`` (matched by identity). For each
            such parameter with state, every state tensor shaped like the
            parameter (Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
            ``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop, Adagrad, ...)
            moves slot by slot with the weights; scalar state (Adam's
            ``step``, a 0-d tensor or number) is per parameter, not per slot,
            so it is kept and must be equal on every rank (checked). Other
            state (e.g. factored second moments) raises. Implies in-place.
        inplace: if true, each tensor of ``local_params`` keeps its identity
            (``tensor.data`` is replaced, so modules and the optimizer still
            refer to it), its ``.grad`` moves with it when present, and the
            optimizer's state entries are replaced. Default: true when an
            optimizer is given, else false (new tensors are returned; a
            ``torch.nn.Parameter`` comes back as a new Parameter with the same
            ``requires_grad``; gradients are not moved).
        bucket_bytes: upper bound of the bytes one all-to-all carries per rank;
            tensors are grouped into buckets up to it (at least one tensor per
            call).
        timeout_s: bound of every host wait on CPU groups (default 100 s, env
            ``DEEP_EP_TIMEOUT_S``); on expiry a
            :class:`~deep_ep.errors.DeepEPTimeoutError` names the missing ranks.

    Returns:
        The same structure as ``local_params`` (same keys / order), each tensor
        now ``[S', ...]`` (or ``[layers, S', ...]``), ``S' = P' // num_ranks``,
        holding bit-exactly the weights of the logical expert of each new slot.

    Raises:
        DeepEPTypeError / DeepEPInputError: on the rank whose input is bad
        (placements, shapes, devices, unsupported optimizer state), while the
        other ranks raise :class:`~deep_ep.errors.RemoteInputError` naming it;
        :class:`~deep_ep.errors.RankMismatchError` on every rank when ranks
        disagree on the placements, the tensor layout or the optimizer state,
        naming the disagreeing ranks. Nothing is moved in either case.
        :class:`~deep_ep.errors.DeepEPTimeoutError` when a rank does not
        arrive within ``timeout_s`` (CPU groups).
    """
    distributed = dist.is_available() and dist.is_initialized()
    if group is None and distributed:
        group = dist.group.WORLD
    R = dist.get_world_size(group) if distributed else 1
    rank = dist.get_rank(group) if distributed else 0
    if group is not None and not distributed:
        raise DeepEPInputError("migrate_experts got a group but torch.distributed is not initialised")

    waiter = None
    if distributed and R > 1:
        try:
            t_s = float(timeout_s) if timeout_s is not None else env_float("DEEP_EP_TIMEOUT_S", DEFAULT_TIMEOUT_S)
        except (TypeError, ValueError):  # reported below, after the ranks have agreed
            t_s = DEFAULT_TIMEOUT_S
        waiter = Waiter(group, f"deep_ep/migrate/{next(_migration_calls)}", t_s if t_s > 0 else DEFAULT_TIMEOUT_S)

    problem: Optional[Exception] = None
    plan = None
    units: List[_Unit] = []
    kind, items = "list", []
    h = [0] * 5
    try:
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise DeepEPInputError(f"timeout_s must be positive, got {timeout_s!r}")
        if inplace is None:
            inplace = optimizer is not None
        if optimizer is not None and not inplace:
            raise DeepEPInputError(
                "migrate_experts with an optimizer works in place (the optimizer refers to the "
                "parameter objects); do not pass inplace=False"
            )
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise DeepEPInputError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        kind, items = _items(local_params)
        plan = plan_migration(old_phy2log, new_phy2log, R)
        old_np = _as_placement(old_phy2log, "old_phy2log")
        new_np = _as_placement(new_phy2log, "new_phy2log")
        lead = 2 if plan.layered else 1
        units, p_parts, st_parts, sc_parts, device = _collect(
            items, optimizer, inplace, lead, plan.old_slots_per_rank, plan.num_layers, plan.layered
        )
        h = [_digest(old_np), _digest(new_np), _digest(*p_parts), _digest(*st_parts), _digest(*sc_parts)]
    except (DeepEPInputError, DeepEPTypeError) as e:
        problem = e
        if waiter is None:
            raise

    if waiter is not None:
        vec = [_MAGIC, 1 if problem is not None else 0] + h
        _verdict(_exchange(group, R, rank, vec, waiter), rank, problem)
    assert plan is not None

    idx = plan.for_rank(rank)
    s_new = plan.new_slots_per_rank
    rows_new = plan.num_layers * s_new if plan.layered else s_new
    with torch.no_grad():
        rows_old = plan.num_layers * plan.old_slots_per_rank
        dev = units[0].src.device
        # Everything below works on the rows' bytes (viewed as the widest int words the row size allows), so
        # any dtype moves bit for bit and no dtype-specific kernel is needed.
        srcs = [_as_bytes(u.src.detach().reshape(rows_old, u.row_elems)) for u in units]
        outs = [torch.empty((rows_new, u.row_bytes), dtype=torch.uint8, device=dev) for u in units]
        if idx["local_dst"].size:
            ld = torch.as_tensor(idx["local_dst"], dtype=torch.int64).to(dev)
            ls = torch.as_tensor(idx["local_src"], dtype=torch.int64).to(dev)
            for s, o in zip(srcs, outs):
                if o.size(1):
                    _words(o).index_copy_(0, ld, _words(s).index_select(0, ls))

        moved_bytes = 0
        if plan.num_moves:
            send_src = torch.as_tensor(idx["send_src"], dtype=torch.int64).to(dev)
            recv_dst = torch.as_tensor(idx["recv_dst"], dtype=torch.int64).to(dev)
            recv_row = torch.as_tensor(idx["recv_row"], dtype=torch.int64).to(dev)
            for b in _buckets(units, max(plan.max_rows_per_rank(), 1), bucket_bytes):
                width = sum(units[i].row_bytes for i in b)
                send = torch.empty((send_src.numel(), width), dtype=torch.uint8, device=dev)
                for i, off, rb in _columns(units, b):
                    if send_src.numel():
                        send[:, off : off + rb] = _words(srcs[i]).index_select(0, send_src).view(torch.uint8)
                recv = torch.empty((idx["num_recv"], width), dtype=torch.uint8, device=dev)
                if dev.type == "cuda":  # ordered on the current stream, no host wait
                    dist.all_to_all_single(recv, send, idx["out_splits"], idx["in_splits"], group=group)
                else:
                    work = dist.all_to_all_single(
                        recv, send, idx["out_splits"], idx["in_splits"], group=group, async_op=True
                    )
                    _wait(work, waiter, "migrate_experts all-to-all")
                moved_bytes += send.numel()
                for i, off, rb in _columns(units, b):
                    if recv_dst.numel():
                        rows = _words(recv[:, off : off + rb])
                        _words(outs[i]).index_copy_(0, recv_dst, rows.index_select(0, recv_row))

        lead_shape = (plan.num_layers, s_new) if plan.layered else (s_new,)
        shaped = [
            o.view(u.dtype).view(lead_shape + u.shape_tail)
            if u.row_bytes
            else torch.empty(lead_shape + u.shape_tail, dtype=u.dtype, device=dev)
            for u, o in zip(units, outs)
        ]

    log.debug(
        "migrate_experts rank %d/%d: %d expert copies cross ranks in total, %d local slot copies here, "
        "%d bytes sent by this rank",
        rank,
        R,
        plan.num_moves,
        int(idx["local_dst"].size),
        moved_bytes,
    )

    # Put the results back.
    by_name = {u.name: o for u, o in zip(units, shaped)}
    results: List[torch.Tensor] = []
    for name, t in items:
        new_t = by_name[name]
        if inplace:
            grad = by_name.get(name + ".grad")
            t.data = new_t
            if grad is not None:
                t.grad = grad
            if optimizer is not None and t in optimizer.state:
                st = optimizer.state[t]
                for key in list(st.keys()):
                    moved = by_name.get(f"{name}.state[{key!r}]")
                    if moved is not None:
                        st[key] = moved
            results.append(t)
        elif isinstance(t, torch.nn.Parameter):
            results.append(torch.nn.Parameter(new_t, requires_grad=t.requires_grad))
        else:
            results.append(new_t)
    return _rebuild(kind, local_params, results)
