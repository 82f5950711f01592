"""Triton kernels for the tiered KV pool (installed as ``sglang_kvc.kernels``).

* ``TritonKVOps``: quantize-on-write + requantize for ``TieredKVPool(layout, ops=TritonKVOps())``.
* ``TieredDecodeWrapper`` (plan/run) / ``decode_attention``: decode over mixed-precision pages.
* ``TieredExtendWrapper`` (plan/run) / ``extend_attention_fwd``: extend over a mixed-tier prefix
  (``dequant``: the prefix unpacked once per layer, then SGLang's Triton extend kernel).
Each kernel module holds its launcher; the torch references are in ``decode_ref`` (attention),
``quantize`` and ``requantize`` (``*_reference``).
"""

from .interpret_compat import apply as _apply_interpret_compat

_apply_interpret_compat()

from .decode import TieredDecodeWrapper, decode_attention  # noqa: E402
from .extend import TieredExtendWrapper, extend_attention_fwd  # noqa: E402
from .ops import TritonKVOps  # noqa: E402
from .spec import KernelSupportError  # noqa: E402

__all__ = ["TritonKVOps", "TieredDecodeWrapper", "decode_attention", "TieredExtendWrapper",
           "extend_attention_fwd", "KernelSupportError"]
