"""Compiling the kernels for a GPU on a machine without one.

Triton's interpreter runs a kernel's Python, not its compilation: a kernel can pass every interpreted test
and still be refused by the compiler (a plain-int global, a loop-carried variable that changes type, an
op the interpreter is lenient with). Triton's front end, LLVM and ``ptxas`` need no GPU, so this module
compiles, for Hopper (``sm_90``), the kernels the interpreted tests launched, with their arguments' types
and constexprs.

- :func:`install` (``tests/conftest.py``, under the interpreter) records each launch's signature.
- :func:`compile_all` (run in a subprocess without ``TRITON_INTERPRET``: Triton decides at import) compiles
  them; ``INTERP`` is set to False and ``ROLE`` to 0, the values a GPU launch takes.
- ``tests/test_zz_compile.py`` (collected last) joins the two.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, Dict, List, Tuple

#: (module, kernel name) -> list of launch signatures [[name, kind, value], ...] (kind "t": a tensor's
#: mangled type, "v": a Python value), num_warps
RECORDED: Dict[Tuple[str, str], List[Any]] = {}
#: signatures kept per kernel (the first ones seen that differ in types or constexprs)
PER_KERNEL = 2
#: constexprs a compiled launch takes whatever the interpreted one had
GPU_CONSTEXPRS = {"INTERP": False, "ROLE": 0}


def install() -> None:
    """Record the signature of every interpreted launch (cheap: one dict lookup after the first few)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    run = InterpretedFunction.run
    if getattr(run, "_deep_ep_recording", False):
        return

    def recording_run(self, *args, grid, warmup, **kwargs):
        key = (self.fn.__module__, self.fn.__name__)
        kept = RECORDED.setdefault(key, [])
        if len(kept) < PER_KERNEL and key[0].startswith("deep_ep."):
            named = dict(zip(self.arg_names, args))
            named.update(kwargs)
            sig = []
            for name, v in named.items():
                if isinstance(v, torch.Tensor):
                    sig.append([name, "t", mangle_type(v)])
                elif isinstance(v, (bool, int, float)) or v is None:
                    sig.append([name, "v", v])
                else:  # a dtype or other constexpr object: named by its text
                    sig.append([name, "s", str(v)])
            entry = [sig, named.get("num_warps", 4)]
            if all(_shape(e, self) != _shape(entry, self) for e in kept):
                kept.append(entry)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run._deep_ep_recording = True
    InterpretedFunction.run = recording_run


_CONSTEXPRS: Dict[Any, set] = {}


def _shape(entry: List[Any], fn: Any) -> List[Any]:
    """A recorded signature with the values of non-constexpr numbers replaced by their types."""
    names = _CONSTEXPRS.get(fn.fn)
    if names is None:
        import inspect

        params = inspect.signature(fn.fn).parameters.items()
        names = _CONSTEXPRS[fn.fn] = {n for n, p in params if "constexpr" in str(p.annotation)}
    return [[n, k, (type(x).__name__ if k == "v" and n not in names else x)] for n, k, x in entry[0]]


def compile_all(path: str) -> List[str]:
    """Compile every signature recorded in the JSON file ``path`` for sm_90; return the failures (kernel,
    constexprs, error). Must run where ``TRITON_INTERPRET`` is unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    with open(path) as f:
        recorded = json.load(f)
    failures: List[str] = []
    target = GPUTarget("cuda", 90, 32)
    for module, name, sig, num_warps in recorded:
        fn = getattr(importlib.import_module(module), name)
        given = {n: (k, v) for n, k, v in sig}
        types: Dict[str, str] = {}
        constexprs: Dict[Tuple[int, ...], Any] = {}
        for i, p in enumerate(fn.params):
            kind, v = given.get(p.name, ("v", p.default))
            if p.is_constexpr:
                v = GPU_CONSTEXPRS.get(p.name, v)
                if kind == "s":
                    v = getattr(triton.language, v.split(".")[-1])
                types[p.name] = "constexpr"
                constexprs[(i,)] = v
            else:
                types[p.name] = v if kind == "t" else mangle_type(v)
        shown = {n: v for (i,), v in constexprs.items() for n in [fn.params[i].name]}
        try:
            triton.compile(ASTSource(fn, types, constexprs=constexprs), target=target, options={"num_warps": num_warps})
        except Exception as e:  # the compiler's message names the line
            failures.append(f"{module}.{name} {shown}: {type(e).__name__}: {e}")
    return failures


if __name__ == "__main__":
    problems = compile_all(sys.argv[1])
    print(f"compiled {len(json.load(open(sys.argv[1])))} signatures for sm_90", file=sys.stderr)
    for line in problems:
        print(line)
    sys.exit(1 if problems else 0)
