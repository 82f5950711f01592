"""The allocator's host mirror of SGLang's free lists stays a subset of them (equal while complete)
through every alloc, free and merge, so the cache finds free frames without reading the device."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sglang.srt.mem_cache.allocator import paged
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_kvc.host_copy import HostCopyRing
from tests.cache_parts import all_nodes, build_cache
from tests.sglang_parts import build_pool, key


class _Launcher:
    """Stands in for a Triton kernel on CPU: ``kernel[grid](*args)`` calls ``fn(*args)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def _extend_on_cpu(prefix_lens, seq_lens, last_loc, free_pages, out_indices, _bs_pow2, page_size):
    needed = int(((seq_lens + page_size - 1) // page_size - (prefix_lens + page_size - 1) // page_size).sum())
    if needed > len(free_pages):  # the alloc returns None; the GPU kernel's reads past the end are masked
        return
    paged.alloc_extend_naive(prefix_lens, seq_lens, last_loc, free_pages, out_indices, page_size, "cpu")


def _decode_on_cpu(seq_lens, last_loc, free_pages, out_indices, _bs_pow2, page_size):
    new_page = 0
    for i in range(len(seq_lens)):
        if (seq_lens[i] - 1) % page_size == 0:  # the token starts a page: the next free one
            if new_page >= len(free_pages):
                return
            out_indices[i] = free_pages[new_page] * page_size
            new_page += 1
        else:
            out_indices[i] = last_loc[i] + 1


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    monkeypatch.setattr(paged, "alloc_extend_kernel", _Launcher(_extend_on_cpu))
    monkeypatch.setattr(paged, "alloc_decode_kernel", _Launcher(_decode_on_cpu))


class MirrorMachine(RuleBasedStateMachine):
    """Requests grow by alloc_extend / alloc_decode / alloc and are freed with or without host ids,
    inside or outside a free group; lower tiers take and give back frames meanwhile."""

    def __init__(self):
        super().__init__()
        self.page_size = 2
        self.pool, self.allocator = build_pool(ladder="bf16,k8v8", frames=6, page_size=self.page_size)
        self.requests = []  # slot tensors, whole pages but for the last

    def _pick(self, data):
        return self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))

    @rule(tokens=st.integers(1, 9))
    def alloc_extend(self, tokens):
        one = torch.tensor([1])
        out = self.allocator.alloc_extend(one * 0, one * 0, one * tokens, one * tokens, one * 0 - 1, tokens)
        if out is not None:
            self.requests.append(out)

    @rule(pages=st.integers(1, 4))
    def alloc(self, pages):
        out = self.allocator.alloc(pages * self.page_size)
        if out is not None:
            self.requests.append(out)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def alloc_decode(self, data):
        request = self._pick(data)
        seq = torch.tensor([len(request) + 1])
        out = self.allocator.alloc_decode(seq, seq, request[-1:])
        self.requests.append(request if out is None else torch.cat((request, out)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), known=st.booleans())
    def free(self, data, known):
        request = self._pick(data)
        if known:
            self.allocator.free_known(request, np.unique(request.numpy() // self.page_size))
        else:
            self.allocator.free(request)

    @rule()
    def free_group(self):
        if self.allocator.is_not_in_free_group:
            self.allocator.free_group_begin()
        else:
            self.allocator.free_group_end()

    @rule()
    def merge(self):
        self.allocator.merge_and_sort_free()

    @rule(count=st.integers(1, 2))
    def take_and_return_frames(self, count):
        self.allocator.take_frames(1, count)
        self.allocator.release_empty_frames()

    @rule()
    def exact_read(self):
        self.allocator.free_frames()
        assert self.allocator.free_mirror.complete

    @invariant()
    def mirror_is_a_subset_and_complete_means_equal(self):
        allocator = self.allocator
        mirror = allocator.free_mirror
        assert set(mirror.free.tolist()) <= set(allocator.free_pages.tolist())
        assert set(mirror.release.tolist()) <= set(allocator.release_pages.tolist())
        if mirror.complete:
            assert set(mirror.free.tolist()) == set(allocator.free_pages.tolist())
            assert set(mirror.release.tolist()) == set(allocator.release_pages.tolist())
        assert bool((allocator.free_pages[1:] > allocator.free_pages[:-1]).all()), "free_pages lost its order"
        if allocator.is_not_in_free_group:
            allocator.check_books()

    def teardown(self):
        if not self.allocator.is_not_in_free_group:
            self.allocator.free_group_end()
        for request in self.requests:
            self.allocator.free(request)
        self.allocator.check_books()
        assert self.allocator.available_size() == self.allocator.size, "a page leaked"


MirrorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestMirror = MirrorMachine.TestCase


@contextlib.contextmanager
def no_device_reads():
    """Fail on any tensor-to-host read (on CPU these cost nothing, so they are made to raise)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a device-to-host read")
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "item", "tolist")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def no_blocking_copies():
    """Fail on what would make the host wait for the stream on a GPU although it reads nothing: a
    blocking host-to-device copy (PyTorch's ``memcpy_and_sync``: copy, then wait for the stream) and
    ``torch.unique`` (its output size comes from the device), ``torch.isin`` and a Python scalar written
    through a tensor index (``mask[ids] = True`` copies the scalar to the device, blocking: the H200
    replay of 7004ffa caught 613 of these two kinds, ``cache-host-nvidia-h200-2026-12-02-7004ffa.json``).
    Host ids reach the device through ``host_copy.host_to_device`` (pinned, asynchronous)."""
    def refuse_unique(*args, **kwargs):
        raise AssertionError("torch.unique: its size is read from the device")

    def refuse_isin(*args, **kwargs):
        raise AssertionError("torch.isin synchronizes on a GPU")
    setitem = torch.Tensor.__setitem__

    def guarded_setitem(self, index, value):
        if isinstance(index, torch.Tensor) and isinstance(value, (bool, int, float)):
            raise AssertionError("a Python scalar written through a tensor index (a blocking copy on a GPU)")
        return setitem(self, index, value)
    as_tensor, tensor, to = torch.as_tensor, torch.tensor, torch.Tensor.to

    def no_device(fn):
        def guarded(*args, **kwargs):
            if kwargs.get("device") is not None:
                raise AssertionError(f"a blocking host-to-device copy ({fn.__name__}(..., device=...))")
            return fn(*args, **kwargs)
        return guarded

    def guarded_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and not kwargs.get("non_blocking", False):
            raise AssertionError("a blocking host-to-device copy (Tensor.to(device))")
        return to(self, *args, **kwargs)
    patches = [(torch, "unique", refuse_unique), (torch.Tensor, "unique", refuse_unique),
               (torch, "as_tensor", no_device(as_tensor)), (torch, "tensor", no_device(tensor)),
               (torch.Tensor, "to", guarded_to), (torch, "isin", refuse_isin),
               (torch.Tensor, "__setitem__", guarded_setitem)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def test_host_ids_reach_a_gpu_pinned_and_asynchronously(monkeypatch):
    """``host_to_device`` on CUDA: a pinned staging copy, then a non-blocking copy (on a CPU machine the
    two calls are recorded, not run); on the CPU the ids stay where they are."""
    from sglang_kvc.host_copy import host_to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k)) or self)
    ids = np.arange(5, dtype=np.int64)
    assert host_to_device(ids, "cuda:0").tolist() == ids.tolist()
    assert calls == ["pin", ("cuda:0", {"non_blocking": True})]
    monkeypatch.undo()
    on_cpu = host_to_device(ids, "cpu")
    assert on_cpu.device.type == "cpu" and on_cpu.tolist() == ids.tolist()


def test_a_demotion_cascade_with_a_complete_mirror_reads_nothing_from_the_device():
    cache, driver = build_cache(frames=8, page_size=4)
    allocator = driver.allocator
    for seed in range(12):
        driver.run([seed * 50 + i for i in range(17)])
    assert cache.tier_cached[1] > 0 and cache.tier_cached[2] > 0  # the arena is under pressure
    for seed in range(12, 14):
        driver.run([seed * 50 + i for i in range(17)])
    allocator.free_frames()  # the driver's frees carry no host ids: read once, the mirror is complete
    assert allocator.free_mirror.complete
    syncs, demoted, dropped = allocator.host_syncs, sum(cache.counters.demoted_in), sum(cache.counters.dropped)
    with no_device_reads(), no_blocking_copies():
        cache.evict(EvictParams(num_tokens=allocator.size))
    assert sum(cache.counters.demoted_in) > demoted and sum(cache.counters.dropped) > dropped
    assert allocator.host_syncs == syncs == cache.host_syncs() and cache.counters.host_waits == 0
    assert allocator.free_mirror.complete
    cache.check_invariants()


def test_a_short_incomplete_mirror_reads_once_and_takes_the_exact_frames():
    _, allocator = build_pool(ladder="bf16,k8v8", frames=6, page_size=2)
    slots = allocator.alloc(allocator.size)
    allocator.free(slots[8:])  # device ids only: frames 2.. are free, the mirror knows none of them
    assert not allocator.free_mirror.complete and len(allocator.known_free_frames()) == 0
    exact = allocator._frames_of(allocator._write_free_page_ids().numpy())
    syncs, seconds = allocator.host_syncs, allocator.host_sync_seconds
    assert allocator.take_frames(1, 2) == 2
    assert allocator.host_syncs == syncs + 1 and allocator.host_sync_seconds > seconds  # the read's time counts
    assert np.array_equal(allocator.lower[1].frames(), exact[::-1][:2][::-1])
    seconds = allocator.host_sync_seconds
    assert allocator.take_frames(1, 1) == 1 and allocator.host_syncs == syncs + 1  # complete now: no read
    assert allocator.host_sync_seconds == seconds
    allocator.check_books()


class WaitedEvent:
    """A copy's event in flight: ``synchronize`` records it in ``waits``; ``query`` is done once any
    event of ``waits`` was waited for when ``lands``, never otherwise."""

    def __init__(self, waits: list, lands: bool):
        self.waits, self.lands = waits, lands

    def query(self):
        return self.lands and bool(self.waits)

    def synchronize(self):
        self.waits.append(self)


def test_split_write_tier_nodes_keep_their_page_ids_and_count_waits():
    cache, driver = build_cache(frames=16, page_size=4)
    event_done = []
    ring = cache.host_copies = HostCopyRing(cache.host_copies.capacity, "cpu",
                                            event_factory=lambda: WaitedEvent(event_done, lands=True))
    driver.run(list(range(17)))
    driver.run(list(range(8)) + [999] * 9)  # shares two pages: the node splits
    nodes = all_nodes(cache)
    assert len(nodes) == 3 and not event_done
    for split in nodes:
        ids, record = split.kvc_pages, split.kvc_pages.record
        assert torch.equal(ring.buffer[record.offset + ids.start: record.offset + ids.stop], split.value[::4] // 4)
    cache.evict(EvictParams(num_tokens=cache.token_to_kv_pool_allocator.size))
    assert cache.counters.host_waits == 1 and event_done
    cache.check_invariants()


def test_a_full_host_copy_ring_counts_in_host_waits():
    cache, driver = build_cache(frames=16, page_size=4)
    events = []
    ring = cache.host_copies = HostCopyRing(6, "cpu", event_factory=lambda: WaitedEvent(events, lands=False))
    for seed in range(4):
        driver.run([seed * 50 + i for i in range(17)])  # 4 pages a request's node
    assert ring.full_waits == len(events) == cache.counters.host_waits > 0
    assert cache.kvc_stats()["host_waits"] == cache.counters.host_waits
    cache.check_invariants()


def test_check_books_catches_a_mirror_page_that_is_not_free():
    _, allocator = build_pool(ladder="bf16,k8v8", frames=6, page_size=2)
    allocator.alloc(4)  # pages 1, 2
    allocator.free_mirror.free = np.concatenate(([1], allocator.free_mirror.free))
    with pytest.raises(AssertionError, match="not free"):
        allocator.check_books()
