"""Reliability: bad token ids get a 400, metrics are readable after a flush and when idle, and
failure paths (an interrupted demotion, an aborted request over a lower-tier prefix) leave the
tree and the books consistent."""

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.cache_parts import all_nodes, build_cache, evict_everything
from tests.sglang_server_parts import load_plugin_once, server_args, tiny_llama_dir

VOCAB = 512  # tiny_llama_dir's


# ---- 1. token ids outside the vocabulary -------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir()


def tokenizer_manager(args):
    """SGLang's TokenizerManager with the parts of its __init__ that request validation reads
    (its model config and processor set-up run for real; no sockets, no event loop)."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.sampling.sampling_params import SamplingParams

    manager = TokenizerManager.__new__(TokenizerManager)
    manager.server_args = args
    manager.allow_auto_truncate = args.allow_auto_truncate
    manager.skip_tokenizer_init = args.skip_tokenizer_init
    manager.preferred_sampling_params = args.preferred_sampling_params
    manager.sampling_params_class = SamplingParams
    manager.init_model_config()
    manager.init_tokenizer_and_processor()
    return manager


def generate_input(input_ids, max_new_tokens=4):
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(input_ids=input_ids, sampling_params={"max_new_tokens": max_new_tokens})
    obj.normalize_batch_and_arguments()
    return obj


@pytest.fixture(scope="module")
def kvc_manager(model_dir):
    return tokenizer_manager(server_args(model_dir, "--kv-compression", "bf16,k8v8,k4v2", "--page-size", "16"))


@pytest.fixture(scope="module")
def stock_manager(model_dir):
    return tokenizer_manager(server_args(model_dir))


def test_guard_is_registered_on_sglang_request_validation():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugin_once()
    target = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
    assert target in HookRegistry._patched
    assert hasattr(TokenizerManager._validate_one_request, "__wrapped__")


@pytest.mark.parametrize("bad,pos", [(VOCAB, 2), (VOCAB + 1000, 0), (-1, 5), (2**40, 7)])
def test_out_of_vocab_ids_are_refused_naming_position_and_value(kvc_manager, bad, pos):
    assert kvc_manager.model_config.vocab_size == VOCAB
    ids = list(range(1, 9))
    ids[pos] = bad
    with pytest.raises(ValueError, match=rf"input_ids\[{pos}\] = {bad} is outside the model's vocabulary "
                                         rf"\[0, {VOCAB}\)"):
        kvc_manager._validate_one_request(generate_input(ids), ids)


def test_the_refusal_comes_out_of_tokenization_and_is_a_400(kvc_manager):
    """The path /generate takes: ``_tokenize_one_request`` (ids given, tokenizer skipped) raises
    the ValueError, and SGLang's HTTP server answers a ValueError with its 400 response."""
    from sglang.srt.entrypoints.http_server import _create_error_response

    ids = [1, 2, 3, VOCAB + 7, 4]
    with pytest.raises(ValueError) as err:
        asyncio.run(kvc_manager._tokenize_one_request(generate_input(ids)))
    response = _create_error_response(err.value)
    assert response.status_code == 400
    message = json.loads(response.body)["error"]["message"]
    assert "input_ids[3]" in message and str(VOCAB + 7) in message


class TokenizerFront:
    """Stands in for the parts of SGLang's ``TokenizerManager.generate_request`` around
    tokenization (its per-request state, the hand-off to the scheduler, the reply); tokenization
    and validation are the real manager's."""

    def __init__(self, manager):
        self.manager = manager
        self.served = 0

    async def generate_request(self, obj, request=None):
        obj.normalize_batch_and_arguments()
        timing = SimpleNamespace(set_tokenize_finish_time=lambda: None)
        self.manager.rid_to_state = {obj.rid: SimpleNamespace(time_stats=timing)}
        tokenized = await self.manager._tokenize_one_request(obj)
        self.served += 1
        yield {"text": "", "output_ids": [], "meta_info": {"prompt_tokens": len(tokenized.input_ids)}}

    def create_abort_task(self, obj):
        return None  # nothing reached a scheduler: nothing to abort


