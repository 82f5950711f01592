"""Static instruction counts of the decode stage-1 kernel, compiled for sm_90 on a machine without a GPU.

Usage (repo root, CPU only; a few seconds per kernel, Triton's cache keeps them):

  python benchmarks/sass_count.py --out benchmarks/results/decode-sass-2026-12-01.json
  python benchmarks/sass_count.py --ladder k8v8,k4v4-kc,k4v2-g32-kc --head-dim 64 --variants f16

With ``--ladder`` the whole ladder is one kernel (one tier loop each, unrolled in tier order, at
the ladder's launch configuration ``decode.config_for``); every backward-branch loop of at least
``MIN_LOOP`` instructions is listed, labelled with its tier when there is one per tier.

For each tier (``k8v8``, ``k4v4``, ``k4v2``; head_dim 128, 32/8 heads, page 16) and each decode
variant (``TieredDecodeWrapper(..., variant=...)``; ``default`` is what the server runs) it builds
the wrapper at its single-tier launch configuration (``ROWS_CONFIG`` for ``rows``), lets ``run``
go as far as the launch, and there compiles ``_decode_stage1`` (``_decode_stage1_rows``) with
``JITFunction.warmup`` for ``GPUTarget("cuda", 90, 32)`` through a stand-in Triton driver (inline PTX on, as on a GPU). ptxas gives the cubin, Triton's
``cuobjdump -sass`` the SASS. The inner loop is the longest backward branch (one step of one KV
head: ``block_n`` tokens, or ``tokens_per_step`` for variant ``rows``); its warp instructions, times
the program's warps (each runs the loop), are counted by opcode and divided by the step's tokens
(per token-head) and by ``head_dim + v_head_dim`` more (per KV element). Opcode groups are a rough
guide (a SHF may be address math, a LOP3 a predicate): unpack = PRMT/LOP3/SHF, mma = HMMA,
operands = LDS/LDSM/STS/MOVM/F2FP/BAR (moving dot operands between layouts), float = FFMA/FMUL/
FADD/FMNMX/MUFU/FSEL/FSETP/HADD2/HFMA2/SHFL (scale/zero terms and softmax), memory = LDG/LDGSTS/
DEPBAR, address = the rest (IMAD/IADD3/LEA/ISETP/SEL/MOV...). Measured speed was ~0.5-0.6 of
what these counts predict (issue-bound kernels at IPC ~2.2 on an H100/H200), so only ratios count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_kvc.kernels import decode  # noqa: E402
from sglang_kvc.kernels.testing import make_pool  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
TIERS = ("k8v8", "k4v4", "k4v2")
GROUPS = {
    "unpack": ("PRMT", "LOP3", "SHF"),
    "mma": ("HMMA",),
    "operands": ("LDS", "LDSM", "STS", "MOVM", "F2FP", "BAR"),
    "float": ("FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "FSEL", "FSETP", "HADD2", "HFMA2", "SHFL"),
    "memory": ("LDG", "LDGSTS", "LDGDEPBAR", "DEPBAR"),
}
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?\s*([^;]*);")


class _OfflineDriver:
    """What ``JITFunction.warmup`` asks of Triton's driver, for an sm_90 target without a GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _CompileOnly:
    """Stands in for a kernel in ``decode``: ``kernel[grid](...)`` compiles (inline PTX on) instead of launching."""

    def __init__(self, kernel, keep):
        self.kernel, self.keep = kernel, keep
        self.compiled = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.keep:
                kwargs["USE_ASM"] = True
                self.compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
        return launch


def cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_stage1(tier: str, variant: str, config: dict):
    """(SASS text, registers per thread, block_n) of stage 1 for one tier and variant."""
    pool = make_pool(tier, D, HKV, PAGE, 1024)
    kernels = ("_decode_stage1", "_decode_stage1_rows", "_decode_reduce")
    originals = {name: getattr(decode, name) for name in kernels if hasattr(decode, name)}
    shims = {name: _CompileOnly(kernel, name != "_decode_reduce") for name, kernel in originals.items()}
    for name, shim in shims.items():
        setattr(decode, name, shim)
    try:
        kwargs = dict(config) if variant == "default" else {**config, "variant": variant}
        wrapper = decode.TieredDecodeWrapper(pool, HQ, **kwargs)
        wrapper.plan(torch.tensor([0, 64], dtype=torch.int32), torch.arange(PAGE, PAGE + 64))
        wrapper.run(torch.zeros(1, HQ, D, dtype=torch.bfloat16), pool, 0)
    finally:
        for name, kernel in originals.items():
            setattr(decode, name, kernel)
    compiled = [shim.compiled for shim in shims.values() if shim.compiled is not None]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled[0].asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    regs = int(re.search(r"REG:(\d+)", sass).group(1))
    return sass, regs, getattr(wrapper, "tokens_per_step", wrapper.block_n), wrapper.num_warps


