"""Shared pieces for end-to-end runs on the GPU machine: a random-weight Llama, a server process
that is started, health-checked and stopped by PID, and a multi-turn client over /generate."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

MODEL_SHAPES = {
    # ~1.1B parameters: Llama-3.2-1B-like widths, GQA 32/8, head_dim 64
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),
}


def make_random_llama(path: str, shape: str = "1b", seed: int = 0, max_positions: int = 32768) -> str:
    """Save a random-weight LlamaForCausalLM (bf16, safetensors) at ``path`` once; returns path.

    The LM head is scaled up so greedy logits have clear margins: a tiny numeric difference between
    two attention kernels then does not flip the argmax, and bf16-only runs can be compared exactly.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    config = transformers.LlamaConfig(max_position_embeddings=max_positions, rope_theta=500000.0,
                                      tie_word_embeddings=False, **MODEL_SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


class Server:
    """One ``python -m sglang.launch_server`` process: started in its own session, alive-checked
    while polling /health, stopped by signalling its process group. Its log goes to ``log_path``."""

    def __init__(self, args: List[str], port: int, log_path: str, env: Optional[dict] = None):
        self.args, self.port, self.log_path = args, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, timeout_s: float = 420) -> float:
        start = time.time()
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", str(self.port)] + self.args
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while time.time() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return time.time() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s} s; see {self.log_path}")

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def post(self, path: str, payload: dict, timeout: float = 600) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return resp.read().decode()


def multi_turn(server: Server, sessions: int, rounds: int, system_tokens: int, turn_tokens: int,
               output_tokens: int, seed: int = 0, vocab: int = 32000, progress=None) -> List[dict]:
    """Sessions share a system prompt; each round sends the whole conversation so far plus a new
    turn, greedy, ``output_tokens`` long (ignore_eos). Returns one record per request, round-major."""
    rng = random.Random(seed)
    system = [rng.randrange(10, vocab) for _ in range(system_tokens)]
    contexts = [list(system) for _ in range(sessions)]
    turns = [[[rng.randrange(10, vocab) for _ in range(turn_tokens)] for _ in range(sessions)] for _ in range(rounds)]
    records = []

    def send(session: int, round_index: int):
        prompt = contexts[session] + turns[round_index][session]
        start = time.perf_counter()
        reply = server.post("/generate", {"input_ids": prompt, "sampling_params": {
            "temperature": 0, "max_new_tokens": output_tokens, "ignore_eos": True}})
        latency = time.perf_counter() - start
        meta = reply.get("meta_info", {})
        return {"session": session, "round": round_index + 1, "prompt_tokens": len(prompt),
                "output_ids": reply["output_ids"], "cached_tokens": meta.get("cached_tokens"),
                "latency_s": latency}

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        for r in range(rounds):
            results = list(pool.map(lambda s: send(s, r), range(sessions)))
            for rec in results:
                contexts[rec["session"]] += turns[r][rec["session"]] + rec["output_ids"]
            records.extend(results)
            if progress:
                progress(r + 1, results)
    return records


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "sglang", "flashinfer", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "missing"
    try:
        out["sglang_kvc_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                  text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:
        pass
    return out


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:
        return "unknown"