def test_generate_route_answers_400_and_keeps_serving(kvc_manager, monkeypatch):
    """Through SGLang's real FastAPI app: a bad id gets a 400 naming position and value, the next
    request is served; with ``stream`` the error event carries code 400."""
    from fastapi.testclient import TestClient
    from sglang.srt.entrypoints import http_server

    front = TokenizerFront(kvc_manager)
    monkeypatch.setattr(http_server, "_global_state", http_server._GlobalState(
        tokenizer_manager=front, template_manager=None, scheduler_info={}))
    client = TestClient(http_server.app)
    bad = client.post("/generate", json={"input_ids": [1, 2, VOCAB + 88], "sampling_params": {"max_new_tokens": 2}})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == f"input_ids[2] = {VOCAB + 88} is outside the model's vocabulary [0, {VOCAB})"
    good = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    assert good.status_code == 200 and good.json()["meta_info"]["prompt_tokens"] == 3 and front.served == 1
    stream = client.post("/generate", json={"input_ids": [-4, 2], "stream": True})
    events = [json.loads(line[len("data: "):]) for line in stream.text.splitlines()
              if line.startswith("data: {")]
    assert events[0]["error"]["code"] == 400 and "input_ids[0] = -4" in events[0]["error"]["message"]


def test_each_request_of_a_batch_is_checked(kvc_manager):
    batch = generate_input([[1, 2, 3], [4, VOCAB, 6]])
    kvc_manager._validate_one_request(batch[0], batch[0].input_ids)
    with pytest.raises(ValueError, match=r"input_ids\[1\] = 512"):
        kvc_manager._validate_one_request(batch[1], batch[1].input_ids)


def test_valid_ids_and_no_ids_pass(kvc_manager):
    ids = [0, 1, VOCAB - 1]
    kvc_manager._validate_one_request(generate_input(ids), ids)
    kvc_manager._validate_one_request(generate_input(ids), None)


def test_guard_passes_through_without_kv_compression(stock_manager):
    ids = [1, VOCAB + 5]
    stock_manager._validate_one_request(generate_input(ids), ids)  # stock SGLang's behaviour, unchanged


def test_sglang_own_validation_still_runs_first(kvc_manager):
    ids = [VOCAB] * 4
    with pytest.raises(ValueError, match="context length"):
        kvc_manager._validate_one_request(generate_input(ids, max_new_tokens=10_000), ids)


def test_check_input_ids_names_non_integers():
    from sglang_kvc.patches.guards import check_input_ids

    with pytest.raises(ValueError, match=r"input_ids\[1\] = 'a' is not a token id"):
        check_input_ids([1, "a"], VOCAB)
    with pytest.raises(ValueError, match=r"input_ids\[0\] = True is not a token id"):
        check_input_ids([True, 700], VOCAB)
    check_input_ids([], VOCAB)
    check_input_ids(torch.tensor([0, VOCAB - 1]), VOCAB)
    with pytest.raises(ValueError, match=r"input_ids\[1\] = 512 is outside"):
        check_input_ids(torch.tensor([3, VOCAB]), VOCAB)
    with pytest.raises(ValueError, match=r"input_ids\[2\] = 600.5 is not a token id"):
        check_input_ids([1, 2, 600.5], VOCAB)


# ---- 2. metrics after a flush and when idle ----------------------------------------------------
def gauge(registry, name, **labels):
    return registry.get_sample_value(name, dict(labels))


def scheduler_of(cache, driver, metrics_enabled=True):
    """The parts of SGLang's Scheduler that ``flush_cache`` and ``on_idle``'s kvc hook touch."""
    reporter = SimpleNamespace(current_scheduler_metrics_enabled=metrics_enabled, is_stats_logging_rank=True,
                               metrics_collector=SimpleNamespace(labels={"model_name": "tiny"}),
                               reset_metrics=lambda: None)
    scheduler = SimpleNamespace(
        tree_cache=cache, req_to_token_pool=cache.req_to_token_pool, token_to_kv_pool_allocator=driver.allocator,
        grammar_manager=SimpleNamespace(clear=lambda: None), metrics_reporter=reporter, draft_worker=None,
        is_fully_idle=lambda: not driver.running, cur_batch_for_debug=None, last_batch=None, waiting_queue=[],
        running_batch=SimpleNamespace(reqs=driver.running))
    reporter.scheduler = scheduler
    return scheduler


