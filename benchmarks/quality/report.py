"""Render a quality results JSON (``eval_quality``) as a Markdown table and a plot of each metric
against stored bits per element; ``--update-readme`` rewrites the README section between
``<!-- quality-table -->`` and ``<!-- /quality-table -->`` (appending it under a "Quality"
heading if the markers are missing). Numbers come only from the JSON.

    python -m benchmarks.quality.report benchmarks/results/quality-H100-2026-11-24.json --plot --update-readme
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO_ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- quality-table -->", "<!-- /quality-table -->"


def _fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def family(name: str) -> str:
    if name.startswith("ladder:"):
        return "ladder"
    mods = name.split("-")[1:]
    return {(): "plain", ("rot",): "rot", ("kc",): "kc", ("kc", "rot"): "kc+rot"}.get(tuple(mods), "other")


def markdown_table(result: Dict, source: str = "") -> str:
    """The README section's body: table + targets + the transformers check, from ``result``."""
    summary = result["summary"]
    states = result["states"]
    pk_lengths = sorted({int(n) for row in states.values() for n in row["passkey"]})
    pk_key = str(summary.get("passkey_length_used"))
    header = (["state", "bits/elem", "filled by", "ppl (all lengths)", "ppl +%"] + [f"passkey {n}" for n in pk_lengths]
              + [f"passkey {pk_key} / bf16", "attn err", "verdict"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    broken = {name: verdict for group in summary.get("breaks", {}).values() for name, verdict in group.items()}
    for name, row in sorted(states.items(), key=lambda kv: (-kv[1]["bits_per_element"], kv[0])):
        cells = [f"`{name}`", _fmt(row["bits_per_element"], ".2f"), row["filled_by"],
                 _fmt(math.exp(row["nll_all"]), ".3f"),
                 _fmt(summary["ppl_increase_pct"].get(name), "+.2f")]
        cells += [_fmt(row["passkey"].get(str(n), {}).get("acc"), ".2f") for n in pk_lengths]
        cells += [_fmt(summary["passkey_4k_over_bf16"].get(name), ".3f"),
                  _fmt(summary.get("attn_rel_err_mean", {}).get(name), ".4f", "-"), broken.get(name, "-")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for check in summary.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        notes.append(f"- target `{check['metric']}` of `{check['state']}` {check['target']}: "
                     f"{_fmt(check['value'], '.3f')} ({mark})")
    hf = result.get("hf_check")
    if hf:
        notes.append(f"- bf16 pipeline vs transformers: relative logit error {hf['rel_err_ours_vs_hf_fp32']:.2e} vs "
                     f"fp32 (transformers' own bf16: {hf['rel_err_hf_bf16_vs_hf_fp32']:.2e}), top-1 agreement "
                     f"{hf['top1_agree_ours_vs_hf_bf16']:.3f}: {'passed' if hf['passed'] else 'FAILED'}")
    for name, row in sorted(states.items()):
        cross = row.get("kernels_vs_references")
        if cross and cross["rel_err_logits"] > 0.05:
            notes.append(f"- `{name}`: kernel logits differ from the torch references by {cross['rel_err_logits']:.2e} "
                         f"(relative), top-1 agreement {cross['top1_agree']:.3f}")
    if result.get("errors"):
        notes.append(f"- steps that raised (see the JSON's `errors`): {', '.join(sorted(result['errors']))}")
    if result.get("missing_states"):
        notes.append(f"- not measured (worker failed or timed out): {', '.join(result['missing_states'])}")
    model = result.get("model", {})
    params = model.get("parameters")
    proto = result.get("protocol", {})
    intro = (f"Measured on {result['device']} on {result['date']} ({source or 'results JSON'}): a "
             f"{_fmt(params / 1e6 if params else None, '.0f')}M-parameter Llama trained here for "
             f"{_fmt(model.get('train_s'), '.0f')} s on the stdlib + passkey documents. Perplexity on held-out "
             f"stdlib files (windows of {proto.get('ppl_lengths')} tokens, last {proto.get('ppl_continuation')} "
             f"scored over the compressed prefix), passkey accuracy per context length, attention error = mean "
             f"over layers of ||o - o_bf16|| / ||o_bf16||; verdict: {summary.get('broken_if', '')}.")
    return "\n".join([intro, "", *lines, "", *notes])


def update_readme(readme: Path, body: str) -> None:
    text = readme.read_text()
    block = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Quality\n\n" + block + "\n"
    readme.write_text(text)


def write_plot(result: Dict, path: Path) -> Path:
    """Three panels against bits per element: perplexity increase (symlog %), passkey ratio, and
    mean per-layer attention error (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.plots import save_figure

    summary = result["summary"]
    markers = {"plain": "o", "rot": "s", "kc": "^", "kc+rot": "v", "ladder": "*", "other": "x"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = [("ppl_increase_pct", "perplexity increase vs bf16 (%)"),
              ("passkey_4k_over_bf16", f"passkey accuracy at {summary.get('passkey_length_used')} / bf16"),
              ("attn_rel_err_mean", "attention-output error vs bf16 (mean over layers)")]
    for ax, (metric, label) in zip(axes, panels):
        for fam, marker in markers.items():
            pts = [(summary["bits_per_element"][n], v, n) for n, v in summary.get(metric, {}).items()
                   if v is not None and family(n) == fam and n in summary["bits_per_element"]]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60 if fam == "ladder" else 36,
                       label=fam)
            for x, y, name in pts:
                ax.annotate(name.replace("ladder:", "L:"), (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("stored bits per K/V element (scales included)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if metric == "ppl_increase_pct":
            ax.set_yscale("symlog", linthresh=0.1)
            for bound in (0.5, 2.0, 4.0):
                ax.axhline(bound, color="grey", lw=0.6, ls=":")
        elif metric == "passkey_4k_over_bf16":
            ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        elif ax.collections:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"KV tiers: quality vs size ({result['device']}, {result['date']})")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="quality JSON written by eval_quality")
    p.add_argument("--plot", action="store_true", help="write the PNG beside the JSON")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's quality section")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    args = p.parse_args(argv)
    path = Path(args.results)
    result = json.loads(path.read_text())
    try:
        source = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        source = path.name
    body = markdown_table(result, f"`{source}`")
    print(body)
    if args.plot:
        print(f"wrote {write_plot(result, path.with_suffix('.png'))}")
    if args.update_readme:
        update_readme(Path(args.readme), body)
        print(f"updated {args.readme}")
    return body


if __name__ == "__main__":
    main()
