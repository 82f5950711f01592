"""Shared pieces for end-to-end runs on the GPU machine: a random-weight Llama with a small local
tokenizer, a server process that is started, health-checked and stopped by PID, a multi-turn client
over /generate, a streaming /generate client that times the first token, and /metrics parsing.

Nothing here imports torch, transformers or tokenizers at module import time."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional

MODEL_SHAPES = {
    # ~1.1B parameters: Llama-3.2-1B-like widths, GQA 32/8, head_dim 64
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    # ~8.0B parameters: Llama-3.1-8B-like widths and depth (head_dim 128, GQA 32/8), the 1b vocabulary
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
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
        with open(os.path.join(path, "config.json")) as handle:
            saved = json.load(handle)
        differs = {k: (saved.get(k), v) for k, v in MODEL_SHAPES[shape].items() if saved.get(k) != v}
        if differs:
            raise ValueError(f"{path} holds another shape than {shape!r} (saved, wanted): {differs}")
        make_tokenizer(path, MODEL_SHAPES[shape]["vocab_size"])
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
    make_tokenizer(path, config.vocab_size)
    return path


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: LlamaConfig's default bos/eos ids


def _stdlib_sources(max_bytes: int) -> Iterator[str]:
    """Python standard-library source files, in sorted path order, until ``max_bytes`` characters."""
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for name in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in name:
            continue
        try:
            with open(name, encoding="utf-8", errors="ignore") as handle:
                text = handle.read()
        except OSError:
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def make_tokenizer(path: str, vocab_size: int = 32000, max_corpus_bytes: int = 8 << 20) -> str:
    """Save a word-level tokenizer with exactly ``vocab_size`` ids into ``path`` once; returns path.

    Trained with the ``tokenizers`` package on Python's standard-library sources (no network).
    Words are ``\\w+`` or punctuation runs, and decoding joins tokens with single spaces, so
    ``encode(decode(ids)) == ids`` for any ids: a prompt that bench_serving builds from N random
    tokens is exactly N tokens long on the server. Ids the corpus does not fill are ``<extra_i>``
    tokens, so every id the model can emit decodes. ``clean_up_tokenization_spaces`` is off (it
    would glue punctuation tokens together and break the round trip).
    """
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator(_stdlib_sources(max_corpus_bytes), trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=SPECIAL_TOKENS[0],
                                      bos_token=SPECIAL_TOKENS[1], eos_token=SPECIAL_TOKENS[2],
                                      clean_up_tokenization_spaces=False)
    os.makedirs(path, exist_ok=True)
    wrapped.save_pretrained(path)
    return path


class Server:
    """One ``python -m sglang.launch_server`` process: started in its own session, alive-checked
    while polling /health, stopped by signalling its process group. Its log goes to ``log_path``."""

    def __init__(self, args: List[str], port: int, log_path: str, env: Optional[dict] = None,
                 module: str = "sglang.launch_server"):
        self.args, self.port, self.log_path, self.module = args, port, log_path, module
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, timeout_s: float = 420) -> float:
        start = time.time()
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(self.port)] + self.args
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


@dataclasses.dataclass
class StreamResult:
    """One streamed /generate request, timed on the client's ``time.perf_counter`` clock.

    Invariant: ``first_token_at`` is the arrival of the first chunk carrying an output token and
    ``last_token_at`` that of the chunk that brought the output to its final length; both are None
    when no token arrived (then ``error`` says why)."""

    output_ids: List[int]
    meta_info: dict
    sent_at: float
    finished_at: float
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    chunks: int = 0
    error: Optional[str] = None

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tpot_s(self) -> Optional[float]:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_at is None or len(self.output_ids) < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (len(self.output_ids) - 1)

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.sent_at


def merge_stream_ids(output_ids: List[int], chunk_ids: List[int], completion_tokens: Optional[int]) -> List[int]:
    """The output after one stream chunk. SGLang sends the whole output so far in every chunk,
    or only the new ids with ``--incremental-streaming-output``; ``meta_info.completion_tokens``
    (the output length so far) tells the two apart."""
    if completion_tokens is not None:
        return list(chunk_ids) if len(chunk_ids) == completion_tokens else output_ids + list(chunk_ids)
    if len(chunk_ids) >= len(output_ids) and list(chunk_ids[: len(output_ids)]) == output_ids:
        return list(chunk_ids)
    return output_ids + list(chunk_ids)


def stream_generate(url: str, input_ids: List[int], sampling_params: dict, timeout: float = 600) -> StreamResult:
    """POST ``{"input_ids", "sampling_params", "stream": true}`` to ``url + "/generate"`` and read
    SGLang's server-sent events (``data: {json}\\n\\n`` ... ``data: [DONE]``). Never raises on
    HTTP or stream errors: they land in ``StreamResult.error``."""
    payload = json.dumps({"input_ids": list(input_ids), "sampling_params": sampling_params, "stream": True}).encode()
    request = urllib.request.Request(url + "/generate", data=payload, headers={"Content-Type": "application/json"})
    result = StreamResult(output_ids=[], meta_info={}, sent_at=time.perf_counter(), finished_at=0.0)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                body = line[len(b"data:"):].strip()
                if body == b"[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(body)
                if "error" in data:
                    result.error = json.dumps(data["error"])[:500]
                    break
                result.chunks += 1
                result.meta_info = data.get("meta_info") or result.meta_info
                before = len(result.output_ids)
                result.output_ids = merge_stream_ids(result.output_ids, data.get("output_ids") or [],
                                                     result.meta_info.get("completion_tokens"))
                if len(result.output_ids) > before:
                    if result.first_token_at is None:
                        result.first_token_at = now
                    result.last_token_at = now
    except urllib.error.HTTPError as err:
        result.error = f"HTTP {err.code}: {err.read()[:500].decode(errors='replace')}"
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError) as err:
        result.error = repr(err)[:500]
    result.finished_at = time.perf_counter()
    if result.error is None and result.first_token_at is None:
        result.error = "the stream ended without an output token"
    return result


def flush_cache(url: str, timeout_s: float = 60) -> bool:
    """POST /flush_cache until the server accepts (it refuses while requests are in flight)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", data=b""), timeout=30) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.time() > deadline:
            return False
        time.sleep(1)


