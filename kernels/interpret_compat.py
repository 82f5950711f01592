"""Interpreter-only fixes for Triton 3.6 (applied only when TRITON_INTERPRET=1; nothing changes
when compiling for a GPU):

* scalars are 1-element numpy arrays converted with ``int(array)``, which numpy >= 2.4 refuses
  for ``ndim > 0``; any ``range(lo, hi)`` with bounds loaded in the kernel then fails.
  ``tensor.__index__`` takes the single element instead.
* bf16 tensors are stored as uint16 and ``tl.dot`` multiplies those bit patterns as integers;
  bf16 dot operands are upcast to float32 first (exact).
* ``x.to(tl.bfloat16)`` from float32 truncates; the GPU rounds to nearest even, so does this.
* ``tl.fma`` is ``x * y + z`` rounded twice; the GPU rounds once (``quant_jit.div_codes`` relies
  on it), so does this: the float64 product of float32s is exact, the sum is rounded to odd
  (TwoSum error, then one step away from an even last bit), and rounding that to float32 is
  correct (53 >= 24 + 2 bits).
"""

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_kvc_patched", False):
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._kvc_patched = True
    interpreter._patch_lang_tensor = patched

    import numpy as np
    import triton.language as tl

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def _upcast(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, _upcast(a), _upcast(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)
            return interpreter.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl

    def create_fma(self, x, y, z):
        if z.dtype.scalar != tl.float32:
            return interpreter.TensorHandle(x.data * y.data + z.data, z.dtype.scalar)
        return interpreter.TensorHandle(fma_float32(x.data, y.data, z.data), tl.float32)

    builder_cls.create_fma = create_fma


def fma_float32(x, y, z):
    """float32 ``x * y + z`` rounded once (numpy arrays)."""
    import numpy as np

    x64, y64, z64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (x, y, z))
    product = x64 * y64  # exact: 48 bits
    with np.errstate(invalid="ignore", over="ignore"):
        total = product + z64
        back = total - z64
        error = (product - back) + (z64 - (total - back))  # TwoSum: total + error == product + z
        inexact_even = np.isfinite(total) & (error != 0) & ((total.view(np.int64) & 1) == 0)
        total = np.where(inexact_even, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)