@pytest.fixture
def metrics_registry(monkeypatch):
    from sglang_kvc.patches import metrics

    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.KVCMetrics({"model_name": "tiny"}, registry=registry))
    monkeypatch.setattr(metrics, "_last_state", None)
    return registry


def run_some(driver, rounds=10):
    for seed in range(rounds):  # more history than the write tier holds: lower tiers fill too
        driver.run([seed * 50 + i for i in range(17)])


def test_flush_refreshes_every_tier_and_logs_once(metrics_registry, caplog):
    """SGLang's own ``Scheduler.flush_cache`` (hooked through the registry) resets the tree and
    clears the allocator; the kvc hook then shows an empty cache on /metrics and logs it."""
    load_plugin_once()
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_kvc.patches.metrics import update_from_reporter

    cache, driver = build_cache(frames=8, page_size=4)
    allocator = driver.allocator
    scheduler = scheduler_of(cache, driver)
    run_some(driver)
    update_from_reporter(scheduler.metrics_reporter)  # what the last batch's report showed
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="k8v8") > 0
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="k4v2") > 0

    with caplog.at_level(logging.INFO, logger="sglang_kvc.patches.plugin"):
        assert Scheduler.flush_cache(scheduler, empty_cache=False) is True
    cache.check_invariants()
    regular = allocator.regular_frames
    for tier in ("bf16", "k8v8", "k4v2"):
        assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier=tier) == 0
    assert gauge(metrics_registry, "sglang:kvc_tier_frames", model_name="tiny", tier="bf16") == 1  # padding page
    assert gauge(metrics_registry, "sglang:kvc_tier_frames", model_name="tiny", tier="k8v8") == 0
    assert gauge(metrics_registry, "sglang:kvc_tier_capacity_tokens", model_name="tiny", tier="k4v2") == 0
    assert gauge(metrics_registry, "sglang:kvc_free_frames", model_name="tiny") == regular - 1
    assert gauge(metrics_registry, "sglang:kvc_bytes_saved", model_name="tiny") == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sglang-kvc: flushed")]
    assert lines == [f"sglang-kvc: flushed; tiers bf16 0 tok/1 fr, k8v8 0 tok/0 fr, k4v2 0 tok/0 fr; "
                     f"free {regular - 1}/{allocator.num_frames} fr; demoted {sum(cache.counters.demoted_in)}, "
                     f"dropped {sum(cache.counters.dropped)} tokens so far"]


def test_flush_refused_while_busy_changes_nothing(metrics_registry):
    load_plugin_once()
    from sglang.srt.managers.scheduler import Scheduler

    cache, driver = build_cache(frames=8, page_size=4)
    scheduler = scheduler_of(cache, driver)
    run_some(driver, 3)
    request = driver.start(list(range(9)))
    assert Scheduler.flush_cache(scheduler, empty_cache=False) is False
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="bf16") is None
    driver.finish(request)
    cache.check_invariants()


def test_idle_scheduler_refreshes_once_after_a_change(metrics_registry, monkeypatch):
    load_plugin_once()
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_kvc.patches import metrics, plugin

    cache, driver = build_cache(frames=8, page_size=4)
    scheduler = scheduler_of(cache, driver)
    assert hasattr(Scheduler.on_idle, "__wrapped__")  # the hook is applied on SGLang's method
    refreshes = []
    original = metrics.update_from_reporter
    monkeypatch.setattr(metrics, "update_from_reporter", lambda *a, **k: refreshes.append(k) or original(*a, **k))

    run_some(driver, 4)
    plugin._refresh_when_idle(None, scheduler)
    assert refreshes == [{"exact": True}]
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="bf16") == cache.tier_cached[0]
    assert gauge(metrics_registry, "sglang:kvc_free_frames", model_name="tiny") == len(driver.allocator.free_frames())
    plugin._refresh_when_idle(None, scheduler)  # nothing changed: no second refresh
    assert len(refreshes) == 1

    request = driver.start(list(range(300, 313)))  # busy: no refresh
    plugin._refresh_when_idle(None, scheduler)
    assert len(refreshes) == 1
    driver.finish(request)
    plugin._refresh_when_idle(None, scheduler)
    assert len(refreshes) == 2
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="bf16") == cache.tier_cached[0]

    cache.reset()  # what flush_cache does, seen by the idle check alone
    driver.allocator.clear()
    plugin._refresh_when_idle(None, scheduler)
    assert len(refreshes) == 3
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="bf16") == 0
    assert gauge(metrics_registry, "sglang:kvc_free_frames", model_name="tiny") == driver.allocator.regular_frames - 1


