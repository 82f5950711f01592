"""What an e2e result JSON says: the summary ratios and plots (``benchmarks/e2e.py`` writes them
after every system) and markdown tables for the README, also of the cache simulator's summary.

    python benchmarks/results_table.py benchmarks/results/e2e-*.json                 # print
    python benchmarks/results_table.py benchmarks/results/e2e-*.json --update-readme # rewrite README.md

``--update-readme [PATH]`` replaces what lies between ``<!-- e2e-table -->`` and
``<!-- /e2e-table -->`` (cache_sim JSONs: ``<!-- cache-sim-table -->`` ... ``<!-- /cache-sim-table -->``)
and leaves the rest of the file byte for byte; a missing marker pair is appended as a new section.
An e2e table has one row per system (``nopressure:`` rows at their own budget, the CUDA-graph setting
of each) and the summary's sentences (SUMMARY_KEYS, ``nopressure_cuda_graphs``, ``notes``).
Every number comes from the JSON; nothing is typed in by hand. Runs on the CPU machine (the e2e
JSON comes back from the GPU calls of ``benchmarks/gpu_e2e.sh``); matplotlib is imported only to plot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SUMMARY_KEYS = ("kvc_admitted_over_stock_bf16", "refused_requests", "ttft_late_p50_bf16_over_kvc",
                "ttft_late_p50_fp8_over_kvc", "throughput_kvc_over_fp8", "nopressure_throughput_kvc_over_bf16",
                "shared_prefix_kvc_over_fp8", "kvc_cuda_graphs", "demotion_gpu_share", "compaction_gpu_share",
                "cache_host_share", "cache_host_syncs_per_s", "cache_host_sync_share", "demotion_yield",
                "cache_host_phase_shares", "cache_host_us_per_moved_token")
DEFINITIONS = {
    "kvc_admitted_over_stock_bf16": "max_total_num_tokens the scheduler admits against (server logs): best kvc / "
                                    "stock-bf16 at the same budget",
    "refused_requests": "agentic requests that got an error (refused or failed; not those the client skipped at "
                        "its timeout), summed over every kvc system in this JSON",
    "ttft_late_p50_bf16_over_kvc": "agentic TTFT p50 over late rounds: stock-bf16 / best kvc",
    "ttft_late_p50_fp8_over_kvc": "agentic TTFT p50 over late rounds: stock-fp8 / best kvc",
    "throughput_kvc_over_fp8": "agentic output tokens/s (first send to last reply): best kvc / stock-fp8",
    "nopressure_throughput_kvc_over_bf16": "agentic output tokens/s at the no-pressure budget (>= the working set): "
                                           "nopressure:<best ladder> / nopressure:stock-bf16, same CUDA-graph "
                                           "setting (nopressure_cuda_graphs)",
    "shared_prefix_kvc_over_fp8": "shared-prefix output tokens/s (bench_serving): best kvc / stock-fp8",
    "kvc_cuda_graphs": "the best kvc system's server log shows decode batches run on a CUDA graph",
    "gpu_time_by_group": "per system run with e2e.py --profile-steps: share of GPU kernel time by kernel group "
                         "(benchmarks/step_profile.py: attention, kv_dequantize, kv_write, requantize, plan, gemm, "
                         "other) over a torch-profiler sample of steps under one burst of requests",
    "demotion_gpu_share": "best kvc, agentic benchmark: GPU seconds of requantize launches (demotion; CUDA events, "
                          "sglang:kvc_move_gpu_seconds) / the benchmark's wall seconds",
    "compaction_gpu_share": "as demotion_gpu_share, for compaction copies",
    "cache_host_share": "best kvc, agentic benchmark: scheduler seconds in evict/keep_watermark (host syncs "
                        "included, sglang:kvc_cache_host_seconds) / the benchmark's wall seconds",
    "cache_host_syncs_per_s": "best kvc, agentic benchmark: device-to-host reads the cache made on the scheduler's "
                              "thread (sglang:kvc_cache_host_syncs; each waits for the GPU's queued work) / the "
                              "benchmark's wall seconds",
    "cache_host_phase_shares": "best kvc, agentic benchmark: the scheduler's time making room by phase "
                               "(sglang:kvc_cache_host_phase_seconds), each over the wall time",
    "cache_host_us_per_moved_token": "best kvc, agentic benchmark: scheduler microseconds making room "
                                     "(sglang:kvc_cache_host_seconds) per token demoted, dropped or compacted",
    "demotion_yield": "best kvc, agentic benchmark: hit tokens served from lower tiers per token demoted out of the "
                      "write tier (what --kvc-min-demotion-yield compares)",
    "cache_host_sync_share": "best kvc, agentic benchmark: scheduler seconds inside those device-to-host reads "
                             "(sglang:kvc_cache_host_sync_seconds, part of cache_host_share) / the benchmark's wall "
                             "seconds; None for servers that did not export it",
}
NOPRESSURE_PREFIX = "nopressure:"
BF16_NAMES = ("bf16", "bfloat16", "torch.bfloat16")
MARKERS = {"e2e": ("<!-- e2e-table -->", "<!-- /e2e-table -->", "End-to-end results"),
           "cache_sim": ("<!-- cache-sim-table -->", "<!-- /cache-sim-table -->", "Cache simulator results")}


# ---- summary ratios and plots of an e2e result -------------------------------------------------
def _get(record: Optional[dict], *path):
    value = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ratio(numerator, denominator) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 4)


def late_ttft_p50(record: Optional[dict]) -> Optional[float]:
    return _get(record, "agentic", "summary", "late", "ttft_p50_s")


def agentic_throughput(record: Optional[dict]) -> Optional[float]:
    return _get(record, "agentic", "summary", "overall", "output_throughput_tok_s")


def shared_prefix_throughput(record: Optional[dict]) -> Optional[float]:
    return _get(record, "shared_prefix", "metrics", "output_throughput")


def is_nopressure(name: str, record: dict) -> bool:
    return bool(record.get("nopressure")) or name.startswith(NOPRESSURE_PREFIX)


def admitted_tokens(record: Optional[dict]) -> Optional[int]:
    """max_total_num_tokens of ``record``'s server as its log states it (e2e.py ``summarize_log``;
    JSONs written before ``admitted_tokens`` existed: SGLang's last max_total_num_tokens line)."""
    stated = _get(record, "log_summary", "admitted_tokens")
    return stated or (_get(record, "log_summary", "max_total_num_tokens") or [None])[-1]


