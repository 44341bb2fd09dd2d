"""DeepEP's stream discipline for one call: work on the Buffer's comm stream, then an event or a wait."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from .config import EventOverlap

__all__ = ["StreamCall", "ints_to_device"]


def ints_to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers (a list, or a list of lists) as a tensor on ``device`` without draining its stream: on
    CUDA through pinned memory and a non-blocking copy on the current stream (``torch.tensor(...,
    device=cuda)`` copies from pageable memory, which waits for every op queued before it); elsewhere a
    plain tensor.

    Args:
        values: the numbers; dtype: the tensor's dtype; device: where it goes.

    Returns:
        A tensor of ``values``' shape on ``device``.
    """
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        # (the caching host allocator keeps the pinned block until the copy has run; under capture the copy
        # would replay from a reused block, so it takes the plain copy, which capture refuses loudly)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).to(device)


class StreamCall:
    """Stream discipline of one call (DeepEP's): work on the comm stream, then event or wait."""

    def __init__(
        self, device: torch.device, comm_stream: Optional[torch.cuda.Stream], options: Any, events: Any = None
    ) -> None:
        """Args:
        device: the Buffer's device.
        comm_stream: its communication stream (``None`` on CPU).
        options: the call's validated :class:`~deep_ep.calls.CallOptions` (events, async, allocation).
        events: two CUDA events the Buffer keeps for "the comm stream waits for the compute stream" and the
            reverse (recorded anew every call: no event is created per call), or ``None``.
        """
        self._events = events
        self.device = device
        self.comm = comm_stream
        self.cuda = device.type == "cuda"
        self.previous_event = options.previous_event
        self.async_finish = options.async_finish
        self.on_comm = options.allocate_on_comm_stream
        self.compute = None
        self._ctx = None

    def __enter__(self) -> "StreamCall":
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
            comm = self.comm
            if self.previous_event is not None and self.previous_event.event is not None:
                comm.wait_event(self.previous_event.event)
            elif self._events is not None:
                ev = self._events[0]
                ev.record(self.compute)
                comm.wait_event(ev)
            else:
                comm.wait_stream(self.compute)
            torch.cuda.set_stream(comm)  # (cheaper than the torch.cuda.stream context manager)
            self._ctx = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ctx:
            torch.cuda.set_stream(self.compute)
            self._ctx = None

    def alloc(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate an output on the compute stream, or on the comm stream if asked."""
        if not shape:  # (a 0-d tensor: its sizes cannot go as arguments)
            return self.alloc((1,), dtype).view(())
        if self.cuda and not self.on_comm and self._ctx:
            torch.cuda.set_stream(self.compute)
            try:
                return torch.empty(*shape, dtype=dtype, device=self.device)
            finally:
                torch.cuda.set_stream(self.comm)
        if self.cuda and not self.on_comm:
            with torch.cuda.stream(self.compute):
                return torch.empty(*shape, dtype=dtype, device=self.device)
        # (sizes as separate arguments: torch parses them faster than a tuple)
        return torch.empty(*shape, dtype=dtype, device=self.device)

    def finish(self, keep: Sequence[Any], comm_made: Optional[Sequence[Any]] = None) -> EventOverlap:
        """Close the call: an event (async) or make the compute stream wait for the comm stream.

        Args:
            keep: every tensor the call's comm-stream work read or wrote (kept alive for it with
                ``async_finish``: the compute stream does not wait then).
            comm_made: the tensors among them allocated on the comm stream and handed to the compute
                stream (recorded for it; ``None``: all of ``keep``, the cautious default). Without
                ``async_finish`` nothing else needs recording: the compute stream waits for the comm
                stream before it uses anything.
        """
        self.__exit__(None, None, None)
        if not self.cuda:
            return EventOverlap(None)
        comm = self.comm
        if not self.async_finish and comm_made is not None:
            if comm_made and not torch.cuda.is_current_stream_capturing():
                for t in comm_made:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(self.compute)
            self._wait_comm()
            return EventOverlap(None)
        # Tensors made or used on the comm stream are also used on the compute stream (and the
        # reverse): tell the caching allocator, so neither stream's next allocation can reuse their
        # memory while the other stream may still touch it. Without async_finish the compute stream
        # waits for the comm stream below, so whatever reuses memory of the compute stream's pool
        # runs after this call's comm work: only tensors the comm stream made need recording (for
        # the compute stream, which uses them next; recording a tensor for its own stream is free).
        # Under CUDA-graph capture the graph's memory pool keeps them alive instead (record_stream is
        # not for captured work).
        if not torch.cuda.is_current_stream_capturing():
            for t in keep:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(self.compute)
                    if self.async_finish:
                        t.record_stream(comm)
        if self.async_finish:
            ev = torch.cuda.Event()
            ev.record(comm)
            return EventOverlap(ev, [t for t in keep if t is not None])
        self._wait_comm()
        return EventOverlap(None)

    def _wait_comm(self) -> None:
        """The compute stream waits for the comm stream (through the Buffer's event when it has one)."""
        if self._events is not None:
            ev = self._events[1]
            ev.record(self.comm)
            self.compute.wait_event(ev)
        else:
            self.compute.wait_stream(self.comm)
