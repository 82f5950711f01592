"""Soak benchmark (issue #14): minutes of mixed traffic at a KV budget that forces demotion and drops,
then checks that the server survived it intact.

Traffic (``/generate`` with ``input_ids``, the server started with ``--skip-tokenizer-init``), from
``--concurrency`` client workers, each picking a request kind by weight (``--mix``):
  session        multi-turn sessions (``--sessions`` of them, one request in flight each) whose history
                 grows by a user turn and the server's own reply until ``--max-history`` tokens, then
                 restarts; every session starts with one of ``--system-prompts`` shared system prompts
  shared_prefix  one of ``--prefixes`` long prefixes (Zipf-popular: cold ones get demoted) + a suffix
  stream_abort   a streamed session or shared-prefix prompt that the client drops after 0..8 tokens
                 (0: as soon as the headers arrive), so the server aborts it mid-prefill or mid-decode
  stream         a streamed shared-prefix prompt read to the end
  malformed      empty ids, negative max_new_tokens (plain and streamed), broken JSON, wrong types
                 (ids as a string, a string among the ids, max_new_tokens as a string), prompts over the
                 model's context, prompts over the KV budget (``max_total_num_tokens``)
  bad_token_id   an otherwise ordinary prompt holding one id outside ``[0, vocab_size)`` (the plugin's
                 guard answers 400; stock SGLang dies on it)
plus, every ``--burst-every-s``, a burst of ``--burst-size`` long requests outside the concurrency
limit, worth more tokens than the budget holds (queueing and retraction).

Every request is classified: ``ok``; ``aborted`` (dropped by the client on purpose); ``refused``
(a 4xx status, a streamed error event with a 4xx code, or a finish_reason ``abort`` with a 4xx
status_code: a clear refusal); ``unanswered`` (timeouts, connection errors, 5xx, streams that end
without finishing, any other error). Malformed and out-of-vocabulary requests are expected to be
refused; one that is answered instead is counted as ok and listed under ``traffic.accepted_malformed``.

Before the traffic: ``/flush_cache``, the per-tier kvc series on ``/metrics`` (baseline), greedy probe
pairs (a prompt, then the prompt + a suffix that reads the first one's cached KV; a flush before each
pair). After it: the in-flight requests are drained, ``/health``, ``/flush_cache``, the kvc series
again, the probes again. Leaked pages after the flush (``used == 0, free == total`` per tier) = cached
pages any tier still shows (``sglang:kvc_tier_tokens`` rounded up to pages) + the free pages of frames
a lower tier still owns (a flush gives them all back) + the frames missing from the free pool against
the fresh server's flushed baseline that no lower tier owns, each worth the write tier's pages per
frame (from the start-up log's arena line). Then SIGTERM to the server's main process (the launcher,
which must take its children down), the time until its whole process group is gone, and the server
log is scanned for ``Traceback``.

Output (``--out``, default benchmarks/results): ``soak-<device>-<date>.json`` with ``summary``
(SUMMARY_KEYS: alive, tracebacks, unanswered, leaked_pages_after_flush, probe_outputs_equal,
bad_token_id_requests_sent, bad_token_id_requests_refused, clean_shutdown_s, requests_total,
abort_share, minutes), ``checks`` (each acceptance check of the issue, plus
``demotion_and_drops_seen``: the kvc demoted and dropped counters advanced during the traffic) and
``passed``, ``traffic`` (counts per kind, variant, outcome and status; latency percentiles; examples
of refusals and failures), ``pressure`` (demoted, dropped and retracted counts, peak queue),
``accounting``, ``probes``, ``shutdown``, ``log``, ``server``, ``timings_s``, ``settings``,
``device``, ``date``, ``versions``, ``command``; the server log is ``soak-<device>-<date>.log`` beside
it. Exit status 0 when every check passed, 1 when one failed, 2 when the server did not start.

On the GPU machine, one device call (``benchmarks/gpu_soak.sh`` sets up the kit, then runs
``python3 benchmarks/soak.py --out $OUT --time-budget-s <585 - set-up>``):
    bash benchmarks/gpu_soak.sh
Against a server that is already running (token ids; started with ``--skip-tokenizer-init
--enable-metrics --kv-compression ...``):
    python benchmarks/soak.py --url http://127.0.0.1:30000 --vocab-size 32000 --context-len 32768 \\
        --kv-compression k8v8,k4v4,k2v2 --server-log server.log --server-pid <pid> --minutes 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.serving import (MODEL_SHAPES, Server, device_name, merge_stream_ids, parse_metrics,  # noqa: E402
                                post_json, versions)

OUTCOMES = ("ok", "aborted", "refused", "unanswered")
SUMMARY_KEYS = ("alive", "tracebacks", "unanswered", "leaked_pages_after_flush", "probe_outputs_equal",
                "bad_token_id_requests_sent", "bad_token_id_requests_refused", "clean_shutdown_s",
                "requests_total", "abort_share", "minutes")
DEFAULT_MIX = {"session": 0.28, "shared_prefix": 0.20, "stream_abort": 0.16, "stream": 0.06, "malformed": 0.14,
               "bad_token_id": 0.08}
EXPECT_REFUSED = ("malformed", "bad_token_id")
MALFORMED_VARIANTS = {"empty_ids": 1.0, "negative_max_new_tokens": 1.0, "negative_max_new_tokens_stream": 1.0,
                      "broken_json": 1.0, "ids_as_string": 1.0, "string_among_ids": 1.0,
                      "max_new_tokens_as_string": 1.0, "over_context": 0.5, "over_budget": 0.5}
FIRST_ID = 10  # prompts use ids >= 10 (0..2 are the random Llama's special tokens)
EXAMPLES_PER_CLASS = 3


# ---- one request's fate ---------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What one request came to. Invariant: ``outcome`` is one of OUTCOMES; ``status`` is the HTTP
    status when a response arrived (a refusal inside a 200 stream keeps 200 and names its code in
    ``detail``), else None."""

    kind: str
    variant: str
    outcome: str
    status: Optional[int] = None
    detail: str = ""
    latency_s: float = 0.0
    output_ids: List[int] = dataclasses.field(default_factory=list)
    retractions: int = 0


def _is_4xx(code) -> bool:
    try:
        return 400 <= int(code) < 500
    except (TypeError, ValueError):
        return False


def _error_text(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]


