"""Events and the stream discipline of :class:`deep_ep.ElasticBuffer` calls.

One ElasticBuffer call runs several :class:`deep_ep.Buffer` calls and some local
index work. On CUDA all of it runs on the Buffer's communication stream, after
``previous_event`` (or after the current stream's work); with
``async_with_compute_stream`` the call returns an event instead of making the
current stream wait. On CPU every call finishes before it returns and events
are empty.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch

from .. import EventOverlap

__all__ = ["ElasticEventOverlap", "capture_event", "check_event", "StreamScope"]


class ElasticEventOverlap(EventOverlap):
    """The event :class:`deep_ep.ElasticBuffer` returns: V1's :class:`deep_ep.EventOverlap` plus V2's
    ``current_stream_wait(release_handle=...)``, ``register_hook_after_wait`` and
    ``with event(release_handle=True):``.

    Args:
        event: a ``torch.cuda.Event``, or ``None`` (CPU, or work already ordered on the current stream).
        extra_tensors: tensors to keep alive until the event completes.
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[Iterable[Any]] = None) -> None:
        super().__init__(event, extra_tensors)
        self.hook_after_wait: Optional[Callable[[], Any]] = None
        self._release_on_exit = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """Make the current stream wait for the event (no-op without one), then run the registered hook.

        Args:
            release_handle: drop the event (and the tensors it keeps alive) afterwards.
        """
        super().current_stream_wait()
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None
            self.extra_tensors = None

    def register_hook_after_wait(self, hook: Callable[[], Any]) -> None:
        """Run ``hook()`` once, right after the next :meth:`current_stream_wait`.

        Args:
            hook: a callable without arguments.
        """
        if self.hook_after_wait is not None:
            raise RuntimeError("a hook is already registered on this event")
        self.hook_after_wait = hook

    def __call__(self, release_handle: bool = False) -> "ElasticEventOverlap":
        """Set what ``with event:`` does on exit (``with event(release_handle=True): ...``).

        Args:
            release_handle: drop the event after waiting on exit.

        Returns:
            This event.
        """
        self._release_on_exit = release_handle
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait(release_handle=self._release_on_exit)
        self._release_on_exit = False


def capture_event() -> ElasticEventOverlap:
    """An event recorded on the current CUDA stream (an empty one where CUDA is not in use).

    Returns:
        :class:`ElasticEventOverlap`.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream())
        return ElasticEventOverlap(ev)
    return ElasticEventOverlap(None)


def check_event(event: Any, what: str) -> None:
    """Reject what is not an event (``None``, an :class:`EventOverlap`, a ``torch.cuda.Event`` or an object with
    ``current_stream_wait()``).

    Args:
        event: the argument.
        what: its name, for the error.
    """
    if event is None or isinstance(event, (EventOverlap, torch.cuda.Event)) or hasattr(event, "current_stream_wait"):
        return
    raise TypeError(f"{what} must be an event from ElasticBuffer.capture(), got {type(event).__name__}")


def _wait_on(stream: Any, event: Any) -> None:
    """Make ``stream`` (the current one) wait for ``event``: an EventOverlap, a CUDA event, or anything
    with ``current_stream_wait()``."""
    if event is None:
        return
    inner = getattr(event, "event", event)
    if inner is None:
        return
    if isinstance(inner, torch.cuda.Event):
        stream.wait_event(inner)
    elif hasattr(inner, "current_stream_wait"):
        inner.current_stream_wait()  # runs while ``stream`` is current
    else:
        raise TypeError(f"previous_event must be an event from capture(), got {type(event).__name__}")


class StreamScope:
    """The stream discipline of one ElasticBuffer call (see the module docstring).

    Args:
        device: the Buffer's device.
        comm_stream: the Buffer's communication stream (``None`` on CPU).
        previous_event: what the work waits for instead of the current stream, or ``None``.
        async_with_compute_stream: return an event instead of making the current stream wait.
        allocate_on_comm_stream: outputs belong to the communication stream (they are not recorded on the
            current stream).
    """

    def __init__(
        self,
        device: torch.device,
        comm_stream: Optional[Any],
        previous_event: Optional[Any],
        async_with_compute_stream: bool,
        allocate_on_comm_stream: bool,
    ) -> None:
        self.cuda = device.type == "cuda" and comm_stream is not None
        self.comm = comm_stream
        self.previous_event = previous_event
        self.async_finish = bool(async_with_compute_stream)
        self.on_comm = bool(allocate_on_comm_stream)
        self.compute: Optional[Any] = None
        self._inputs: List[torch.Tensor] = []

    def __enter__(self) -> "StreamScope":
        if self.cuda:
            self.compute = torch.cuda.current_stream()
            torch.cuda.set_stream(self.comm)
            if self.previous_event is not None:
                _wait_on(self.comm, self.previous_event)
            else:
                self.comm.wait_stream(self.compute)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.cuda and self.compute is not None:
            torch.cuda.set_stream(self.compute)
            if exc_type is not None:
                self.compute.wait_stream(self.comm)

    def wait_before_epilogue(self, event: Optional[Any]) -> None:
        """Make the rest of the call's work wait for ``event`` too (V2's ``previous_event_before_epilogue``).

        Args:
            event: an event from ``capture()``, or ``None``.
        """
        if self.cuda and event is not None:
            _wait_on(self.comm, event)

    def keep_inputs(self, *tensors: Any) -> None:
        """Tensors of the caller the call reads; with ``async_with_compute_stream`` their memory is held
        until the communication stream is done with them.

        Args:
            tensors: tensors, tuples of tensors or ``None``.
        """
        for t in tensors:
            if isinstance(t, (tuple, list)):
                self.keep_inputs(*t)
            elif isinstance(t, torch.Tensor):
                self._inputs.append(t)

    def finish(self, outputs: Iterable[Any]) -> ElasticEventOverlap:
        """Close the call: record its outputs for the current stream, then an event or a wait.

        Args:
            outputs: the tensors (or tuples, or ``None``) the call returns.

        Returns:
            The event of the call (empty unless ``async_with_compute_stream`` on CUDA).
        """
        flat: List[torch.Tensor] = []

        def add(t: Any) -> None:
            if isinstance(t, (tuple, list)):
                for u in t:
                    add(u)
            elif isinstance(t, torch.Tensor):
                flat.append(t)

        add(list(outputs))
        if not self.cuda:
            return ElasticEventOverlap(None)
        torch.cuda.set_stream(self.compute)
        if not torch.cuda.is_current_stream_capturing():
            if not self.on_comm:
                for t in flat:
                    if t.is_cuda:
                        t.record_stream(self.compute)
            if self.async_finish:
                for t in self._inputs:
                    if t.is_cuda:
                        t.record_stream(self.comm)
        if self.async_finish:
            ev = torch.cuda.Event()
            ev.record(self.comm)
            return ElasticEventOverlap(ev, flat + self._inputs)
        self.compute.wait_stream(self.comm)
        return ElasticEventOverlap(None)