def test_idle_hook_does_nothing_without_metrics(metrics_registry):
    from sglang_kvc.patches import plugin

    cache, driver = build_cache(frames=8, page_size=4)
    scheduler = scheduler_of(cache, driver, metrics_enabled=False)
    run_some(driver, 2)
    plugin._refresh_when_idle(None, scheduler)
    assert gauge(metrics_registry, "sglang:kvc_tier_tokens", model_name="tiny", tier="bf16") is None


# ---- 3a. a demotion interrupted by an exception ------------------------------------------------
class Boom(RuntimeError):
    pass


def fail_nth_call(monkeypatch, obj, name, n):
    """Make the ``n``-th call of ``obj.name`` raise (before it does anything); returns the call log."""
    original = getattr(obj, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise Boom(f"{name} call {n}")
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, failing)
    return calls


def check_cache_still_works(cache, driver):
    cache.check_invariants()
    run_some(driver, 6)
    cache.check_invariants()
    evict_everything(cache)
    cache.check_invariants()
    assert sum(cache.tier_cached) == 0
    assert driver.allocator.available_size() == driver.allocator.size  # nothing leaked


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_an_interrupted_demotion_leaves_tree_and_books_consistent(monkeypatch, n):
    """The pool's requantize (``move_pages``) raises on its n-th call, mid-eviction under pressure
    (cascades included: a later call may be a tier-1 -> tier-2 move made to find room); the
    exception reaches the caller, and the tree and the books still agree (no node points at pages
    it does not own, no slot leaks)."""
    method = "move_pages"
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache, driver = build_cache(frames=8, page_size=4)
    run_some(driver, 8)
    cache.check_invariants()
    calls = fail_nth_call(monkeypatch, driver.pool, method, n)
    raised = False
    for seed in range(40):  # keep the pressure on until the n-th call happens
        try:
            cache.evict(EvictParams(num_tokens=driver.allocator.size))
            run_some(driver, 2) if seed % 2 else driver.run([900 + seed * 7 + i for i in range(29)])
        except Boom:
            raised = True
            break
    assert raised, f"{method} was called {len(calls)} times, fewer than {n}"
    assert calls[-1][0] in (0, 1)  # n=1 here interrupts a tier-1 -> tier-2 cascade move, the others 0 -> 1
    monkeypatch.undo()
    for request in list(driver.running):  # a request caught mid-admission by the exception
        driver.allocator.free(request.new_slots)
        cache.dec_lock_ref(request.last_node)
        driver.running.remove(request)
    check_cache_still_works(cache, driver)


