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

from ..settings import env_raw

__all__ = ["Launcher", "STATS", "interpreting"]


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


class Launcher:
    """One ``@triton.jit`` kernel, launched leanly (see the module docstring).

    Args:
        fn: the kernel.
        num_warps: warps per program.
    """

    def __init__(self, fn: Any, num_warps: int = 4) -> None:
        self.fn = fn
        self.num_warps = num_warps
        self._compiled: Dict[Tuple, Any] = {}
        self._names = None
        self._interp: Any = None
        self._lean = True

    def __call__(self, grid: Tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        """Launch ``fn[grid](*args, **constexprs, num_warps=...)``: positional ``args`` are the kernel's
        non-constexpr parameters in order, ``constexprs`` its constexpr ones by name."""
        STATS.launches += 1
        if self._interp is None:  # fixed for the process once Triton is imported (read once, not per launch)
            self._interp = interpreting()
        if self._interp:
            # the interpreter's emulation is the device's work: outside any dispatch mode (op counters)
            from torch.utils._python_dispatch import _disable_current_modes

            t0 = time.perf_counter()
            STATS.interpreting_now = True
            try:
                with _disable_current_modes():
                    self.fn[grid](*args, **constexprs, num_warps=self.num_warps)
            finally:
                STATS.interpreting_now = False
            STATS.device_s += time.perf_counter() - t0
            return
        from triton import knobs

        if knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None:
            self.fn[grid](*args, **constexprs, num_warps=self.num_warps)
            return
        key = (tuple(constexprs.items()),) + tuple(
            (a.dtype, a.data_ptr() % 16 == 0)
            if isinstance(a, torch.Tensor)
            else _int_spec(a)
            if isinstance(a, int) and not isinstance(a, bool)
            else a
            for a in args
        )
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **constexprs, num_warps=self.num_warps)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            self._compiled[key] = kernel
            self._order = self._param_order(constexprs)
            return
        if not self._lean:
            self.fn[grid](*args, **constexprs, num_warps=self.num_warps)
            return
        full = self._full_args(args, constexprs)
        g = tuple(grid) + (1, 1)
        stream = torch.cuda.current_stream().cuda_stream
        try:
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *full)
        except TypeError:  # a Triton whose launcher takes other arguments: its own launch path from now on
            self._lean = False
            self.fn[grid](*args, **constexprs, num_warps=self.num_warps)

    def _param_order(self, constexprs: Dict[str, Any]):
        """For each kernel parameter in order: its index among the positional args, or its constexpr name."""
        order = []
        i = 0
        for p in self.fn.params:
            if p.is_constexpr:
                order.append(("c", p.name))
            else:
                order.append(("a", i))
                i += 1
        return order

    def _full_args(self, args, constexprs):
        out = []
        for kind, v in self._order:
            if kind == "a":
                a = args[v]
                out.append(a.data_ptr() if isinstance(a, torch.Tensor) else a)
            else:
                out.append(constexprs[v])
        return out