METRIC_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> Dict[str, float]:
    """Prometheus exposition text -> ``{'name{labels}': value}`` (comments and odd lines skipped)."""
    values = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line.strip())
        if match:
            try:
                values[match.group(1)] = float(match.group(2))
            except ValueError:
                pass
    return values


def counter_deltas(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    """How much each ``*_total`` counter advanced between two scrapes (only those that moved)."""
    deltas = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        if name.endswith("_total") and value != before.get(key, 0.0):
            deltas[key] = value - before.get(key, 0.0)
    return deltas


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "sglang", "flashinfer", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "missing"
    # the device machine's copy of the tree can carry stale git metadata: the caller passes the commit
    out["sglang_kvc_commit"] = os.environ.get("KVC_GIT_COMMIT", "")
    if not out["sglang_kvc_commit"]:
        try:
            out["sglang_kvc_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                      text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        except Exception:
            pass
    out["sglang_kvc_tree_sha1"] = source_tree_sha1()
    return out


def host_probe(loop_n: int = 1_000_000, repeat: int = 3) -> Dict[str, object]:
    """The host side of this machine, to tell device calls apart: CPU model, cores, 1-minute load,
    and the best of ``repeat`` timings of a fixed pure-Python loop (``python_loop_ms``; a slower
    host shows in every host-bound serving step, so two calls' timings compare only beside it)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        total = 0
        for i in range(loop_n):
            total += i * i
        best = min(best, time.perf_counter() - start)
    return {"cpu_model": model, "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "python_loop_ms": round(best * 1e3, 2), "python_loop_n": loop_n}


def source_tree_sha1() -> str:
    """sha1 over the serving code's files (sglang_kvc/, kernels/, patches/): names the code that ran
    even where the copy's git metadata is stale (the device machine's copy of the tree)."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha1()
    for folder in ("sglang_kvc", "kernels", "patches"):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, folder))):
            dirnames.sort()
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:12]


def device_name() -> str:
    """The GPU's name from nvidia-smi (this process never touches CUDA: the servers need it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def post_json(url: str, payload: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())
