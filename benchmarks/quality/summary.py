"""The headline numbers of a quality run, from the merged per-state measurements of
``eval_quality``: perplexity increase and passkey ratio per state (vs bf16), the issue's targets,
and where each scheme breaks (and whether ``-rot`` / ``-kc`` rescue it)."""

from __future__ import annotations

import math
from typing import Dict, Sequence

TARGETS = (  # (metric, state, comparison, bound): the targets
    ("ppl_increase_pct", "k8v8", "<=", 0.5),
    ("ppl_increase_pct", "k4v4", "<=", 2.0),
    ("ppl_increase_pct", "k4v2-rot", "<=", 4.0),
    ("passkey_4k_over_bf16", "k4v2", ">=", 0.99),
)
BROKEN_PPL_PCT = 5.0  # a state "breaks" above this perplexity increase ...
BROKEN_PASSKEY_RATIO = 0.9  # ... or below this share of bf16's passkey accuracy at the longest length


def summarize(merged: Dict, names: Sequence[str], ppl_lengths: Sequence[int], pk_lengths: Sequence[int]) -> Dict:
    """The headline numbers: perplexity increase and passkey ratio per state, target checks and
    where each scheme breaks."""
    states = merged["states"]
    base = states.get("bf16")
    summary: Dict = {"ppl_increase_pct": {}, "passkey_4k_over_bf16": {}, "ppl_increase_pct_by_length": {},
                     "bits_per_element": {}, "attn_rel_err_mean": {}}
    pk_key = "4096" if 4096 in pk_lengths else str(max(pk_lengths)) if pk_lengths else None
    summary["passkey_length_used"] = int(pk_key) if pk_key else None
    for name in names:
        row = states.get(name)
        if row is None:
            continue
        summary["bits_per_element"][name] = round(row["bits_per_element"], 3)
        if name in merged["attn"]:
            summary["attn_rel_err_mean"][name] = sum(merged["attn"][name]) / len(merged["attn"][name])
        if base is None:
            continue
        summary["ppl_increase_pct"][name] = 100 * (math.exp(row["nll_all"] - base["nll_all"]) - 1)
        summary["ppl_increase_pct_by_length"][name] = {
            n: 100 * (row["ppl"][n]["ppl"] / base["ppl"][n]["ppl"] - 1) for n in row["ppl"]}
        if pk_key:
            ref = base["passkey"][pk_key]["acc"]
            summary["passkey_4k_over_bf16"][name] = row["passkey"][pk_key]["acc"] / ref if ref > 0 else None
    checks = []
    for metric, name, op, bound in TARGETS:
        value = summary[metric].get(name)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        checks.append({"metric": metric, "state": name, "target": f"{op} {bound}", "value": value, "met": met})
    summary["targets"] = checks
    breaks = {}
    for name in summary["ppl_increase_pct"]:
        if name == "bf16" or name.startswith("ladder:"):
            continue
        ratio = summary["passkey_4k_over_bf16"].get(name)
        broken = (summary["ppl_increase_pct"][name] > BROKEN_PPL_PCT
                  or (ratio is not None and ratio < BROKEN_PASSKEY_RATIO))
        scheme = name.split("-")[0]
        breaks.setdefault(scheme, {})[name] = "broken" if broken else "ok"
    summary["breaks"] = breaks
    cross = {n: r["kernels_vs_references"]["rel_err_logits"] for n, r in states.items() if "kernels_vs_references" in r}
    summary["kernels_vs_references_max_rel_err"] = max(cross.values()) if cross else None
    summary["hf_check_passed"] = merged["hf_check"]["passed"] if merged.get("hf_check") else None
    summary["broken_if"] = (f"ppl_increase_pct > {BROKEN_PPL_PCT} or passkey_{pk_key}_over_bf16 < "
                            f"{BROKEN_PASSKEY_RATIO}")
    return summary
