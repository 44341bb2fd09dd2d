"""Running deep_ep's Triton kernels under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU.

The interpreter runs each program of a grid in numpy, with the kernel's pointers as raw addresses of
CPU memory, so a kernel's loads, stores, atomics and flag spins touch the same bytes as on a GPU.
Triton 3.6's interpreter departs from the GPU in three places that our kernels meet; :func:`install`
fixes them (it changes nothing outside the interpreter; the test session and every use of
``DEEP_EP_KERNELS_ON_CPU=1`` install it):

- float conversions (float32 -> bfloat16, float32 <-> float8 e4m3 / e5m2): the interpreter truncates
  to bfloat16 and rounds float8 half-up without carrying into the exponent; the GPU rounds to
  nearest even. :func:`install` converts with torch, which rounds as the GPU does (the codecs' torch
  references use the same conversions, and the GPU kernels are tested equal to them);
- ``tensor.__index__`` (a loop whose bounds are kernel arguments, ``range(pid, n, step)``): numpy >= 2.4
  refuses to turn the interpreter's one-element arrays into ints;
- nothing else: every other operation our kernels use runs as on the GPU.

``enabled()`` says whether this process interprets kernels (``TRITON_INTERPRET=1`` when Triton was
imported); the kernel tests run only then, or on CUDA.
"""

from __future__ import annotations

from .launch import interpreting

__all__ = ["enabled", "install"]

_INSTALLED = False


def enabled() -> bool:
    """Whether Triton kernels run under the interpreter in this process (``TRITON_INTERPRET=1``)."""
    return interpreting()


def _torch_dtype(tt):
    import torch
    import triton.language as tl

    table = {
        tl.float32: torch.float32,
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
        tl.float64: torch.float64,
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
    }
    return table.get(tt)


def install() -> None:
    """Patch Triton's interpreter as the module docstring says (idempotent; needs Triton importable)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import numpy as np
    import torch
    from triton.runtime import interpreter as it

    original_convert = it._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        src, dst = _torch_dtype(input_dtype), _torch_dtype(output_dtype)
        rtz = rounding_mode is not None and getattr(rounding_mode, "name", str(rounding_mode)).upper().endswith("RTZ")
        if src is None or dst is None or rtz:
            return original_convert(data, input_dtype, output_dtype, rounding_mode)
        arr = np.ascontiguousarray(data)
        shape = arr.shape
        t = torch.from_numpy(arr.reshape(-1).copy()).view(src)
        out = t.to(dst)
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
        bits = out.view(width).numpy()
        unsigned = getattr(np, f"uint{8 * out.element_size()}")
        return bits.view(unsigned).reshape(shape)

    it._convert_float = convert

    original_patch = it._patch_lang_tensor

    def patch_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    it._patch_lang_tensor = patch_tensor
    _INSTALLED = True