def test_an_interrupted_write_compaction_keeps_tree_books_and_data(monkeypatch):
    """``copy_pages`` raises inside ``_compact_write`` (the same set-up as the compaction test in
    test_compressed_cache): the claimed target pages go back, every node keeps its pages and data."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams

    from tests.sglang_parts import key, write_random

    cache, driver = build_cache(frames=8, page_size=4)
    allocator = driver.allocator
    slots = allocator.alloc(allocator.available_size())
    write_random(driver.pool, slots, seed=1)
    for frame in range(1, 8):  # every frame: one cached page, one free page
        cached, free = slots[(2 * frame - 1) * 4:(2 * frame) * 4], slots[(2 * frame) * 4:(2 * frame + 1) * 4]
        cache.insert(InsertParams(key=key([frame * 10 + i for i in range(4)]), value=cached))
        allocator.free(free)
    allocator.free(slots[:4])
    available = allocator.available_size()
    before = {n: (n.value.clone(), driver.pool.read_tokens(0, n.value)) for n in all_nodes(cache)}
    fail_nth_call(monkeypatch, driver.pool, "copy_pages", 1)
    with pytest.raises(Boom):
        cache._compact_write(3)
    monkeypatch.undo()
    assert allocator.available_size() == available
    for node, (value, (k, v)) in before.items():
        assert torch.equal(node.value, value)
        rk, rv = driver.pool.read_tokens(0, node.value)
        assert torch.equal(rk, k) and torch.equal(rv, v)
    cache.check_invariants()
    assert cache._compact_write(3) == 3  # and it works afterwards
    check_cache_still_works(cache, driver)


def test_an_interrupted_lower_compaction_keeps_tree_books_and_data(monkeypatch):
    from tests.cache_parts import check_node_data

    from tests.cache_parts import sparse_middle_tier

    cache, driver, frames_before = sparse_middle_tier()
    allocator = driver.allocator
    cache.check_invariants()
    free_before = allocator.lower[1].free_slots()
    fail_nth_call(monkeypatch, driver.pool, "copy_pages", 1)
    with pytest.raises(Boom):
        cache._compact_lower()
    monkeypatch.undo()
    assert allocator.lower[1].free_slots() == free_before
    cache.check_invariants()
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node)
    assert cache._compact_lower() and allocator.frames_per_tier()[1] < frames_before
    check_cache_still_works(cache, driver)


def test_an_interrupted_demotion_inside_admission_keeps_the_books(monkeypatch):
    """The exception escapes ``evict`` while a request is being admitted (its prefix locked, as
    SGLang's alloc_for_extend evicts): after releasing the request's lock the books agree."""
    cache, driver = build_cache(frames=8, page_size=4)
    run_some(driver, 4)  # the write tier is full of cached history
    fail_nth_call(monkeypatch, driver.pool, "move_pages", 1)
    tokens = list(range(17)) + [800 + i for i in range(40)]  # prefix cached, needs room
    match = driver.match(tokens[:-1])  # what start matches and locks
    assert len(match.device_indices) == 16
    with pytest.raises(Boom):
        driver.start(tokens)
    assert match.last_device_node.lock_ref == 1 and not driver.running
    monkeypatch.undo()
    cache.dec_lock_ref(match.last_device_node)
    check_cache_still_works(cache, driver)


# ---- 3b. an aborted request over a lower-tier prefix ------------------------------------------
def lower_tier_prefix(cache, driver, prefix_tokens):
    driver.run(prefix_tokens)
    assert cache.demote(0, cache.tier_cached[0]) == cache.tier_cached[1] > 0  # the whole prefix, one tier down
    node = driver.match(prefix_tokens).last_device_node
    assert node is not cache.root_node and node.kvc_tier >= 1
    return node


def aborted_req(cache, driver, prompt, output_len):
    """A real-shaped SGLang request (the fields ``cache_finished_req`` reads) admitted over its
    cached prefix, its prompt and ``output_len`` outputs' KV allocated and written."""
    match = driver.match(prompt[:-1])
    prefix = match.device_indices
    cache.inc_lock_ref(match.last_device_node)
    total = len(prompt) + output_len
    new = driver.allocator.alloc(-(-(total - len(prefix)) // driver.page_size) * driver.page_size)
    assert new is not None
    row = 3
    req_to_token = cache.req_to_token_pool.req_to_token
    req_to_token[row, :len(prefix)] = prefix.to(req_to_token.dtype)
    req_to_token[row, len(prefix):total] = new[:total - len(prefix)].to(req_to_token.dtype)
    req = SimpleNamespace(req_pool_idx=row, origin_input_ids=list(prompt), output_ids=list(range(output_len)),
                          extra_key=None, cache_protected_len=len(prefix), last_node=match.last_device_node,
                          priority=0, session_id=None)
    return req, new, total


@pytest.mark.parametrize("output_len", [0, 5, 13])
def test_aborted_request_over_a_lower_tier_prefix_frees_exactly_its_pages(output_len):
    """SGLang aborts (or finishes without caching) through ``cache_finished_req(is_insert=False)``:
    the request's own pages go back, the lower-tier prefix it locked is unlocked and kept."""
    cache, driver = build_cache(frames=8, page_size=4)
    prefix_tokens = list(range(100, 117))
    node = lower_tier_prefix(cache, driver, prefix_tokens)
    tiers_before, available_before = list(cache.tier_cached), driver.allocator.available_size()
    evictable_before = cache.evictable_size()
    prompt = prefix_tokens + [300 + i for i in range(10)]
    req, new, total = aborted_req(cache, driver, prompt, output_len)
    assert node.lock_ref == 1 and driver.allocator.lower[node.kvc_tier].pinned.sum() > 0
    cache.check_invariants([len(new), 0, 0])

    cache.cache_finished_req(req, is_insert=False, kv_len_to_handle=total - 1 if output_len else total)
    assert driver.allocator.available_size() == available_before
    assert cache.tier_cached == tiers_before and cache.evictable_size() == evictable_before
    assert node.lock_ref == 0 and all(b.pinned.sum() == 0 for b in driver.allocator.lower.values())
    cache.check_invariants()
    assert driver.match(prefix_tokens).last_device_node is node  # the prefix is still cached


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_retracted_request_over_a_lower_tier_prefix_frees_exactly_its_pages(chunked):
    """The step driver's retraction (SGLang's ``release_req`` on retract: free the request's own
    slots, unlock) after prefill (in one chunk, or two with the first cached in the tree as
    ``cache_unfinished_req`` does) and some decode steps."""
    from sglang_kvc.replay import StepDriver

    cache, base = build_cache(frames=8, page_size=4)
    driver = StepDriver(cache, base.allocator, base.pool, base.kv_source)
    prefix_tokens = list(range(100, 117))
    node = lower_tier_prefix(cache, driver, prefix_tokens)
    available_before, tiers_before = driver.allocator.available_size(), list(cache.tier_cached)
    tokens = prefix_tokens + [400 + i for i in range(14)] + [500 + i for i in range(6)]
    prompt_len = len(prefix_tokens) + 14
    slots, last = driver.match_request(tokens, prompt_len)
    request = driver.admit(tokens, prompt_len, slots, last)
    assert request.protected == 16 and last.kvc_tier >= 1
    if chunked:
        assert driver.extend(request, 8)
        request.computed += 8
        driver.cache_unfinished(request)  # a non-final chunk: the tree takes its pages, the lock moves
    assert driver.extend(request, prompt_len - request.computed)
    request.computed = prompt_len
    for _ in range(5):
        request.decoded += 1
        assert driver.grow_for_decode(request)
    driver.retract(request)
    # the chunk the tree took stays cached (as in SGLang); everything else the request held is back
    chunk = cache.tier_cached[0] - tiers_before[0]
    assert chunk == (8 if chunked else 0) and cache.tier_cached[1:] == tiers_before[1:]
    assert driver.allocator.available_size() == available_before - chunk
    assert node.lock_ref == 0 and all(b.pinned.sum() == 0 for b in driver.allocator.lower.values())
    cache.check_invariants()
    evict_everything(cache)
    cache.check_invariants()
    assert driver.allocator.available_size() == driver.allocator.size


@pytest.mark.parametrize("params,fragment", [
    ({"max_new_tokens": "16"}, "sampling_params.max_new_tokens = '16' must be a number"),
    ({"max_new_tokens": 4, "temperature": [1.0]}, r"sampling_params.temperature = \[1.0\] must be a number"),
])
def test_sampling_params_of_the_wrong_type_are_a_400_not_a_500(kvc_manager, stock_manager, params, fragment):
    """SGLang raises a TypeError for them (a 500 and a traceback); with --kv-compression they are a
    ValueError naming the field (a 400). Stock SGLang keeps its behaviour."""
    from sglang.srt.entrypoints.http_server import _create_error_response
    from sglang.srt.managers.io_struct import GenerateReqInput

    def request():
        obj = GenerateReqInput(input_ids=[1, 2, 3], sampling_params=dict(params))
        obj.normalize_batch_and_arguments()
        return obj

    with pytest.raises(ValueError, match=fragment) as err:
        asyncio.run(kvc_manager._tokenize_one_request(request()))
    assert _create_error_response(err.value).status_code == 400
    if "max_new_tokens" in fragment:  # stock: SGLang's own TypeError (its HTTP server answers 500)
        with pytest.raises(TypeError):
            stock_manager._validate_one_request(request(), [1, 2, 3])
    kvc_manager._validate_one_request(generate_input([1, 2, 3]), [1, 2, 3])  # good ones pass
