"""Plots saved small: the results directory travels with every GPU call (64 MiB with the SGLang kit),
and a matplotlib PNG of line plots keeps its pixels in a 128-colour palette at a third of the bytes.

``python -m benchmarks.plots FILE.png ...`` rewrites existing PNGs the same way.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import List, Optional

PALETTE_COLORS = 128


def compact_png(data: bytes) -> bytes:
    """PNG bytes re-encoded with an adaptive palette of PALETTE_COLORS colours, optimized."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=PALETTE_COLORS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """``fig.savefig(path, dpi=dpi)`` as a palette PNG (``compact_png``)."""
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=dpi)
    with open(path, "wb") as handle:
        handle.write(compact_png(raw.getvalue()))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="PNG files to rewrite in place")
    args = parser.parse_args(argv)
    for path in args.paths:
        with open(path, "rb") as handle:
            before = handle.read()
        after = compact_png(before)
        if len(after) < len(before):
            with open(path, "wb") as handle:
                handle.write(after)
        print(f"{path}: {len(before)} -> {min(len(after), len(before))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