def classify_reply(status: int, body: bytes) -> Tuple[str, str, List[int], dict]:
    """A non-streamed reply -> (outcome, detail, output_ids, meta_info)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if _is_4xx(status):
        error = data.get("error", data.get("message", data)) if isinstance(data, dict) else body[:300]
        return "refused", f"HTTP {status}: {_error_text(error)}", [], {}
    if status != 200:
        return "unanswered", f"HTTP {status}: {body[:300].decode(errors='replace')}", [], {}
    if not isinstance(data, dict):
        return "unanswered", f"HTTP 200 with a body that is no JSON object: {body[:200]!r}", [], {}
    if "error" in data:
        code = data["error"].get("code") if isinstance(data["error"], dict) else None
        outcome = "refused" if _is_4xx(code) else "unanswered"
        return outcome, f"HTTP 200 with error (code {code}): {_error_text(data['error'])}", [], {}
    meta = data.get("meta_info") or {}
    aborted = server_abort(meta)
    if aborted:
        return aborted
    if not isinstance(data.get("output_ids"), list):
        return "unanswered", f"HTTP 200 without output_ids: {str(data)[:200]}", [], meta
    return "ok", "", data["output_ids"], meta


def server_abort(meta: dict) -> Optional[Tuple[str, str, List[int], dict]]:
    """A finish_reason of type ``abort``: refused when it carries a 4xx status_code, else unanswered."""
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or reason.get("type") != "abort":
        return None
    code = reason.get("status_code")
    outcome = "refused" if _is_4xx(code) else "unanswered"
    return outcome, f"finish_reason abort (status_code {code}): {str(reason.get('message'))[:300]}", [], meta


class StreamReader:
    """Folds SGLang's server-sent events (``data: {json}`` ... ``data: [DONE]``) into one outcome.
    Invariant: ``result`` is None until the stream has decided the outcome (finished, refused,
    failed); ``output_ids`` is the output so far."""

    def __init__(self):
        self.output_ids: List[int] = []
        self.meta: dict = {}
        self.finished = False
        self.done = False
        self.result: Optional[Tuple[str, str]] = None

    def feed(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        body = line[len(b"data:"):].strip()
        if body == b"[DONE]":
            self.done = True
            if self.result is None:
                self.result = ("ok", "") if self.finished else ("unanswered", "[DONE] before a finish_reason")
            return
        try:
            data = json.loads(body)
        except ValueError:
            self.result = self.result or ("unanswered", f"unparsable event: {body[:200]!r}")
            return
        if "error" in data:
            code = data["error"].get("code") if isinstance(data["error"], dict) else None
            outcome = "refused" if _is_4xx(code) else "unanswered"
            self.result = self.result or (outcome, f"stream error (code {code}): {_error_text(data['error'])}")
            return
        self.meta = data.get("meta_info") or self.meta
        self.output_ids = merge_stream_ids(self.output_ids, data.get("output_ids") or [],
                                           self.meta.get("completion_tokens"))
        aborted = server_abort(self.meta)
        if aborted:
            self.result = self.result or aborted[:2]
        elif self.meta.get("finish_reason"):
            self.finished = True

    def end(self) -> Tuple[str, str]:
        """The outcome once the connection ended (normally after ``[DONE]``)."""
        if self.result is not None:
            return self.result
        if self.finished:
            return "ok", ""
        return "unanswered", f"stream ended after {len(self.output_ids)} tokens without a finish_reason"


# ---- the tally --------------------------------------------------------------------------------------
def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(math.floor(pos))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class Tally:
    """Every classified request. Invariant: ``sum(by_outcome.values()) == total`` and each request
    is counted once in ``counts`` under (kind, variant, outcome)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.statuses: collections.Counter = collections.Counter()
        self.examples: Dict[str, List[str]] = collections.defaultdict(list)
        self.latencies: Dict[str, List[float]] = collections.defaultdict(list)
        self.retractions = 0
        self.output_tokens = 0

    def add(self, record: Outcome) -> None:
        self.counts[(record.kind, record.variant, record.outcome)] += 1
        self.statuses[(record.kind, "none" if record.status is None else str(record.status))] += 1
        if record.outcome == "ok":
            self.latencies[record.kind].append(record.latency_s)
            self.output_tokens += len(record.output_ids)
        key = f"{record.kind}/{record.variant}/{record.outcome}"
        if record.outcome in ("refused", "unanswered") and len(self.examples[key]) < EXAMPLES_PER_CLASS:
            self.examples[key].append(record.detail)
        if record.kind in EXPECT_REFUSED and record.outcome == "ok":
            key = f"{record.kind}/{record.variant}/accepted"
            if len(self.examples[key]) < EXAMPLES_PER_CLASS:
                self.examples[key].append(f"answered {len(record.output_ids)} tokens")
        self.retractions += record.retractions

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def by_outcome(self) -> Dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for (_, _, outcome), n in self.counts.items():
            out[outcome] += n
        return out

    def of_kind(self, kind: str) -> Dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for (k, _, outcome), n in self.counts.items():
            if k == kind:
                out[outcome] += n
        return out

    def report(self) -> dict:
        kinds = sorted({k for k, _, _ in self.counts})
        per_kind = {}
        for kind in kinds:
            variants = sorted({v for k, v, _ in self.counts if k == kind})
            lat = self.latencies.get(kind, [])
            per_kind[kind] = {
                "outcomes": self.of_kind(kind),
                "variants": {v: {o: self.counts[(kind, v, o)] for o in OUTCOMES if self.counts[(kind, v, o)]}
                             for v in variants},
                "statuses": {s: n for (k, s), n in sorted(self.statuses.items()) if k == kind},
                "ok_latency_p50_s": _round(percentile(lat, 50)), "ok_latency_p99_s": _round(percentile(lat, 99)),
            }
        accepted = {f"{k}/{v}": n for (k, v, o), n in sorted(self.counts.items()) if k in EXPECT_REFUSED and o == "ok"}
        return {"requests": self.total, "outcomes": self.by_outcome, "per_kind": per_kind,
                "accepted_malformed": accepted, "output_tokens": self.output_tokens,
                "retractions_seen_in_replies": self.retractions, "examples": dict(sorted(self.examples.items()))}


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


# ---- traffic ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Session:
    """One multi-turn conversation: ``history`` is every prompt and reply so far (starting with a
    shared system prompt)."""

    history: List[int]
    turns: int = 0


