"""The served decode compiles each of its kernels once (the reduce at most twice) over SGLang's decode
CUDA-graph batch sizes: a compile of stage 1 takes seconds of the server's start-up.

Counted on the CPU without compiling: a subprocess (Triton's JIT, not its interpreter) stands an sm_90
driver in (``benchmarks/sass_count.py``'s) and records each specialization key the JIT would compile.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SGLang 0.5.16's default decode graph batch sizes (the server log's "Capture target decode" line)
GRAPH_BATCHES = [1, 2, 4, 8] + list(range(12, 17, 4)) + list(range(24, 257, 8))

COUNT = """
import collections, json, sys
import torch
from triton.runtime import driver, jit
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/benchmarks")
import sass_count
from sglang_kvc.kernels import decode
from sglang_kvc.kernels.testing import make_pool
driver.set_active(sass_count._OfflineDriver())
keys = collections.defaultdict(set)
def record(self, key, *args, **kwargs):
    keys[self.fn.__name__].add(key)  # returns None: the launch is skipped
jit.JITFunction._do_compile = record
decode._num_sms = lambda device: 132  # an H200's multiprocessors: the split counts the server takes
pool = make_pool({ladder!r}, {head_dim}, 8, 16, 4096)
wrapper = decode.TieredDecodeWrapper(pool, 32, variant="f16")
wrapper.reserve(max_batch=256, max_tokens=256 * 16)
splits = set()
for batch in {batches}:
    wrapper.plan(torch.arange(0, batch * 16 + 1, 16, dtype=torch.int32), torch.arange(16, 16 + batch * 16))
    wrapper.run(torch.zeros(batch, 32, {head_dim}, dtype=torch.bfloat16), pool, 0)
    splits.add(wrapper.num_splits)
print(json.dumps({{"keys": {{k: len(v) for k, v in keys.items()}}, "splits": sorted(splits)}}))
"""


def _compiles(ladder: str, head_dim: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    code = COUNT.format(root=ROOT, ladder=ladder, head_dim=head_dim, batches=GRAPH_BATCHES)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_stage1_compile_over_every_graph_batch_size():
    found = _compiles("k8v8,k4v4-kc,k4v2-g32-kc", 64)
    assert len(found["splits"]) > 3 and 1 in found["splits"] and 64 in found["splits"], found
    assert found["keys"]["_decode_stage1"] == 1, found
    assert found["keys"]["_decode_reduce"] <= 2, found