def refused_requests(record: Optional[dict]) -> Optional[int]:
    """Agentic requests of ``record`` that got an error from the server; requests the client skipped
    at its timeout do not count. None when the agentic benchmark did not run."""
    agentic = (record or {}).get("agentic") or {}
    requests = agentic.get("requests")
    if requests is not None:
        return sum(1 for r in requests if r.get("error") and not str(r["error"]).startswith("skipped"))
    return _get(agentic, "summary", "overall", "errors")


def admitted_over_stock_bf16(kvc: dict, bf16: Optional[dict]) -> Tuple[Optional[float], Optional[str]]:
    """(kvc's admitted tokens / stock-bf16's, note). Without a stock-bf16 log in the JSON the
    denominator is the bf16 token count sglang-kvc's start-up line states for the budget, and the
    note says so."""
    if admitted_tokens(bf16):
        return _ratio(admitted_tokens(kvc), admitted_tokens(bf16)), None
    stated = _get(kvc, "log_summary", "kvc_stock_tokens")
    if stated and _get(kvc, "log_summary", "kvc_stock_dtype") in BF16_NAMES:
        return _ratio(admitted_tokens(kvc), stated), (
            f"kvc_admitted_over_stock_bf16: stock-bf16 did not run in this JSON; the denominator is the "
            f"{stated} bf16 tokens that {kvc.get('name', 'kvc')}'s start-up line states for the budget")
    return None, None