class Traffic:
    """The load generator's state: model facts, shared prompts, idle sessions, the tally, in-flight
    requests. One instance per soak run; every coroutine runs on one event loop."""

    def __init__(self, args, url: str, vocab_size: int, context_len: int, max_total_num_tokens: Optional[int]):
        self.args, self.url = args, url
        self.vocab_size, self.context_len = vocab_size, context_len
        self.max_total_num_tokens = max_total_num_tokens
        rng = random.Random(args.seed)
        self.system_prompts = [self.random_ids(rng, args.system_tokens) for _ in range(args.system_prompts)]
        self.prefixes = [self.random_ids(rng, args.prefix_tokens) for _ in range(args.prefixes)]
        self.prefix_weights = [1.0 / (i + 1) for i in range(args.prefixes)]
        self.sessions = [Session(list(rng.choice(self.system_prompts))) for _ in range(args.sessions)]
        self.idle_sessions = collections.deque(self.sessions)
        self.tally = Tally()
        self.deadline = 0.0
        self.in_flight = 0
        self.bursts = 0
        self.samples: List[dict] = []
        variants = {name: MALFORMED_VARIANTS[name] for name in args.malformed.split(",") if name}
        if max_total_num_tokens is None or max_total_num_tokens + 64 >= context_len:
            variants.pop("over_budget", None)  # unknown budget, or the context refuses it first
        self.malformed_variants = variants
        self.http = None

    def random_ids(self, rng: random.Random, count: int) -> List[int]:
        return [rng.randrange(FIRST_ID, self.vocab_size) for _ in range(count)]

    # -- sending ---
    async def send(self, kind: str, variant: str, payload=None, raw: Optional[bytes] = None,
                   stream: bool = False, abort_after: Optional[int] = None) -> Outcome:
        """POST one request to /generate and classify it; never raises but CancelledError (then the
        request is counted unanswered)."""
        import aiohttp

        start = time.perf_counter()
        self.in_flight += 1
        record = Outcome(kind, variant, "unanswered")
        try:
            data = raw if raw is not None else json.dumps(payload).encode()
            async with self.http.post(self.url + "/generate", data=data,
                                      headers={"Content-Type": "application/json"}) as resp:
                record.status = resp.status
                if not stream or resp.status != 200:
                    outcome, detail, output_ids, meta = classify_reply(resp.status, await resp.read())
                    record.outcome, record.detail, record.output_ids = outcome, detail, output_ids
                    record.retractions = int(meta.get("num_retractions") or 0)
                    return record
                reader = StreamReader()
                if abort_after == 0:
                    resp.close()
                    record.outcome, record.detail = "aborted", "dropped after the headers"
                    return record
                async for line in resp.content:
                    reader.feed(line)
                    if reader.result is not None or reader.done:
                        break
                    if abort_after is not None and not reader.finished and len(reader.output_ids) >= abort_after:
                        resp.close()
                        record.outcome, record.detail = "aborted", f"dropped after {len(reader.output_ids)} tokens"
                        record.output_ids = reader.output_ids
                        return record
                record.outcome, record.detail = reader.end()
                record.output_ids = reader.output_ids
                record.retractions = int(reader.meta.get("num_retractions") or 0)
                return record
        except asyncio.CancelledError:
            record.outcome, record.detail = "unanswered", "still waiting when the drain ended"
            self.tally.add(record)
            raise
        except asyncio.TimeoutError:
            record.outcome, record.detail = "unanswered", f"no reply within {self.args.request_timeout_s:g} s"
            return record
        except (aiohttp.ClientError, OSError, ValueError) as err:
            record.outcome, record.detail = "unanswered", f"{type(err).__name__}: {str(err)[:300]}"
            return record
        finally:
            record.latency_s = time.perf_counter() - start
            self.in_flight -= 1

    # -- request kinds ---
    def sampling(self, rng: random.Random, low: int, high: int, greedy: bool = True) -> dict:
        params = {"max_new_tokens": rng.randint(low, high), "ignore_eos": True}
        params.update({"temperature": 0} if greedy else {"temperature": 0.8, "top_p": 0.95})
        return params

    async def session_turn(self, rng: random.Random) -> Outcome:
        if not self.idle_sessions:
            return await self.shared_prefix(rng)
        session = self.idle_sessions.popleft()
        try:
            turn = self.random_ids(rng, rng.randint(16, self.args.turn_tokens))
            prompt = session.history + turn
            record = await self.send("session", f"turn{min(session.turns, 9)}",
                                     {"input_ids": prompt, "sampling_params": self.sampling(rng, 4, 24)})
            if record.outcome == "ok":
                session.history = prompt + record.output_ids
                session.turns += 1
                if len(session.history) + self.args.turn_tokens + 24 > self.args.max_history:
                    session.history, session.turns = list(rng.choice(self.system_prompts)), 0
            return record
        finally:
            self.idle_sessions.append(session)

    def prefix_prompt(self, rng: random.Random) -> List[int]:
        prefix = rng.choices(self.prefixes, self.prefix_weights)[0]
        return prefix + self.random_ids(rng, rng.randint(8, 64))

    async def shared_prefix(self, rng: random.Random) -> Outcome:
        return await self.send("shared_prefix", "prefix", {"input_ids": self.prefix_prompt(rng),
                                                           "sampling_params": self.sampling(rng, 4, 16)})

    async def stream_abort(self, rng: random.Random) -> Outcome:
        if rng.random() < 0.5:
            session = rng.choice(self.sessions)
            prompt, variant = session.history + self.random_ids(rng, 32), "session"
        else:
            prompt, variant = self.prefix_prompt(rng), "prefix"
        payload = {"input_ids": prompt, "sampling_params": self.sampling(rng, 16, 64, greedy=False), "stream": True}
        return await self.send("stream_abort", variant, payload, stream=True, abort_after=rng.randint(0, 8))

    async def stream(self, rng: random.Random) -> Outcome:
        payload = {"input_ids": self.prefix_prompt(rng), "sampling_params": self.sampling(rng, 8, 32), "stream": True}
        return await self.send("stream", "prefix", payload, stream=True)

    async def malformed(self, rng: random.Random) -> Outcome:
        if not self.malformed_variants:  # only over_budget asked for, and the budget is unknown
            return await self.shared_prefix(rng)
        variant = rng.choices(list(self.malformed_variants), list(self.malformed_variants.values()))[0]
        ids = self.random_ids(rng, rng.randint(8, 64))
        good = {"max_new_tokens": 4}
        if variant == "empty_ids":
            return await self.send("malformed", variant, {"input_ids": [], "sampling_params": good})
        if variant == "negative_max_new_tokens":
            return await self.send("malformed", variant, {"input_ids": ids, "sampling_params": {"max_new_tokens": -5}})
        if variant == "negative_max_new_tokens_stream":
            return await self.send("malformed", variant, {"input_ids": ids, "sampling_params": {"max_new_tokens": -5},
                                                          "stream": True}, stream=True)
        if variant == "broken_json":
            text = json.dumps({"input_ids": ids, "sampling_params": good})
            return await self.send("malformed", variant, raw=text[: rng.randint(1, len(text) - 1)].encode())
        if variant == "ids_as_string":
            text_ids = " ".join(map(str, ids))
            return await self.send("malformed", variant, {"input_ids": text_ids, "sampling_params": good})
        if variant == "string_among_ids":
            ids[rng.randrange(len(ids))] = "seven"
            return await self.send("malformed", variant, {"input_ids": ids, "sampling_params": good})
        if variant == "max_new_tokens_as_string":
            return await self.send("malformed", variant, {"input_ids": ids,
                                                          "sampling_params": {"max_new_tokens": "four"}})
        if variant == "over_context":
            prompt = self.random_ids(rng, self.context_len + rng.randint(1, 64))
            return await self.send("malformed", variant, {"input_ids": prompt, "sampling_params": good})
        prompt = self.random_ids(rng, self.max_total_num_tokens + rng.randint(16, 64))  # over_budget
        return await self.send("malformed", variant, {"input_ids": prompt, "sampling_params": good})

    async def bad_token_id(self, rng: random.Random) -> Outcome:
        prompt = self.prefix_prompt(rng) if rng.random() < 0.5 else self.random_ids(rng, rng.randint(8, 256))
        variant, bad = rng.choice([("vocab_size", self.vocab_size), ("far_above", self.vocab_size + 100_000),
                                   ("negative", -1)])
        prompt[rng.randrange(len(prompt))] = bad
        stream = rng.random() < 0.25
        payload = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4}}
        if stream:
            payload["stream"] = True
        return await self.send("bad_token_id", variant + ("_stream" if stream else ""), payload, stream=stream)

    async def burst_request(self, rng: random.Random) -> Outcome:
        prompt = self.random_ids(rng, rng.randint(self.args.burst_prompt_tokens // 2, self.args.burst_prompt_tokens))
        return await self.send("burst", "long", {"input_ids": prompt, "sampling_params": self.sampling(
            rng, self.args.burst_output_tokens // 2, self.args.burst_output_tokens)})

    # -- loops ---
    async def worker(self, index: int, kinds: List[str], weights: List[float]) -> None:
        rng = random.Random(self.args.seed * 1000 + index + 1)
        while time.monotonic() < self.deadline:
            kind = rng.choices(kinds, weights)[0]
            self.tally.add(await getattr(self, kind if kind != "session" else "session_turn")(rng))

    async def burster(self, tasks: List[asyncio.Task]) -> None:
        rng = random.Random(self.args.seed * 1000 + 999)
        await asyncio.sleep(self.args.burst_every_s / 2)
        while time.monotonic() < self.deadline and self.args.burst_size > 0:
            self.bursts += 1
            for _ in range(self.args.burst_size):
                tasks.append(asyncio.ensure_future(self._tallied(self.burst_request(rng))))
            await asyncio.sleep(self.args.burst_every_s)

    async def _tallied(self, coro) -> None:
        self.tally.add(await coro)

    async def sample_metrics(self) -> Dict[str, float]:
        try:
            async with self.http.get(self.url + "/metrics") as resp:
                return parse_metrics((await resp.read()).decode(errors="replace"))
        except Exception:
            return {}

    async def progress(self, started: float) -> None:
        last_total, last_time = 0, started
        while True:
            await asyncio.sleep(self.args.progress_interval_s)
            now = time.monotonic()
            metrics = await self.sample_metrics()
            queued = sum_series(metrics, "sglang:num_queue_reqs")
            running = sum_series(metrics, "sglang:num_running_reqs")
            self.samples.append({"t_s": round(now - started, 1), "requests": self.tally.total,
                                 "queue": queued, "running": running})
            outcomes = self.tally.by_outcome
            rate = (self.tally.total - last_total) / max(now - last_time, 1e-9)
            last_total, last_time = self.tally.total, now
            if not self.args.no_progress:
                print(f"[soak {now - started:5.0f} s] {self.tally.total:,} requests ({rate:.1f}/s), "
                      f"ok {outcomes['ok']:,}, aborted {outcomes['aborted']:,}, refused {outcomes['refused']:,}, "
                      f"unanswered {outcomes['unanswered']:,}; in flight {self.in_flight}, "
                      f"server queue {fmt_num(queued)}, running {fmt_num(running)}", flush=True)

    async def run(self, seconds: float) -> dict:
        """Traffic for ``seconds``, then drain what is in flight (at most ``--drain-timeout-s``)."""
        import aiohttp

        mix = parse_mix(self.args.mix)
        kinds, weights = list(mix), list(mix.values())
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            self.http = http
            before = await self.sample_metrics()
            started = time.monotonic()
            self.deadline = started + seconds
            burst_tasks: List[asyncio.Task] = []
            workers = [asyncio.ensure_future(self.worker(i, kinds, weights)) for i in range(self.args.concurrency)]
            burster = asyncio.ensure_future(self.burster(burst_tasks))
            progress = asyncio.ensure_future(self.progress(started))
            await asyncio.sleep(seconds)
            traffic_s = time.monotonic() - started
            burster.cancel()
            pending = workers + burst_tasks
            done, left = await asyncio.wait(pending, timeout=self.args.drain_timeout_s)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            drain_s = time.monotonic() - started - traffic_s
            progress.cancel()
            await asyncio.gather(burster, progress, return_exceptions=True)
            for task in done:
                if task.exception() is not None:  # a bug in this script, not the server's: say so
                    raise task.exception()
            after = await self.sample_metrics()
        return {"traffic_s": round(traffic_s, 1), "drain_s": round(drain_s, 1), "cut_at_drain": len(left),
                "bursts": self.bursts, "metrics_before": before, "metrics_after": after}


def parse_mix(text: str) -> Dict[str, float]:
    """``session=0.3,stream_abort=0.2,...`` -> weights (kinds not named get 0)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in DEFAULT_MIX:
            raise ValueError(f"--mix: unknown kind {name!r}; choose among {', '.join(DEFAULT_MIX)}")
        mix[name] = float(weight)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError("--mix gives no kind a positive weight")
    return mix


def fmt_num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def sum_series(metrics: Dict[str, float], name: str) -> Optional[float]:
    values = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


# ---- server-side facts, accounting, probes ----------------------------------------------------------
TIER_LABEL = re.compile(r'tier="([^"]+)"')


def kvc_series(metrics: Dict[str, float]) -> Optional[dict]:
    """The per-tier kvc series of one /metrics scrape: ``{"tiers": {tier: {"tokens", "capacity_tokens",
    "frames"}}, "free_frames"}`` (summed over other labels), or None when the server shows none."""
    names = {"sglang:kvc_tier_tokens": "tokens", "sglang:kvc_tier_capacity_tokens": "capacity_tokens",
             "sglang:kvc_tier_frames": "frames"}
    tiers: Dict[str, Dict[str, float]] = {}
    for key, value in metrics.items():
        name = key.split("{", 1)[0]
        if name in names:
            match = TIER_LABEL.search(key)
            if match:
                entry = tiers.setdefault(match.group(1), {"tokens": 0.0, "capacity_tokens": 0.0, "frames": 0.0})
                entry[names[name]] += value
    free = sum_series(metrics, "sglang:kvc_free_frames")
    if not tiers or free is None:
        return None
    return {"tiers": tiers, "free_frames": free}


def leaked_pages(after: Optional[dict], baseline: Optional[dict], page_size: int, write_tier: Optional[str],
                 write_pages_per_frame: Optional[int]) -> Tuple[Optional[int], dict]:
    """Pages not back where a flush puts them (``used == 0, free == total`` per tier):
      every tier: cached pages still shown (``ceil(tokens / page_size)``);
      lower tiers: the free pages of frames the tier still owns (a flush gives every frame back);
      frames missing from the free pool against the fresh server's flushed baseline that no lower
      tier owns (the write tier's or the reserve's), each worth the write tier's pages per frame
      (1 when unknown).
    ``write_tier``: the ladder's first tier (None: the tier with the largest baseline capacity)."""
    if after is None or baseline is None:
        return None, {"note": "no sglang:kvc_* series on /metrics (start the server with --enable-metrics "
                              "and --kv-compression)"}
    if write_tier not in after["tiers"]:
        write_tier = max(baseline["tiers"], key=lambda t: baseline["tiers"][t]["capacity_tokens"])
    per_tier, lower_frames = {}, 0
    for tier, entry in sorted(after["tiers"].items()):
        base = baseline["tiers"].get(tier, {})
        cached = int(math.ceil(entry["tokens"] / page_size))
        held = 0 if tier == write_tier else max(0, int(entry["capacity_tokens"]) // page_size - cached)
        lower_frames += 0 if tier == write_tier else int(entry["frames"])
        per_tier[tier] = {"cached_pages": cached, "held_free_pages": held, "frames": int(entry["frames"]),
                          "baseline_frames": int(base.get("frames", 0)),
                          "capacity_tokens": int(entry["capacity_tokens"]),
                          "baseline_capacity_tokens": int(base.get("capacity_tokens", 0))}
    missing_frames = max(0, int(baseline["free_frames"] - after["free_frames"]) - lower_frames)
    per_frame = write_pages_per_frame or 1
    total = sum(t["cached_pages"] + t["held_free_pages"] for t in per_tier.values()) + missing_frames * per_frame
    detail = {"per_tier": per_tier, "write_tier": write_tier, "free_frames": int(after["free_frames"]),
              "baseline_free_frames": int(baseline["free_frames"]), "missing_free_frames": missing_frames,
              "write_pages_per_frame": write_pages_per_frame}
    if write_pages_per_frame is None:
        detail["note"] = "write tier's pages per frame unknown (no start-up log): a missing frame counts 1 page"
    return total, detail


def get_text(url: str, timeout: float = 30) -> Optional[str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def flush(url: str, timeout_s: float) -> Tuple[bool, float]:
    """POST /flush_cache until the server accepts (it refuses while requests are in flight):
    (flushed, seconds waited)."""
    start = time.time()
    while True:
        try:
            request = urllib.request.Request(url + "/flush_cache", data=b"", method="POST")
            with urllib.request.urlopen(request, timeout=30) as resp:
                if resp.status == 200:
                    return True, round(time.time() - start, 2)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.time() - start > timeout_s:
            return False, round(time.time() - start, 2)
        time.sleep(0.5)


def flushed_kvc_state(url: str, settle_s: float) -> Optional[dict]:
    """The kvc series right after a flush. The plugin refreshes them when the flush returns; on
    a slower path (another scheduler's series lagging) read again for up to ``settle_s`` until
    two reads agree and no tier shows cached tokens."""
    deadline = time.time() + settle_s
    last = None
    while True:
        text = get_text(url + "/metrics")
        state = kvc_series(parse_metrics(text)) if text else None
        settled = state is not None and state == last and all(t["tokens"] == 0 for t in state["tiers"].values())
        if settled or time.time() > deadline:
            return state
        last = state
        time.sleep(0.5)


def probe_prompts(args, vocab_size: int) -> List[Tuple[List[int], List[int]]]:
    rng = random.Random(args.seed + 7)
    pairs = []
    for _ in range(args.probes):
        prefix = [rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(64, args.probe_prompt_tokens))]
        suffix = [rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(8, 64))]
        pairs.append((prefix, suffix))
    return pairs


def run_probes(url: str, pairs, tokens: int, flush_timeout_s: float) -> Tuple[Optional[List[List[int]]], str]:
    """Greedy outputs of each probe pair (flush, then the prompt, then prompt + suffix, which reads
    the first one's cached KV): (outputs, problem)."""
    outputs = []
    params = {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}
    for prefix, suffix in pairs:
        flushed, waited = flush(url, flush_timeout_s)
        if not flushed:
            return None, f"/flush_cache not accepted within {waited} s"
        for prompt in (prefix, prefix + suffix):
            try:
                reply = post_json(url + "/generate", {"input_ids": prompt, "sampling_params": params})
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError) as err:
                return None, f"probe failed: {type(err).__name__}: {str(err)[:300]}"
            if not isinstance(reply.get("output_ids"), list):
                return None, f"probe reply without output_ids: {str(reply)[:300]}"
            outputs.append(reply["output_ids"])
    return outputs, ""


def server_facts(url: str, log_text: str) -> dict:
    """max_total_num_tokens from /server_info (or the start-up log)."""
    for path in ("/server_info", "/get_server_info"):
        text = get_text(url + path)
        if text:
            try:
                found = find_key(json.loads(text), "max_total_num_tokens")
            except ValueError:
                found = None
            if found:
                return {"max_total_num_tokens": int(found), "source": path}
    match = re.findall(r"max_total_num_tokens=(\d+)", log_text or "")
    if match:
        return {"max_total_num_tokens": int(match[-1]), "source": "server log"}
    return {"max_total_num_tokens": None, "source": None}


def find_key(obj, key):
    if isinstance(obj, dict):
        if obj.get(key) is not None:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = find_key(child, key)
        if found is not None:
            return found
    return None


def write_pages_per_frame(log_text: str, ladder: Optional[str]) -> Optional[int]:
    """The write tier's (the ladder's first) pages per frame from the start-up line
    ``arena: F frames of 4 bf16 pages; k8v8 7 pages/frame (...), ...``."""
    if not ladder or not log_text:
        return None
    tier = ladder.split(",")[0].strip()
    match = re.search(r"arena: .*?\b" + re.escape(tier) + r" (\d+) pages/frame", log_text)
    return int(match.group(1)) if match else None


def scan_log(text: str, shutdown_offset: Optional[int]) -> dict:
    """Tracebacks in the server log (before and after the SIGTERM), first lines of each, and the
    plugin's flush lines."""
    shutdown_offset = len(text) if shutdown_offset is None else shutdown_offset
    starts = [m.start() for m in re.finditer(r"Traceback \(most recent call last\)", text)]
    excerpts = []
    for start in starts[:5]:
        lines = text[start:start + 4000].splitlines()
        end = next((i for i, line in enumerate(lines[1:], 1) if line and not line.startswith((" ", "\t"))), 0)
        excerpts.append("\n".join(lines[: end + 1][-12:]))
    return {"tracebacks": len(starts), "tracebacks_before_sigterm": sum(s < shutdown_offset for s in starts),
            "tracebacks_after_sigterm": sum(s >= shutdown_offset for s in starts), "traceback_excerpts": excerpts,
            "flush_lines": re.findall(r"sglang-kvc: flushed;[^\n]*", text)[-4:],
            "bytes": len(text)}


def shutdown(proc: subprocess.Popen, limit_s: float) -> dict:
    """SIGTERM to the server's main process; seconds until it exited and until its whole process
    group (its children) was gone, SIGKILL to the group after ``limit_s``."""
    start = time.time()
    result = {"signal": "SIGTERM to the main process", "exit_code": None, "main_exit_s": None, "group_gone_s": None}
    if proc.poll() is not None:
        result.update(exit_code=proc.returncode, note="the server had exited before the SIGTERM")
        return result
    proc.send_signal(signal.SIGTERM)
    while time.time() - start < limit_s:
        if result["main_exit_s"] is None and proc.poll() is not None:
            result["main_exit_s"], result["exit_code"] = round(time.time() - start, 2), proc.returncode
        if result["main_exit_s"] is not None and not group_alive(proc.pid):
            result["group_gone_s"] = round(time.time() - start, 2)
            return result
        time.sleep(0.1)
    result["note"] = f"still running {limit_s:g} s after SIGTERM: SIGKILL to the process group"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
        result["exit_code"] = proc.returncode
    except subprocess.TimeoutExpired:
        pass
    return result


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def shutdown_pid(pid: int, limit_s: float) -> dict:
    """SIGTERM to a server this script did not start (``--server-pid``): seconds until it exited."""
    start = time.time()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"signal": "SIGTERM", "main_exit_s": None, "group_gone_s": None, "note": f"no process {pid}"}
    while time.time() - start < limit_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            gone = round(time.time() - start, 2)
            return {"signal": "SIGTERM", "main_exit_s": gone, "group_gone_s": gone}
        time.sleep(0.1)
    return {"signal": "SIGTERM", "main_exit_s": None, "group_gone_s": None,
            "note": f"still running {limit_s:g} s after SIGTERM (left running)"}


# ---- the run ----------------------------------------------------------------------------------------
def model_limits(args) -> Tuple[int, int]:
    """(vocab_size, context_len) from the flags or the model's config.json."""
    config = {}
    if args.model and os.path.exists(os.path.join(args.model, "config.json")):
        with open(os.path.join(args.model, "config.json")) as handle:
            config = json.load(handle)
    vocab = args.vocab_size or config.get("vocab_size") or MODEL_SHAPES[args.model_size]["vocab_size"]
    context = args.context_len or config.get("max_position_embeddings") or 32768
    return int(vocab), int(context)


def server_flags(args) -> List[str]:
    flags = ["--model-path", args.model, "--page-size", str(args.page_size), "--mem-fraction-static",
             str(args.mem_fraction_static), "--max-total-tokens", str(args.max_total_tokens), "--enable-metrics",
             "--skip-server-warmup", "--skip-tokenizer-init", "--random-seed", "0", "--log-level", "info"]
    if args.kv_compression:
        flags += ["--kv-compression", args.kv_compression]
    return flags + list(args.server_arg)


def build_model(path: str, size: str) -> float:
    started = time.time()
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.serving import make_random_llama; "
            "make_random_llama(%r, %r)" % (ROOT, path, size))
    subprocess.run([sys.executable, "-c", code], check=True)
    return round(time.time() - started, 1)


def result_stem(device: str, date: str) -> str:
    return f"soak-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}-{date}"


def evaluate(summary: dict, pressure: dict, args) -> Dict[str, bool]:
    """Each acceptance check of issue #14 on the summary, and whether the budget forced demotions
    and drops during the traffic (the kvc counters advanced)."""
    shutdown_s = summary["clean_shutdown_s"]
    return {
        "alive": summary["alive"] is True,
        "no_tracebacks": summary["tracebacks"] == 0,
        "none_unanswered": summary["unanswered"] == 0,
        "no_leaked_pages": summary["leaked_pages_after_flush"] == 0,
        "probe_outputs_equal": summary["probe_outputs_equal"] is True,
        "every_bad_token_id_refused": summary["bad_token_id_requests_sent"] > 0
        and summary["bad_token_id_requests_refused"] == summary["bad_token_id_requests_sent"],
        "clean_shutdown": shutdown_s is not None and shutdown_s <= args.shutdown_limit_s,
        "enough_requests": summary["requests_total"] >= args.requests_min,
        "enough_aborts": summary["abort_share"] >= args.abort_share_min,
        "demotion_and_drops_seen": bool(pressure.get("demoted_tokens") and sum(pressure["demoted_tokens"].values()) > 0
                                        and pressure.get("dropped_tokens")
                                        and sum(pressure["dropped_tokens"].values()) > 0),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="JSON and server log go here")
    parser.add_argument("--minutes", type=float, default=6.0, help="traffic duration (cut to fit --time-budget-s)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="whole run's wall-clock limit: the traffic ends early to leave --post-reserve-s")
    parser.add_argument("--post-reserve-s", type=float, default=110.0,
                        help="time kept for the drain, flush, probes and shutdown under --time-budget-s")
    parser.add_argument("--requests-min", type=int, default=20000, help="check: at least this many requests")
    parser.add_argument("--abort-share-min", type=float, default=0.10, help="check: at least this share aborted")
    parser.add_argument("--shutdown-limit-s", type=float, default=30.0, help="check: exit within this after SIGTERM")
    parser.add_argument("--shutdown-wait-s", type=float, default=45.0, help="SIGKILL the server after this")
    # the server
    parser.add_argument("--url", default=None, help="drive a running server instead of launching one")
    parser.add_argument("--server-log", default=None, help="with --url: its log (scanned and copied)")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: its pid (SIGTERM at the end)")
    parser.add_argument("--model", default="/tmp/kvc-random-llama", help="built here (random Llama) if missing")
    parser.add_argument("--model-size", default="1b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the model's config.json")
    parser.add_argument("--context-len", type=int, default=None, help="default: the model's max_position_embeddings")
    parser.add_argument("--kv-compression", default="aggressive", help="the ladder ('' for stock SGLang)")
    parser.add_argument("--max-total-tokens", type=int, default=65536,
                        help="KV budget in bf16 tokens (the plugin sizes its arena from these bytes): the running "
                             "requests fit, the cache's unique inflow (bursts, suffixes, new sessions) does not")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--mem-fraction-static", type=float, default=0.80)
    parser.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag (repeat)")
    parser.add_argument("--port", type=int, default=31500)
    parser.add_argument("--startup-timeout-s", type=float, default=420)
    parser.add_argument("--server-module", default="sglang.launch_server",
                        help="module run as the server (the CPU test runs a fake)")
    # the traffic
    parser.add_argument("--concurrency", type=int, default=96, help="client workers (bursts come on top)")
    parser.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
                        help="request kinds and their weights")
    parser.add_argument("--malformed", default=",".join(MALFORMED_VARIANTS),
                        help="malformed request variants to send (comma-separated)")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--turn-tokens", type=int, default=128, help="a user turn has 16..this many tokens")
    parser.add_argument("--max-history", type=int, default=2048, help="a session restarts beyond this many tokens")
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--burst-every-s", type=float, default=30.0)
    parser.add_argument("--burst-size", type=int, default=96, help="requests per burst, on top of --concurrency")
    parser.add_argument("--burst-prompt-tokens", type=int, default=1536, help="a burst prompt has half to all of this")
    parser.add_argument("--burst-output-tokens", type=int, default=192, help="a burst reply has half to all of this")
    parser.add_argument("--request-timeout-s", type=float, default=180.0)
    parser.add_argument("--drain-timeout-s", type=float, default=45.0)
    parser.add_argument("--probes", type=int, default=6, help="greedy probe pairs before and after")
    parser.add_argument("--probe-prompt-tokens", type=int, default=512)
    parser.add_argument("--probe-tokens", type=int, default=32)
    parser.add_argument("--flush-timeout-s", type=float, default=60.0)
    parser.add_argument("--flush-settle-s", type=float, default=10.0,
                        help="after a flush, read /metrics until the kvc series agree twice, at most this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-interval-s", type=float, default=10.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        parse_mix(args.mix)
    except ValueError as err:
        parser.error(str(err))
    unknown = [name for name in args.malformed.split(",") if name and name not in MALFORMED_VARIANTS]
    if unknown or not args.malformed.strip(","):
        parser.error(f"--malformed: unknown or no variant ({', '.join(unknown)}); choose among "
                     f"{', '.join(MALFORMED_VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    device, date = device_name(), datetime.date.today().isoformat()
    stem = os.path.join(args.out, result_stem(device, date))
    json_path, log_path = stem + ".json", stem + ".log"
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(
        sys.argv[1:] if argv is None else argv))
    result = {"device": device, "date": date, "versions": versions(), "command": command,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}

    def save():
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=1)

    servers: List[Server] = []  # the one this run starts, if any

    def kill_server():
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()

    def on_sigterm(signum, frame):  # the device call ran out: leave no server behind
        kill_server()
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return soak(args, result, save, servers, t0, json_path, log_path)
    finally:
        kill_server()
        signal.signal(signal.SIGTERM, previous)


def soak(args, result: dict, save, servers: List[Server], t0: float, json_path: str, log_path: str) -> int:
    """Start the server (unless --url), probe, run the traffic, check, stop; fills ``result``."""
    timings = result.setdefault("timings_s", {})
    server: Optional[Server] = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        if not os.path.exists(os.path.join(args.model, "config.json")):
            timings["model_build"] = build_model(args.model, args.model_size)
        server = Server(server_flags(args), args.port, log_path, module=args.server_module)
        servers.append(server)
        try:
            timings["server_start"] = round(server.start(timeout_s=args.startup_timeout_s), 1)
        except (RuntimeError, TimeoutError) as err:
            result["error"] = f"server did not start: {err}"
            save()
            print(result["error"], file=sys.stderr)
            return 2
        url = server.url
    vocab_size, context_len = model_limits(args)
    log_source = log_path if server is not None else args.server_log

    def read_log() -> str:
        if not log_source or not os.path.exists(log_source):
            return ""
        with open(log_source, errors="replace") as handle:
            return handle.read()

    facts = server_facts(url, read_log())
    facts.update(vocab_size=vocab_size, context_len=context_len,
                 write_pages_per_frame=write_pages_per_frame(read_log(), args.kv_compression))
    result["server"] = facts
    print(f"server {url}: vocab {vocab_size}, context {context_len}, max_total_num_tokens "
          f"{facts['max_total_num_tokens']} ({facts['source']})", flush=True)

    # before: baseline accounting and probes
    flushed, _ = flush(url, args.flush_timeout_s)
    baseline = flushed_kvc_state(url, args.flush_settle_s) if flushed else None
    pairs = probe_prompts(args, vocab_size)
    probe_start = time.monotonic()
    before, before_problem = run_probes(url, pairs, args.probe_tokens, args.flush_timeout_s)
    timings["probes_before"] = round(time.monotonic() - probe_start, 1)
    save()

    # the traffic
    seconds = args.minutes * 60
    if args.time_budget_s:
        seconds = min(seconds, max(0.0, args.time_budget_s - (time.monotonic() - t0) - args.post_reserve_s))
    print(f"traffic for {seconds:.0f} s at concurrency {args.concurrency} (+ bursts of {args.burst_size} every "
          f"{args.burst_every_s:g} s)", flush=True)
    traffic = Traffic(args, url, vocab_size, context_len, facts["max_total_num_tokens"])
    run = asyncio.run(traffic.run(seconds))
    tally = traffic.tally
    result["traffic"] = dict(tally.report(), traffic_s=run["traffic_s"], drain_s=run["drain_s"],
                             cut_at_drain=run["cut_at_drain"], bursts=run["bursts"],
                             malformed_variants=sorted(traffic.malformed_variants))
    result["pressure"] = pressure_report(run["metrics_before"], run["metrics_after"], traffic.samples)
    save()

    # after: alive, accounting, probes
    alive = (server is None or server.proc.poll() is None) and get_text(url + "/health", timeout=30) is not None
    flushed, flush_wait = flush(url, args.flush_timeout_s) if alive else (False, 0.0)
    after_state = flushed_kvc_state(url, args.flush_settle_s) if flushed else None
    write_tier = args.kv_compression.split(",")[0].strip() if args.kv_compression else None
    leaked, accounting = leaked_pages(after_state, baseline, args.page_size, write_tier,
                                      facts["write_pages_per_frame"])
    accounting.update(flushed=flushed, flush_wait_s=flush_wait, baseline=baseline, after=after_state)
    if not flushed:
        leaked, accounting["note"] = None, "/flush_cache was not accepted after the traffic"
    result["accounting"] = accounting
    after, after_problem = run_probes(url, pairs, args.probe_tokens, args.flush_timeout_s) if alive else (None, "dead")
    equal = before is not None and after is not None and before == after
    result["probes"] = {"pairs": len(pairs), "tokens": args.probe_tokens, "equal": equal,
                        "before_problem": before_problem, "after_problem": after_problem,
                        "differing": [i for i, (a, b) in enumerate(zip(before or [], after or [])) if a != b],
                        "before": before, "after": after if not equal else "same as before"}
    alive = alive and after is not None

    # shutdown and the log
    shutdown_offset = len(read_log())
    if server is not None:
        stop = shutdown(server.proc, args.shutdown_wait_s)
        server.log.close()
        server.proc = None  # stopped here; Server.stop must not signal it again
    elif args.server_pid:
        stop = shutdown_pid(args.server_pid, args.shutdown_wait_s)
    else:
        stop = {"note": "not stopped: --url without --server-pid", "group_gone_s": None}
    result["shutdown"] = stop
    if log_source and server is None and os.path.exists(log_source) and os.path.abspath(log_source) != log_path:
        shutil.copyfile(log_source, log_path)
    log_text = read_log()
    result["log"] = scan_log(log_text, shutdown_offset) if log_text else {"tracebacks": None,
                                                                          "note": "no server log to scan"}
    result["log"]["file"] = os.path.basename(log_path) if log_text else None

    outcomes = tally.by_outcome
    bad = tally.of_kind("bad_token_id")
    summary = {
        "alive": bool(alive),
        "tracebacks": result["log"]["tracebacks"],
        "unanswered": outcomes["unanswered"],
        "leaked_pages_after_flush": leaked,
        "probe_outputs_equal": bool(equal),
        "bad_token_id_requests_sent": sum(bad.values()),
        "bad_token_id_requests_refused": bad["refused"],
        "clean_shutdown_s": stop.get("group_gone_s"),
        "requests_total": tally.total,
        "abort_share": round(outcomes["aborted"] / tally.total, 4) if tally.total else 0.0,
        "minutes": round(run["traffic_s"] / 60, 2),
    }
    result["summary"] = summary
    result["checks"] = evaluate(summary, result["pressure"], args)
    result["passed"] = all(result["checks"].values())
    timings["total"] = round(time.monotonic() - t0, 1)
    save()
    print(json.dumps(summary, indent=1))
    failed = [name for name, ok in result["checks"].items() if not ok]
    print("all checks passed" if not failed else f"checks failed: {', '.join(failed)}")
    print(f"wrote {json_path}" + (f" and {os.path.basename(log_path)}" if log_text else ""))
    return 0 if not failed else 1


def pressure_report(before: Dict[str, float], after: Dict[str, float], samples: List[dict]) -> dict:
    """How hard the budget pressed: counters advanced over the traffic, peak queue and running."""
    def delta(name: str) -> Optional[float]:
        b, a = sum_series(before, name), sum_series(after, name)
        return None if a is None else a - (b or 0.0)

    def per_tier(name: str) -> Dict[str, float]:
        out = {}
        for key, value in after.items():
            if key.split("{", 1)[0] == name and TIER_LABEL.search(key):
                tier = TIER_LABEL.search(key).group(1)
                out[tier] = out.get(tier, 0.0) + value - before.get(key, 0.0)
        return out

    queues = [s["queue"] for s in samples if s["queue"] is not None]
    running = [s["running"] for s in samples if s["running"] is not None]
    return {"demoted_tokens": per_tier("sglang:kvc_demoted_tokens_total"),
            "dropped_tokens": per_tier("sglang:kvc_dropped_tokens_total"),
            "retracted_requests": delta("sglang:num_retracted_requests_total"),
            "peak_queue": max(queues) if queues else None, "peak_running": max(running) if running else None,
            "samples": samples}


if __name__ == "__main__":
    sys.exit(main())
