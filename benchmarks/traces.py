"""Seeded, deterministic request traces (token ids only) for the cache simulator and the end-to-end benchmark.

A trace is a list of requests, each with a fixed prompt and a fixed output (what the model "says"),
and an arrival rule: a request arrives ``delay_s`` after the request it follows has finished (the
previous round of its session), or ``delay_s`` after the start of the trace when it follows none.
"""

from __future__ import annotations

import dataclasses
import functools
from array import array
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

VOCAB_SIZE = 128256  # Llama 3's vocabulary
FIRST_ORDINARY_TOKEN = 1000  # ids below this stand for special tokens and are never drawn


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request. Invariant: ``follows`` (if set) is the index of an earlier request of the same
    session; the request cannot arrive before that one has finished."""

    session: int
    round: int
    prompt: array  # array('q') of token ids
    output: array  # the fixed output; it occupies KV while the request runs and is cached after
    follows: Optional[int]
    delay_s: float

    @property
    def sequence(self) -> array:
        return self.prompt + self.output


@dataclasses.dataclass(frozen=True)
class Trace:
    """A named list of requests and the parameters that generated it (enough to regenerate it)."""

    name: str
    params: Dict[str, object]
    requests: Tuple[TraceRequest, ...]

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_rounds(self) -> int:
        return 1 + max(r.round for r in self.requests)

    @functools.cached_property
    def distinct_tokens(self) -> int:
        """Tokens in the union prefix tree of every request's prompt + output: the KV a cache
        that never evicts would hold (before page alignment)."""
        root: dict = {}
        total = 0
        for request in self.requests:
            node = root
            for token in request.sequence:
                child = node.get(token)
                if child is None:
                    child = node[token] = {}
                    total += 1
                node = child
        return total

    def working_set_tokens(self, page_size: int) -> int:
        """KV slots a never-evicting cache needs with one request running at a time: the distinct
        tokens rounded up to pages, plus one page of rounding for the running request and SGLang's
        padding page. A stock bf16 cache given this many slots' bytes never evicts at concurrency 1."""
        pages = -(-self.distinct_tokens // page_size)
        return (pages + 2) * page_size

    @property
    def waiting_floor_s(self) -> float:
        """The trace's own waiting: the longest chain of delays (a session's start, then the delay
        before each of its later rounds). A server that answered every request at once would still
        take this long, so it bounds any system's output throughput on the trace."""
        chained: List[float] = []
        for request in self.requests:  # a request follows an earlier one
            chained.append(request.delay_s + (chained[request.follows] if request.follows is not None else 0.0))
        return max(chained, default=0.0)


class _TokenSource:
    """Draws token segments from one seeded generator, in call order."""

    def __init__(self, seed: int, vocab_size: int = VOCAB_SIZE):
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size

    def tokens(self, length: int) -> array:
        return array("q", self.rng.integers(FIRST_ORDINARY_TOKEN, self.vocab_size, size=length).tolist())

    def length(self, mean: int, range_ratio: float) -> int:
        """Uniform in ``[mean * range_ratio, mean]`` like bench_serving's ``--random-range-ratio``
        (``range_ratio == 1`` gives exactly ``mean``)."""
        low = max(1, int(mean * range_ratio))
        return int(self.rng.integers(low, mean + 1))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))


def agentic_trace(sessions: int = 32, rounds: int = 8, system_len: int = 1024, tool_len: int = 768,
                  user_len: int = 64, output_len: int = 128, range_ratio: float = 0.5,
                  stagger_s: float = 0.5, tool_delay_s: Tuple[float, float] = (0.5, 3.0),
                  seed: int = 0) -> Trace:
    """Multi-turn agent sessions sharing one system prompt.

    Round 0 of a session is ``system + tool chunk + user turn``; round ``r > 0`` is the whole
    previous context (prompt and output of round ``r - 1``) + a new tool-output chunk + a user turn.
    Every output is ``output_len`` tokens. Session ``s`` starts at ``s * stagger_s``; each later
    round arrives a seeded tool-execution delay after the previous round finished.
    Tool chunks are ``range_ratio * tool_len .. tool_len`` tokens long.
    """
    source = _TokenSource(seed)
    system = source.tokens(system_len)
    requests: List[TraceRequest] = []
    for session in range(sessions):
        context, previous = system, None
        for rnd in range(rounds):
            prompt = context + source.tokens(source.length(tool_len, range_ratio)) + source.tokens(user_len)
            output = source.tokens(output_len)
            delay = session * stagger_s if previous is None else source.uniform(*tool_delay_s)
            requests.append(TraceRequest(session, rnd, prompt, output, previous, delay))
            previous = len(requests) - 1
            context = prompt + output
    params = dict(sessions=sessions, rounds=rounds, system_len=system_len, tool_len=tool_len,
                  user_len=user_len, output_len=output_len, range_ratio=range_ratio,
                  stagger_s=stagger_s, tool_delay_s=list(tool_delay_s), seed=seed)
    return Trace("agentic", params, tuple(requests))


def shared_prefix_trace(groups: int = 16, questions_per_group: int = 16, system_len: int = 2048,
                        question_len: int = 128, output_len: int = 256, shuffle: bool = True,
                        seed: int = 0, max_concurrency: Optional[int] = None) -> Trace:
    """bench_serving's ``generated-shared-prefix`` dataset in token ids: ``groups`` system prompts,
    each followed by ``questions_per_group`` distinct questions; all requests arrive at once, in
    a seeded shuffled order (bench_serving shuffles unless ``--gsp-ordered``), and, with
    ``max_concurrency`` (bench_serving's ``--max-concurrency``), at most that many are in flight: the
    next is sent when one finishes. Each request is its own session (``round`` 0); ``session``
    holds its group."""
    source = _TokenSource(seed)
    systems = [source.tokens(system_len) for _ in range(groups)]
    pairs = [(g, systems[g] + source.tokens(question_len), source.tokens(output_len))
             for g in range(groups) for _ in range(questions_per_group)]
    order = source.rng.permutation(len(pairs)) if shuffle else np.arange(len(pairs))
    requests = tuple(TraceRequest(pairs[i][0], 0, pairs[i][1], pairs[i][2], None, 0.0) for i in order)
    params = dict(groups=groups, questions_per_group=questions_per_group, system_len=system_len,
                  question_len=question_len, output_len=output_len, shuffle=shuffle, seed=seed,
                  max_concurrency=max_concurrency)
    return Trace("shared_prefix", params, requests)


def scaled_agentic_trace(params: Dict, time_scale: float) -> Trace:
    """The agentic trace of ``params`` (a trace's ``params``, as results JSONs keep them) with its delays
    times ``time_scale`` (the e2e client's ``--time-scale``: it multiplies the same delays)."""
    params = dict(params, tool_delay_s=tuple(params["tool_delay_s"]))
    if time_scale != 1.0:
        params.update(stagger_s=params["stagger_s"] * time_scale,
                      tool_delay_s=tuple(d * time_scale for d in params["tool_delay_s"]))
    return agentic_trace(**params)


TRACES = {"agentic": agentic_trace, "shared_prefix": shared_prefix_trace}