def ratios_against(kvc: dict, systems: dict) -> dict:
    bf16, fp8, hicache = systems.get("stock-bf16"), systems.get("stock-fp8"), systems.get("stock-hicache")
    return {
        "kvc_admitted_over_stock_bf16": admitted_over_stock_bf16(kvc, bf16)[0],
        "refused_requests": refused_requests(kvc),
        "ttft_late_p50_bf16_over_kvc": _ratio(late_ttft_p50(bf16), late_ttft_p50(kvc)),
        "ttft_late_p50_fp8_over_kvc": _ratio(late_ttft_p50(fp8), late_ttft_p50(kvc)),
        "throughput_kvc_over_fp8": _ratio(agentic_throughput(kvc), agentic_throughput(fp8)),
        "shared_prefix_kvc_over_fp8": _ratio(shared_prefix_throughput(kvc), shared_prefix_throughput(fp8)),
        "ttft_late_p50_hicache_over_kvc": _ratio(late_ttft_p50(hicache), late_ttft_p50(kvc)),
        "shared_prefix_ttft_p50_fp8_over_kvc": _ratio(_get(fp8, "shared_prefix", "metrics", "median_ttft_ms"),
                                                      _get(kvc, "shared_prefix", "metrics", "median_ttft_ms")),
        "kvc_cuda_graphs": decode_graphs_used(kvc),
        **time_shares(kvc),
        "hit_ratio_kvc": _get(kvc, "agentic", "summary", "overall", "hit_ratio"),
        "hit_ratio_fp8": _get(fp8, "agentic", "summary", "overall", "hit_ratio"),
        "hit_ratio_bf16": _get(bf16, "agentic", "summary", "overall", "hit_ratio"),
    }


def cuda_graphs_of(record: dict) -> str:
    """The CUDA-graph setting a system ran with, and whether its log agrees (batches on a graph)."""
    setting = record.get("cuda_graphs") or "?"
    on = (_get(record, "log_summary", "cuda_graph_batches") or {}).get("on")
    if setting == "off" and on:
        return f"off, but {on} batches ran on a CUDA graph"
    if setting not in ("off", "?") and on == 0:
        return f"{setting}, but no batch ran on a CUDA graph"
    return setting


def decode_graphs_used(record: Optional[dict]) -> Optional[bool]:
    batches = _get(record, "log_summary", "cuda_graph_batches")
    if not batches:
        return None
    return (batches.get("decode_on", batches.get("on")) or 0) > 0


def time_shares(record: Optional[dict]) -> dict:
    """Shares of the agentic benchmark's wall time spent moving pages on the GPU and making room on
    the scheduler (None where the server did not export the series)."""
    step = _get(record, "agentic") or {}
    wall, deltas = step.get("wall_s"), step.get("metrics_delta") or {}
    exported = " ".join((record or {}).get("kvc_metrics_end") or {})

    def share(name: str, kind: Optional[str] = None) -> Optional[float]:
        if not wall or name not in exported:
            return None
        amount = sum(v for k, v in deltas.items() if k.startswith(name) and (kind is None or f'kind="{kind}"' in k))
        return round(amount / wall, 4)

    return {"demotion_gpu_share": share("sglang:kvc_move_gpu_seconds", "requantize"),
            "compaction_gpu_share": share("sglang:kvc_move_gpu_seconds", "compaction"),
            "cache_host_share": share("sglang:kvc_cache_host_seconds"),
            "cache_host_syncs_per_s": share("sglang:kvc_cache_host_syncs"),
            "cache_host_sync_share": share("sglang:kvc_cache_host_sync_seconds"),
            "demotion_yield": demotion_yield(record),
            "cache_host_phase_shares": host_phase_shares(deltas, wall),
            "cache_host_us_per_moved_token": host_us_per_moved_token(deltas, exported)}


