"""Triton kernels for the tiered KV pool (installed as ``sglang_kvc.kernels``)."""

from .interpret_compat import apply as _apply_interpret_compat

_apply_interpret_compat()
