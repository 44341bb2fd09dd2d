"""Launching Triton kernels with little host work, and counting the launches.

``kernel[grid](*args)`` costs tens of microseconds of Python per launch in Triton 3.6 (argument binding,
the specialisation key, a pointer-attribute query per tensor, launch metadata). :class:`Launcher` does
that once per *signature* (the kernel's constexprs, each tensor argument's dtype and 16-byte alignment,
each int argument's Triton specialisation), keeps the compiled kernel, and then calls its launcher
directly with integer pointers and the current stream. It falls back to ``kernel[grid]`` under Triton's
interpreter, while Triton's launch hooks are set (profilers), and where the compiled kernel's launcher
differs from the one this was written for.

:data:`STATS` counts every launch (``launches``) and, under the interpreter, the seconds spent executing
kernels (``device_s``: on a GPU that time is asynchronous, so a host-time measurement on CPU subtracts it).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import torch

from ..caches import keep
from ..settings import env_raw

__all__ = ["Launcher", "Bound", "STATS", "interpreting"]


class _Stats:
    """Launch counters (reset them around a measured region)."""

    def __init__(self) -> None:
        self.launches = 0
        self.device_s = 0.0
        self.interpreting_now = False  # inside an interpreted kernel (its host work is the device's)

    def reset(self) -> None:
        """Zero the counters."""
        self.launches = 0
        self.device_s = 0.0


STATS = _Stats()


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter in this process (``TRITON_INTERPRET=1``)."""
    raw = env_raw("TRITON_INTERPRET")
    return raw is not None and raw != "0"


def _int_spec(v: int) -> Tuple[int, bool]:
    """Triton's specialisation of an int argument: 1, divisible by 16, or neither; and its type (i32 or
    i64 by its value)."""
    return (1 if v == 1 else (16 if v % 16 == 0 else 0)), -(2**31) <= v < 2**31


def _hooked() -> bool:
    """Whether Triton's launch hooks are set (a profiler): then its own launch path runs them. Triton 3.6 keeps
    a hook chain there even when nothing is hooked (an empty one is no hook)."""
    from triton import knobs

    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", None) is None or hook.calls):
            return True
    return False


class Bound:
    """A :class:`Launcher` with its constexprs fixed (:meth:`Launcher.bind`, once per call shape): a launch
    then passes the positional arguments only, and the lean path finds its compiled kernel and the order of
    the launcher's arguments without rebuilding either from the constexprs.

    Args:
        launcher: the kernel's launcher.
        constexprs: the kernel's constexpr parameters by name.
    """

    __slots__ = ("launcher", "constexprs", "key", "template", "arg_pos")

    def __init__(self, launcher: "Launcher", constexprs: Dict[str, Any]) -> None:
        self.launcher = launcher
        self.constexprs = constexprs
        self.key = tuple(constexprs.items())
        self.template: Any = None  # the launcher's argument list with the constexprs in place (lean path)
        self.arg_pos: Any = None  # where each positional argument goes in it

    def __call__(self, grid: Tuple[int, ...], *args: Any) -> None:
        """Launch ``fn[grid](*args, **constexprs)``."""
        self.launcher.launch(grid, args, self)


class Launcher:
    """One ``@triton.jit`` kernel, launched leanly (see the module docstring).

    Args:
        fn: the kernel.
        num_warps: warps per program.
    """

    #: a measurement hook (``deep-ep tools host-time`` on CPU): when set, every launch calls
    #: ``replay(launcher, grid, args, bound)`` instead of running a kernel (and is counted)
    replay: Any = None

    def __init__(self, fn: Any, num_warps: int = 4) -> None:
        self.fn = fn
        self.num_warps = num_warps
        self._compiled: Dict[Tuple, Any] = {}
        self._bounds: Dict[Tuple, Bound] = {}  # the keyword form's Bounds, by constexprs
        self._interp: Any = None
        self._lean = True

    def bind(self, constexprs: Dict[str, Any]) -> Bound:
        """The kernel with ``constexprs`` fixed (keep it per call shape: see :class:`Bound`)."""
        return Bound(self, constexprs)

    def __call__(self, grid: Tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        """Launch ``fn[grid](*args, **constexprs, num_warps=...)``: positional ``args`` are the kernel's
        non-constexpr parameters in order, ``constexprs`` its constexpr ones by name."""
        key = tuple(constexprs.items())
        bound = self._bounds.get(key)
        if bound is None:  # (a Bound per constexprs: its argument template is made once)
            bound = keep(self._bounds, key, Bound(self, constexprs))
        self.launch(grid, args, bound)

    def launch(self, grid: Tuple[int, ...], args: Tuple, bound: Bound) -> None:
        """Launch with ``bound``'s constexprs (every launch comes here: it counts them)."""
        STATS.launches += 1
        if Launcher.replay is not None:
            Launcher.replay(self, grid, args, bound)
            return
        if self._interp is None:  # fixed for the process once Triton is imported (read once, not per launch)
            self._interp = interpreting()
        if self._interp:
            # the interpreter's emulation is the device's work: outside any dispatch mode (op counters)
            from torch.utils._python_dispatch import _disable_current_modes

            t0 = time.perf_counter()
            STATS.interpreting_now = True
            try:
                with _disable_current_modes():
                    self.fn[grid](*args, **bound.constexprs, num_warps=self.num_warps)
            finally:
                STATS.interpreting_now = False
            STATS.device_s += time.perf_counter() - t0
            return
        if _hooked():
            self.fn[grid](*args, **bound.constexprs, num_warps=self.num_warps)
            return
        if bound.template is None:
            self._order(bound)
        # one pass: the launcher's arguments (integer pointers) and Triton's specialisation of each
        full = bound.template[:]
        stream = torch.cuda.current_stream()
        spec = [bound.key, stream.device_index]  # (a kernel is loaded per device)
        for pos, a in zip(bound.arg_pos, args):
            if isinstance(a, torch.Tensor):
                p = a.data_ptr()
                full[pos] = p
                spec.append(a.dtype)
                spec.append(p % 16 == 0)
            else:
                full[pos] = a
                spec.append(_int_spec(a) if type(a) is int else a)
        key = tuple(spec)
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **bound.constexprs, num_warps=self.num_warps)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            self._compiled[key] = kernel
            return
        if not self._lean:
            self.fn[grid](*args, **bound.constexprs, num_warps=self.num_warps)
            return
        g = tuple(grid) + (1, 1)
        try:
            kernel.run(
                g[0], g[1], g[2], stream.cuda_stream, kernel.function, kernel.packed_metadata, None, None, None, *full
            )
        except TypeError:  # a Triton whose launcher takes other arguments: its own launch path from now on
            self._lean = False
            self.fn[grid](*args, **bound.constexprs, num_warps=self.num_warps)

    def _order(self, bound: Bound) -> None:
        """``bound``'s argument template: the kernel's parameters in order, constexprs filled in."""
        template, pos = [], []
        for p in self.fn.params:
            if p.is_constexpr:
                template.append(bound.constexprs[p.name])
            else:
                pos.append(len(template))
                template.append(None)
        bound.arg_pos = pos
        bound.template = template