def host_us_per_moved_token(deltas: Dict[str, float], exported: str) -> Optional[float]:
    """The cache's scheduler microseconds per token it demoted, dropped or compacted over the benchmark
    (None without the series or without a moved token)."""
    if "sglang:kvc_cache_host_seconds" not in exported:
        return None
    seconds = sum(v for k, v in deltas.items() if k.startswith("sglang:kvc_cache_host_seconds"))
    moved = sum(v for k, v in deltas.items()
                if re.match(r"sglang:kvc_(demoted|dropped|compacted)_tokens_total", k))
    return round(1e6 * seconds / moved, 3) if moved else None


def host_phase_shares(deltas: Dict[str, float], wall: Optional[float]) -> Optional[Dict[str, float]]:
    """Shares of the wall time the cache's scheduler time took, by phase (None without the series)."""
    phases = {}
    for key, seconds in deltas.items():
        match = re.search(r'phase="([^"]+)"', key) if key.startswith("sglang:kvc_cache_host_phase_seconds") else None
        if match:
            phases[match.group(1)] = phases.get(match.group(1), 0.0) + seconds
    return {phase: round(seconds / wall, 4) for phase, seconds in phases.items()} if phases and wall else None


def demotion_yield(record: Optional[dict]) -> Optional[float]:
    """Lower-tier hit tokens per token demoted out of the write tier over the agentic benchmark (None
    without demotions or the series)."""
    tiers = ((record or {}).get("ladder") or "").split(",")
    deltas = (_get(record, "agentic") or {}).get("metrics_delta") or {}
    if len(tiers) < 2:
        return None
    hits = sum(v for k, v in deltas.items() if k.startswith("sglang:kvc_hit_tokens") and f'tier="{tiers[0]}"' not in k)
    demoted = sum(v for k, v in deltas.items()
                  if k.startswith("sglang:kvc_demoted_tokens") and f'tier="{tiers[1]}"' in k)
    return round(hits / demoted, 3) if demoted else None


def nopressure_summary(systems: Dict[str, dict], best: Optional[str]) -> dict:
    """The no-pressure pair: nopressure:<best ladder> (else the first no-pressure kvc system that ran
    the agentic benchmark) against nopressure:stock-bf16, and the CUDA-graph setting of both."""
    kvc_names = [n for n, r in systems.items() if is_nopressure(n, r) and r.get("kind") == "kvc"
                 and agentic_throughput(r) is not None]
    preferred = NOPRESSURE_PREFIX + best if best else None
    kvc_name = preferred if preferred in kvc_names else (kvc_names[0] if kvc_names else None)
    kvc, bf16 = systems.get(kvc_name) if kvc_name else None, systems.get(NOPRESSURE_PREFIX + "stock-bf16")
    out = {"nopressure_kvc_system": kvc_name,
           "nopressure_throughput_kvc_over_bf16": _ratio(agentic_throughput(kvc), agentic_throughput(bf16)),
           "nopressure_cuda_graphs": None}
    if kvc and bf16:
        graphs = {cuda_graphs_of(kvc), cuda_graphs_of(bf16)}
        out["nopressure_cuda_graphs"] = (f"{graphs.pop()} for both" if len(graphs) == 1 else
                                         f"differ: {kvc_name} {cuda_graphs_of(kvc)}, stock-bf16 {cuda_graphs_of(bf16)}")
    return out


