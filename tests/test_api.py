"""The public surface: names, signatures and defaults exactly as docs/api.md (DeepEP v1 compatible)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep.errors import BufferDestroyedError, DeepEPInputError
from tests._cases import device, get_buffer


def _params(fn):
    return [
        (p.name, p.default if p.default is not inspect.Parameter.empty else "<req>", p.kind.name)
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


def test_module_names():
    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t", "SparseCollective"):
        assert hasattr(deep_ep, name), name
    assert deep_ep.topk_idx_t is torch.int64
    from deep_ep.integrations import patch_moe_model  # noqa: F401

    assert callable(deep_ep.ops.dispatch) and callable(deep_ep.ops.combine)


def test_buffer_signature():
    names = [p[0] for p in _params(deep_ep.Buffer.__init__)]
    assert names == [
        "group",
        "num_nvl_bytes",
        "num_rdma_bytes",
        "low_latency_mode",
        "num_qps_per_rank",
        "allow_nvlink_for_low_latency_mode",
        "allow_mnnvl",
        "use_fabric",
        "explicitly_destroy",
        "enable_shrink",
        "comm",
        "backend",
        "ep_buffer_size",
        "compression_level",
        "topology_aware",
        "timeout_s",
        "compression_ratio",
        "combine_compression_level",
        "compression_stats",
        "ranks_per_node",
        "compression_tolerance",
    ]
    p = {n: (d, k) for n, d, k in _params(deep_ep.Buffer.__init__)}
    assert p["num_nvl_bytes"][0] == 0 and p["num_qps_per_rank"][0] == 24 and p["low_latency_mode"][0] is False
    assert p["backend"] == ("auto", "KEYWORD_ONLY") and p["compression_level"][0] == 16
    assert p["topology_aware"][1] == "KEYWORD_ONLY" and p["timeout_s"][1] == "KEYWORD_ONLY"


def test_method_signatures():
    B = deep_ep.Buffer
    assert [p[0] for p in _params(B.get_dispatch_layout)] == [
        "topk_idx",
        "num_experts",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
    ]
    assert [p[0] for p in _params(B.dispatch)] == [
        "x",
        "handle",
        "num_tokens_per_rank",
        "num_tokens_per_rdma_rank",
        "is_token_in_rank",
        "num_tokens_per_expert",
        "topk_idx",
        "topk_weights",
        "expert_alignment",
        "num_worst_tokens",
        "config",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
        "compress",
        "return_compressed",
    ]  # deep_ep's, keyword-only
    assert [p[0] for p in _params(B.combine)] == [
        "x",
        "handle",
        "topk_weights",
        "bias",
        "config",
        "previous_event",
        "async_finish",
        "allocate_on_comm_stream",
        "compress",
    ]
    assert {p[0]: p[2] for p in _params(B.dispatch)}["compress"] == "KEYWORD_ONLY"
    assert [p[0] for p in _params(B.get_local_buffer_tensor)] == ["dtype", "size", "offset", "use_rdma_buffer"]


def test_low_latency_signatures():
    """The low-latency methods exactly as DeepEP v1 (docs/api.md, low-latency mode): names, order, defaults, all positional-or-
    keyword (DeepEP callers pass some positionally); the size hint a static method."""
    B, req = deep_ep.Buffer, "<req>"
    want = {
        "low_latency_dispatch": [
            ("x", req),
            ("topk_idx", req),
            ("num_max_dispatch_tokens_per_rank", req),
            ("num_experts", req),
            ("cumulative_local_expert_recv_stats", None),
            ("dispatch_wait_recv_cost_stats", None),
            ("use_fp8", True),
            ("round_scale", False),
            ("use_ue8m0", False),
            ("async_finish", False),
            ("return_recv_hook", False),
        ],
        "low_latency_combine": [
            ("x", req),
            ("topk_idx", req),
            ("topk_weights", req),
            ("handle", req),
            ("use_logfmt", False),
            ("zero_copy", False),
            ("async_finish", False),
            ("return_recv_hook", False),
            ("out", None),
            ("combine_wait_recv_cost_stats", None),
        ],
        "get_next_low_latency_combine_buffer": [("handle", req)],
        "clean_low_latency_buffer": [("num_max_dispatch_tokens_per_rank", req), ("hidden", req), ("num_experts", req)],
        "get_low_latency_rdma_size_hint": [
            ("num_max_dispatch_tokens_per_rank", req),
            ("hidden", req),
            ("num_ranks", req),
            ("num_experts", req),
        ],
    }
    for name, params in want.items():
        got = _params(getattr(B, name))
        assert [(n, d) for n, d, _ in got] == params, f"{name}: {got}"
        assert all(k == "POSITIONAL_OR_KEYWORD" for _, _, k in got), f"{name}: {got}"
    assert isinstance(inspect.getattr_static(B, "get_low_latency_rdma_size_hint"), staticmethod)
    assert "self" in inspect.signature(B.low_latency_dispatch).parameters  # instance methods
    assert B.get_low_latency_rdma_size_hint(128, 7168, 2, 288) >= B.get_low_latency_rdma_size_hint(64, 7168, 2, 288)


def test_config_and_class_methods():
    c = deep_ep.Config()
    assert (
        c.num_sms,
        c.num_max_nvl_chunked_send_tokens,
        c.num_max_nvl_chunked_recv_tokens,
        c.num_max_rdma_chunked_send_tokens,
        c.num_max_rdma_chunked_recv_tokens,
    ) == (20, 6, 256, 6, 256)
    a = c.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert a > 0 and a % 128 == 0 and c.get_nvl_buffer_size_hint(7168 * 2, 8) > c.get_nvl_buffer_size_hint(1024, 8)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0 and c.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    with pytest.raises(ValueError):
        deep_ep.Config(num_sms=0)
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.num_sms == 24
        assert deep_ep.Buffer.get_dispatch_config(2).num_sms == 24
        assert deep_ep.Buffer.get_combine_config(8).num_sms == 24
        assert deep_ep.Buffer.get_dispatch_config(6).num_max_nvl_chunked_send_tokens > 0
    finally:
        deep_ep.Buffer.set_num_sms(old)
    assert deep_ep.Buffer.is_sm90_compiled() in (True, False)


def test_event_overlap_cpu():
    ev = deep_ep.EventOverlap(None, extra_tensors=[torch.zeros(1)])
    ev.current_stream_wait()
    with ev as e:
        assert e is ev
    assert len(ev.extra_tensors) == 1


def rank_buffer_utilities(rank, R):
    dev = device()
    buf = deep_ep.Buffer(None, num_nvl_bytes=1024, explicitly_destroy=True, backend="collective")
    assert buf.rank == rank and buf.group_size == R and buf.backend == "collective"
    if dev.type == "cuda":
        with pytest.raises(DeepEPInputError, match="num_nvl_bytes"):
            deep_ep.Buffer(None, num_nvl_bytes=1024, backend="nvlink")
        from deep_ep.transport import select_backend

        assert deep_ep.Buffer(None).backend == select_backend(dist.group.WORLD)[0]
    t = buf.get_local_buffer_tensor(torch.float32)
    assert t.numel() == 256 and t.device.type == dev.type
    v = buf.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=16)
    assert v.shape == (4, 8)
    with pytest.raises(DeepEPInputError):
        buf.get_local_buffer_tensor(torch.float32, torch.Size([300]))
    ev = buf.capture()
    assert isinstance(ev, deep_ep.EventOverlap)
    assert (buf.get_comm_stream() is None) == (dev.type == "cpu")
    buf.destroy()
    buf.destroy()
    with pytest.raises(BufferDestroyedError):
        buf.dispatch(torch.zeros((1, 8), dtype=torch.bfloat16, device=dev))
    with pytest.raises(deep_ep.DeepEPTypeError, match="bfloat16"):
        get_buffer().low_latency_dispatch(None, None, 1, 1)


def rank_env_knobs(rank, R):
    import os

    os.environ["DEEP_EP_BUFFER_SIZE"] = "8M"
    os.environ["DEEP_EP_TIMEOUT_S"] = "12.5"
    os.environ["DEEP_EP_TOPOLOGY_AWARE"] = "0"
    try:
        buf = deep_ep.Buffer(None)
        assert buf.ep_buffer_size == 8 << 20 and buf.timeout_s == 12.5 and buf.topology_aware is False
        buf2 = deep_ep.Buffer(None, ep_buffer_size=1 << 20, timeout_s=3, topology_aware=True)
        assert buf2.ep_buffer_size == 1 << 20 and buf2.timeout_s == 3 and buf2.topology_aware is True
        os.environ["DEEP_EP_COMPRESSION_LEVEL"] = "8"
        assert deep_ep.Buffer(None).compression_level == 8
        assert deep_ep.Buffer(None, compression_level=4).compression_level == 4  # the argument wins
        os.environ["DEEP_EP_COMPRESSION_LEVEL"] = "3"
        with pytest.raises(deep_ep.DeepEPInputError, match="compression_level"):
            deep_ep.Buffer(None)
    finally:
        for k in ("DEEP_EP_BUFFER_SIZE", "DEEP_EP_TIMEOUT_S", "DEEP_EP_TOPOLOGY_AWARE", "DEEP_EP_COMPRESSION_LEVEL"):
            os.environ.pop(k, None)


def test_buffer_utilities(rank_pool):
    rank_pool(2).run(rank_buffer_utilities)


def test_env_knobs(rank_pool):
    rank_pool(2).run(rank_env_knobs)


def test_buffer_needs_distributed():
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a default group exists in this process")
    with pytest.raises(deep_ep.DeepEPError, match="init_process_group"):
        deep_ep.Buffer(None)


@pytest.mark.gpu
def test_buffer_utilities_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_buffer_utilities)


@pytest.mark.parametrize(
    "be,cfg,want",
    [
        ("nccl", None, True),
        ("gloo", None, False),
        ("cpu:gloo,cuda:nccl", None, True),
        ("cpu:gloo,cuda:gloo", None, True),
        ("undefined", "cpu:gloo", False),
        ("undefined", "cpu:gloo,cuda:nccl", True),
    ],
)
def test_group_on_cuda_backend_strings(monkeypatch, be, cfg, want):
    """Which groups work on CUDA: NCCL, a gloo group mapped to CUDA, and a group made without naming a
    backend (its per-device configuration decides)."""
    import deep_ep.transport as tr

    monkeypatch.setattr(tr.dist, "get_backend", lambda group=None: be)
    monkeypatch.setattr(tr.dist, "get_backend_config", lambda group=None: cfg)
    assert tr.group_on_cuda() is want
    if not want:
        assert tr.group_device() == torch.device("cpu")


def rank_parse_cache(rank, R):
    """A fresh dispatch is parsed once per argument signature; a call that differs in any tensor's shape,
    dtype, device or contiguity, or in a scalar's type or value, is parsed again (and refused if bad)."""
    from deep_ep import calls

    dev = device()
    E, T, H, K = 4 * R, 6, 24, 2
    bufs = [deep_ep.Buffer(None, explicitly_destroy=True, backend="collective") for _ in range(2)]
    parsed = []
    original = calls.DispatchRequest.parse.__func__

    def counting(cls, **kw):
        parsed.append(kw["x"].shape if isinstance(kw["x"], torch.Tensor) else None)
        return original(cls, **kw)

    calls.DispatchRequest.parse = classmethod(counting)
    try:

        def args(seed, idx_layout="c", wdtype=torch.float32):
            g = torch.Generator().manual_seed(seed * 10 + rank)
            x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
            idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(dev)
            if idx_layout == "t":  # the same values, not contiguous
                idx = idx.t().contiguous().t()
            w = torch.rand(T, K, generator=g).to(wdtype).to(dev)
            return x, idx, w

        def call(buf, x, idx, w, **kw):
            _, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, E)
            out = buf.dispatch(
                x, is_token_in_rank=in_rank, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w, **kw
            )
            return out[:4]

        call(bufs[0], *args(1))
        assert len(parsed) == 1
        for seed in (2, 3):  # same signature, new values: not parsed again, and the new values are used
            before = len(parsed)
            got = call(bufs[0], *args(seed))
            assert len(parsed) == before
            want = call(bufs[1], *args(seed))  # (a Buffer that parses its first call)
            for a, b in zip(got[:3], want[:3]):
                assert torch.equal(a, b)
            assert got[3] == want[3]
        n = len(parsed)
        for seed in (4, 5):  # not contiguous: parsed every time (parsing makes it contiguous), right results
            got = call(bufs[0], *args(seed, idx_layout="t"))
            want = call(bufs[1], *args(seed))
            assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert len(parsed) == n + 2  # (bufs[1] parsed that signature before)
        import gc
        import weakref

        x, idx, w = args(9)
        wide = torch.cat([x, x[:, :8]], dim=1)  # a new signature (hidden H + 8): parsed and kept
        call(bufs[0], wide, idx, w)
        alive = weakref.ref(wide)  # nothing of the first call of a signature stays alive in the cache
        del wide
        gc.collect()
        assert alive() is None
        with pytest.raises(deep_ep.DeepEPTypeError, match="float32"):  # float64 weights: parsed and refused
            call(bufs[0], *args(5, wdtype=torch.float64))
        with pytest.raises(DeepEPInputError, match="expert_alignment"):  # True is not the int 1 cached before
            call(bufs[0], *args(6), expert_alignment=True)
        got = call(bufs[0], *args(7))  # the Buffer works on after refused calls
        want = call(bufs[1], *args(7))
        assert torch.equal(got[0], want[0])
    finally:
        calls.DispatchRequest.parse = classmethod(original)
        for b in bufs:
            b.destroy()


def test_parse_cache(rank_pool):
    rank_pool(2).run(rank_parse_cache)


def test_ints_to_device():
    """Host numbers onto a device (pinned memory and a non-blocking copy on CUDA): values, dtype, shape."""
    from deep_ep.streams import ints_to_device

    devs = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for dev in devs:
        for values, dtype in (([3, -1, 2**40], torch.int64), ([[1, 2], [3, 4]], torch.int32), ([], torch.int64)):
            t = ints_to_device(values, dtype, dev)
            assert t.device.type == dev.type and t.dtype == dtype
            assert t.cpu().tolist() == values
