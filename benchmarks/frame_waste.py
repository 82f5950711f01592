"""Packing waste of every tier in a frame, per frame size and head_dim: the table the frame size
(``--kvc-frame-pages``, default 4 bf16 pages) was chosen from. Pure arithmetic on the real layout
(``FrameLayout``), no device.

    .venv/bin/python -m benchmarks.frame_waste [--update-readme]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sglang_kvc.layout import DEFAULT_FRAME_PAGES, FrameLayout, KVShape  # noqa: E402
from sglang_kvc.tiers import parse_ladder  # noqa: E402

TIERS = "bf16,k8v8,k4v4,k4v2,k2v2"
FRAME_PAGES = (1, 2, 4, 8)
HEAD_DIMS = (64, 128)
PAGE_SIZE = 16
README_MARKERS = ("<!-- frame-waste-table -->", "<!-- /frame-waste-table -->")


def waste_rows():
    """One row per (head_dim, frame size): pages per frame and waste share of every tier."""
    rows = []
    for head_dim in HEAD_DIMS:
        for frame_pages in FRAME_PAGES:
            layout = FrameLayout.from_frames(parse_ladder(TIERS), KVShape(1, 8, head_dim), PAGE_SIZE, 1, frame_pages)
            rows.append({"head_dim": head_dim, "frame_pages": frame_pages,
                         "tiers": {r["tier"]: {"pages_per_frame": r["pages_per_frame"],
                                               "waste": r["packing_waste"]} for r in layout.report()}})
    return rows


def markdown(rows) -> str:
    names = TIERS.split(",")[1:]
    lines = [f"Pages of each tier per frame and the share of the frame left unused (page {PAGE_SIZE}, group 64, "
             f"`benchmarks/frame_waste.py`); the default frame is {DEFAULT_FRAME_PAGES} bf16 pages.", "",
             "| head_dim | frame (bf16 pages) | " + " | ".join(names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for row in rows:
        cells = [f"{row['tiers'][n]['pages_per_frame']} ({row['tiers'][n]['waste']:.0%})" for n in names]
        lines.append(f"| {row['head_dim']} | {row['frame_pages']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(table: str, path: str = os.path.join(ROOT, "README.md")) -> None:
    with open(path) as f:
        text = f.read()
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{table}\n{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    rows = waste_rows()
    date = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"frame_waste-{date}.json")
    with open(path, "w") as f:
        json.dump({"date": date, "command": " ".join(["python -m benchmarks.frame_waste"] + list(sys.argv[1:] if argv is None else argv)),
                   "page_size": PAGE_SIZE, "rows": rows}, f, indent=1)
    table = markdown(rows)
    print(table)
    if args.update_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