def compute_summary(systems: Dict[str, dict]) -> dict:
    """The headline ratios for the best sglang-kvc ladder: the kvc system (under pressure) with the
    lowest late-round agentic TTFT p50 among those whose agentic benchmark had no failed request.
    Every ratio is stock / kvc for times (> 1: kvc faster) and kvc / stock for throughputs and
    admitted tokens (> 1: kvc more); None when a side is missing. ``refused_requests`` sums every
    kvc system (no-pressure ones too); ``per_kvc_system`` holds the ratios for every ladder under
    pressure. ``notes`` says where a number stands on something other than its definition."""
    pressure = {name: rec for name, rec in systems.items() if not is_nopressure(name, rec)}
    kvc_systems = {name: rec for name, rec in pressure.items() if rec.get("kind") == "kvc"}
    candidates = {name: rec for name, rec in kvc_systems.items()
                  if late_ttft_p50(rec) is not None and not _get(rec, "agentic", "error")}
    summary: Dict[str, object] = {key: None for key in SUMMARY_KEYS}
    summary["best_kvc_system"] = None
    summary["best_rule"] = "kvc system with the lowest late-round agentic TTFT p50 and no failed agentic request"
    summary["definitions"] = dict(DEFINITIONS)
    summary["per_kvc_system"] = {name: ratios_against(rec, systems) for name, rec in kvc_systems.items()}
    notes: List[str] = []
    best = min(candidates, key=lambda name: late_ttft_p50(candidates[name])) if candidates else None
    if best:
        summary["best_kvc_system"] = best
        summary.update(ratios_against(candidates[best], systems))
    headline = best or next(iter(kvc_systems), None)
    if headline:
        summary["kvc_admitted_over_stock_bf16"], note = admitted_over_stock_bf16(kvc_systems[headline],
                                                                                 systems.get("stock-bf16"))
        notes += [note] if note else []
        if headline != best:
            notes.append(f"kvc_admitted_over_stock_bf16 is {headline}'s: no kvc system qualified as best")
    refused = {name: refused_requests(rec) for name, rec in systems.items() if rec.get("kind") == "kvc"}
    counted = [count for count in refused.values() if count is not None]
    summary["refused_requests"] = sum(counted) if counted else None
    summary["refused_requests_per_system"] = refused
    summary.update(nopressure_summary(systems, best))
    summary["gpu_time_by_group"] = {name: rec["profile"]["groups_share"] for name, rec in systems.items()
                                    if (rec.get("profile") or {}).get("groups_share")}
    summary["missing"] = [name for name in ("stock-bf16", "stock-fp8", NOPRESSURE_PREFIX + "stock-bf16")
                          if systems.get(name, {}).get("status") != "done"] + \
        ([] if candidates else ["kvc=<any ladder>"]) + \
        ([] if summary["nopressure_kvc_system"] else [NOPRESSURE_PREFIX + "kvc=<any ladder>"])
    summary["notes"] = notes + partial_stock_notes(systems)
    return summary


def partial_stock_notes(systems: Dict[str, dict]) -> List[str]:
    """One note per stock system whose run was cut short: the ratios against it stand on the requests
    that finished (``agentic.error`` says how many did not)."""
    notes = []
    for name in ("stock-bf16", "stock-fp8", "stock-hicache"):
        record = systems.get(name)
        if record and record.get("status") == "partial" and late_ttft_p50(record) is not None:
            notes.append(f"{name} was cut short at the call's time budget "
                         f"({_get(record, 'agentic', 'error') or 'no agentic error recorded'}); "
                         f"the ratios against it stand on the requests that finished")
    return notes