def inner_loop(sass: str):
    """Opcodes of the longest backward-branch loop of the SASS."""
    lines = [(int(m.group(1), 16), m.group(3), m.group(5)) for m in map(SASS_LINE.search, sass.splitlines()) if m]
    best = None
    for addr, op, operands in lines:
        if op == "BRA":
            target = int(operands.split()[-1], 16)
            if target < addr and (best is None or addr - target > best[1] - best[0]):
                best = (target, addr)
    return [op for addr, op, _ in lines if best[0] <= addr <= best[1]]


MIN_LOOP = 30  # instructions: shorter backward branches are not tier loops


def loops(sass: str):
    """Opcodes of every backward-branch loop of at least ``MIN_LOOP`` instructions, in address order."""
    lines = [(int(m.group(1), 16), m.group(3), m.group(5)) for m in map(SASS_LINE.search, sass.splitlines()) if m]
    spans = [(int(operands.split()[-1], 16), addr) for addr, op, operands in lines
             if op == "BRA" and int(operands.split()[-1], 16) < addr]
    found = [[op for addr, op, _ in lines if lo <= addr <= hi] for lo, hi in sorted(spans)]
    return [ops for ops in found if len(ops) >= MIN_LOOP]


def _loop_stats(opcodes, block_n: int, warps: int) -> dict:
    ops = collections.Counter(opcodes)
    total = sum(ops.values())
    groups = {name: sum(ops[o] for o in members) for name, members in GROUPS.items()}
    groups["address"] = total - sum(groups.values())
    per_token = warps / block_n  # every warp of the program runs the loop
    return {"loop_instructions": total,
            "per_token_head": round(total * per_token, 2),
            "per_kv_element": round(total * per_token / (2 * D), 4),
            "groups_per_token_head": {k: round(v * per_token, 2) for k, v in groups.items()},
            "opcodes_per_token_head": {k: round(v * per_token, 2) for k, v in ops.most_common()}}


def count(tier: str, variant: str, config: dict) -> dict:
    sass, regs, block_n, warps = compile_stage1(tier, variant, config)
    return {"tier": tier, "variant": variant, "config": config, "block_n": block_n, "num_warps": warps,
            "registers": regs, **_loop_stats(inner_loop(sass), block_n, warps)}


def count_ladder(ladder: str, variant: str, config: dict) -> list:
    """One row per tier loop of the ladder's kernel (``tier``: the tier's spec, or ``loop i`` when
    the loops do not pair one to one with the tiers)."""
    sass, regs, block_n, warps = compile_stage1(ladder, variant, config)
    found = loops(sass)
    tiers = ladder.split(",")
    names = tiers if len(found) == len(tiers) else [f"loop {i}" for i in range(len(found))]
    return [{"ladder": ladder, "tier": name, "variant": variant, "config": config, "block_n": block_n,
             "num_warps": warps, "registers": regs, **_loop_stats(ops, block_n, warps)}
            for name, ops in zip(names, found)]


def main():
    global D  # compile_stage1 and the per-element counts read it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--variants", default="default," + ",".join(getattr(decode, "VARIANTS", ())))
    parser.add_argument("--config", default="{}", help="TieredDecodeWrapper launch knobs as JSON, e.g. "
                        "'{\"block_n\": 64, \"maxnreg\": null}' (default: SINGLE_TIER_CONFIG)")
    parser.add_argument("--ladder", default=None, help="count one kernel of this whole ladder (e.g. "
                        "k8v8,k4v4-kc,k4v2-g32-kc), one row per tier loop, instead of --tiers one by one")
    parser.add_argument("--head-dim", type=int, default=D, help=f"head_dim (default {D})")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    D = args.head_dim
    from triton.runtime.driver import driver
    driver.set_active(_OfflineDriver())  # after every import: SGLang's modules probe the real one
    config = json.loads(args.config)
    if args.ladder:
        rows = [r for v in args.variants.split(",") for r in count_ladder(args.ladder, v, config)]
    else:
        rows = [count(t, v, config) for t in args.tiers.split(",") for v in args.variants.split(",")]
    width = max(6, *(len(r["tier"]) for r in rows))
    print(f"{'tier':{width}} {'variant':8} {'regs':>4} {'/token-head':>11} {'/element':>8}  groups per token-head")
    for r in rows:
        groups = " ".join(f"{k}={v}" for k, v in r["groups_per_token_head"].items())
        print(f"{r['tier']:{width}} {r['variant']:8} {r['registers']:4} {r['per_token_head']:11} "
              f"{r['per_kv_element']:8}  {groups}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/sass_count.py " + " ".join(sys.argv[1:]),
                       "target": "sm_90 (GPUTarget('cuda', 90, 32)), Triton's ptxas/cuobjdump",
                       "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "page": PAGE},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