def plot_results(result: dict, stem: str) -> List[str]:
    """``<stem>-ttft.png`` (agentic TTFT p50 per round, p90 dashed) and ``<stem>-throughput.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.plots import save_figure

    systems = {n: r for n, r in result["systems"].items() if _get(r, "agentic", "summary")}
    paths = []
    if systems:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for index, (name, record) in enumerate(systems.items()):
            rounds = record["agentic"]["summary"]["per_round"]
            xs = [r["round"] for r in rounds if r["ttft_p50_s"] is not None]
            color = f"C{index}"
            ax.plot(xs, [r["ttft_p50_s"] * 1000 for r in rounds if r["ttft_p50_s"] is not None], "o-", color=color,
                    label=f"{name} p50")
            ax.plot(xs, [r["ttft_p90_s"] * 1000 for r in rounds if r["ttft_p90_s"] is not None], "--", color=color,
                    alpha=0.6)
        ax.set(title=f"agentic multi-turn: TTFT per round (p50, p90 dashed), {result['device']}",
               xlabel="round", ylabel="TTFT (ms)", yscale="log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(f"{stem}-ttft.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    names = list(result["systems"])
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, (title, getter) in zip(axes, (("agentic output tok/s", agentic_throughput),
                                              ("shared-prefix output tok/s", shared_prefix_throughput))):
            values = [getter(result["systems"][n]) or 0.0 for n in names]
            ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set(title=title)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(f"{stem}-throughput.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---- markdown ------------------------------------------------------------------------------------------
def kind_of(result: dict) -> str:
    if isinstance(result.get("systems"), dict):
        return "e2e"
    if "runs" in result and isinstance(result.get("summary"), dict):
        return "cache_sim"
    raise ValueError("not an e2e or cache_sim result JSON")


def _ms(seconds: Optional[float]) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}"


def _num(value: Optional[float], fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _x(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


def pool_tokens(record: dict) -> Optional[int]:
    """Tokens the scheduler admits against (max_total_num_tokens from the server log; the
    ``--max-total-tokens`` flag when the log has none)."""
    return admitted_tokens(record) or record.get("max_total_tokens")


def budget_text(budget: dict, fraction, what: str) -> str:
    return (f"{_num((budget.get('budget_bytes') or 0) / (1 << 30), '{:.2f}')} GiB ({_num(budget.get('bf16_tokens'))} "
            f"bf16 tokens = {fraction} of {what} of {_num(budget.get('agentic_working_set_tokens'))} tokens)")


def per_kvc_sentences(result: dict) -> List[str]:
    """Each kvc system's scheduler share making room and its time per moved token over the agentic
    benchmark (the summary's shares are the best system's only, as of the run)."""
    kvc = {n: r for n, r in result.get("systems", {}).items() if n.startswith("kvc=") and _get(r, "agentic", "summary")}
    parts = []
    for name, record in kvc.items():
        shares = time_shares(record)
        if shares["cache_host_share"] is None:
            continue
        per_token = shares["cache_host_us_per_moved_token"]
        parts.append(f"`{name}` {100 * shares['cache_host_share']:.2f}%"
                     + (f" ({per_token:.2f} us a moved token)" if per_token is not None else ""))
    return [f"Scheduler making room per kvc system (agentic, share of wall time): {', '.join(parts)}."] if parts else []


def summary_sentences(summary: dict) -> List[str]:
    lines = []
    best = summary.get("best_kvc_system")
    if best:
        lines.append(f"Best ladder `{best}`: late-round TTFT p50, stock over kvc (above 1: kvc is faster): "
                     f"bf16 {_x(summary.get('ttft_late_p50_bf16_over_kvc'))}, fp8 "
                     f"{_x(summary.get('ttft_late_p50_fp8_over_kvc'))}; output throughput, kvc over stock fp8: "
                     f"agentic {_x(summary.get('throughput_kvc_over_fp8'))}, shared-prefix "
                     f"{_x(summary.get('shared_prefix_kvc_over_fp8'))}; admits "
                     f"{_x(summary.get('kvc_admitted_over_stock_bf16'))} stock bf16's tokens.")
    if summary.get("refused_requests") is not None:
        lines.append(f"Requests refused or failed over every kvc system: {summary['refused_requests']}.")
    if summary.get("demotion_gpu_share") is not None:
        lines.append(f"Where kvc's time goes (agentic, share of wall time): demotion on the GPU "
                     f"{100 * summary['demotion_gpu_share']:.2f}%, compaction "
                     f"{100 * (summary.get('compaction_gpu_share') or 0):.2f}%, scheduler making room "
                     f"{100 * (summary.get('cache_host_share') or 0):.2f}%"
                     + (f" ({summary['cache_host_syncs_per_s']:.1f} host syncs a second"
                        + (f", {100 * summary['cache_host_sync_share']:.2f}% inside them"
                           if summary.get("cache_host_sync_share") is not None else "") + ")"
                        if summary.get("cache_host_syncs_per_s") is not None else "")
                     + "; decode on CUDA graphs: "
                     f"{'yes' if summary.get('kvc_cuda_graphs') else 'no'}"
                     + (f"; lower-tier hit tokens per demoted token {summary['demotion_yield']:.2f}"
                        if summary.get("demotion_yield") is not None else "")
                     + (f"; {summary['cache_host_us_per_moved_token']:.2f} us of scheduler time a moved token"
                        if summary.get("cache_host_us_per_moved_token") is not None else "") + ".")
    if summary.get("cache_host_phase_shares"):
        parts = ", ".join(f"{phase} {100 * share:.2f}%" for phase, share in
                          sorted(summary["cache_host_phase_shares"].items(), key=lambda kv: -kv[1]))
        lines.append(f"The scheduler's time making room, by phase (share of wall time): {parts}.")
    for name, shares in (summary.get("gpu_time_by_group") or {}).items():
        parts = ", ".join(f"{group} {100 * share:.1f}%" for group, share in sorted(shares.items(), key=lambda kv: -kv[1]))
        lines.append(f"GPU kernel time of `{name}` over its profiled steps (benchmarks/step_profile.py): {parts}.")
    if summary.get("nopressure_kvc_system"):
        graphs = summary.get("nopressure_cuda_graphs") or "?"
        lines.append(f"No pressure (budget >= working set, CUDA graphs {graphs}): "
                     f"`{summary['nopressure_kvc_system']}` agentic output throughput "
                     f"{_x(summary.get('nopressure_throughput_kvc_over_bf16'))} stock bf16's.")
    return lines + [f"Note: {note}." for note in summary.get("notes") or []]


def throughput_ceiling(result: dict) -> Optional[Tuple[float, float, float]]:
    """(the agentic trace's waiting floor s, stock-fp8's agentic duration s, their ratio: the most any
    server could beat fp8's agentic output throughput by on this trace), None without fp8 or trace or
    when the trace does not wait (``--time-scale 0``)."""
    params = _get(result, "settings", "trace")
    duration = _get(result, "systems", "stock-fp8", "agentic", "summary", "overall", "duration_s")
    if not params or not duration:
        return None
    from benchmarks.traces import scaled_agentic_trace

    time_scale = _get(result, "settings", "time_scale")
    floor = scaled_agentic_trace(params, 1.0 if time_scale is None else time_scale).waiting_floor_s
    return (floor, duration, duration / floor) if floor > 0 else None


def render_e2e(result: dict) -> str:
    settings = result.get("settings", {})
    nopressure = settings.get("nopressure") or {}
    commit = _get(result, "versions", "sglang_kvc_commit") or "?"
    size = settings.get("model_size", "?")
    budget = budget_text(settings.get("budget", {}), settings.get("budget_fraction", "?"), "the agentic working set")
    header = (f"{result.get('device', '?')}, {result.get('date', '?')}, sglang-kvc `{commit}`, random Llama {size}; "
              f"KV budget {budget} for every system")
    if any(is_nopressure(n, r) for n, r in result["systems"].items()):
        header += (f"; `nopressure:` rows "
                   f"{budget_text(nopressure.get('budget', {}), nopressure.get('fraction', '?'), 'their working set')}")
    lines = [header + ".", "",
             "| system | max_total_num_tokens | CUDA graphs | agentic TTFT p50 / p90, late rounds (ms) | TPOT p50 (ms) "
             "| agentic output tok/s | agentic cache hit | shared-prefix output tok/s | shared-prefix TTFT p50 (ms) "
             "| status |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, record in result["systems"].items():
        late = _get(record, "agentic", "summary", "late") or {}
        overall = _get(record, "agentic", "summary", "overall") or {}
        shared = _get(record, "shared_prefix", "metrics") or {}
        hit = overall.get("hit_ratio")
        host = f" + {record['host_kv_bytes'] / record['kv_budget_bytes']:g}x on host" \
            if record.get("host_kv_bytes") and record.get("kv_budget_bytes") else ""
        lines.append(f"| {name} | {_num(pool_tokens(record))}{host} | {record.get('cuda_graphs') or '?'} "
                     f"| {_ms(late.get('ttft_p50_s'))} / {_ms(late.get('ttft_p90_s'))} "
                     f"| {_ms(overall.get('tpot_p50_s'))} "
                     f"| {_num(overall.get('output_throughput_tok_s'))} | {_num(hit and 100 * hit, '{:.0f}%')} "
                     f"| {_num(shared.get('output_throughput'))} | {_num(shared.get('median_ttft_ms'))} "
                     f"| {record.get('status', '?')} |")
    sentences = summary_sentences(result.get("summary") or {})
    sentences += per_kvc_sentences(result)
    ceiling = throughput_ceiling(result)
    if ceiling:
        sentences.append(f"The agentic trace's own waits (session starts, tool calls between rounds) take "
                         f"{ceiling[0]:.1f} s of stock fp8's {ceiling[1]:.1f} s: a server answering at once would "
                         f"reach at most {ceiling[2]:.2f}x fp8's agentic output throughput on it.")
    if sentences:
        lines += [""] + sentences
    pending = result.get("pending") or []
    cut = [n for n in pending if _get(result["systems"].get(n) or {}, "agentic", "summary")]
    unmeasured = [n for n in pending if n not in cut]
    for name in cut:
        error = _get(result["systems"][name], "agentic", "error") or "cut short"
        lines += ["", f"`{name}` was cut short at the call's time budget ({error}); its row shows what ran."]
    if unmeasured:
        lines += ["", f"Not measured yet: {', '.join(unmeasured)}."]
    return "\n".join(lines)


def render_cache_sim(result: dict) -> str:
    if result.get("readme_table"):  # the serving simulator (2026-12-01 on) renders its own table
        return result["readme_table"]
    summary = result["summary"]
    saved, running = summary.get("saved_tokens", {}), summary.get("mean_running", {})
    fp8 = saved.get("stock-fp8")
    lines = [f"Cache simulator, {result.get('date', '?')}: trace `{summary.get('trace')}` at "
             f"{summary.get('budget_fraction')} of its bf16 working set; prefill tokens saved by cache hits.", "",
             "| system | saved tokens | vs stock fp8 | mean running requests |", "|---|---:|---:|---:|"]
    for name, value in saved.items():
        lines.append(f"| {name} | {_num(value)} | {_x(value / fp8 if fp8 else None)} "
                     f"| {_num(running.get(name), '{:.2f}')} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    return render_e2e(result) if kind_of(result) == "e2e" else render_cache_sim(result)


def load(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def render_files(paths: List[str]) -> str:
    return "\n\n".join(render(load(path)) for path in paths)


def replace_between_markers(text: str, kind: str, table: str) -> str:
    """``text`` with the block between ``kind``'s markers replaced by ``table`` (a new section at the
    end when the markers are missing)."""
    start, end, title = MARKERS[kind]
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="e2e-*.json and/or cache_sim-*.json files")
    parser.add_argument("--update-readme", nargs="?", const="README.md", default=None, metavar="PATH",
                        help="rewrite the marked section(s) of this file (default README.md)")
    args = parser.parse_args(argv)
    tables = {}
    for path in args.results:
        result = load(path)
        tables.setdefault(kind_of(result), []).append(render(result))
    print("\n\n".join(table for group in tables.values() for table in group))
    if args.update_readme:
        with open(args.update_readme) as handle:
            text = handle.read()
        for kind, group in tables.items():
            text = replace_between_markers(text, kind, "\n\n".join(group))
        with open(args.update_readme, "w") as handle:
            handle.write(text)
        print(f"updated {args.update_readme}: {', '.join(MARKERS[k][0] for k in tables)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
