"""HostCopyRing: page ids copied into spans of one host buffer, released oldest first, read back right
after their span is reused; a full ring waits (counted), a copy longer than the ring gets its own buffer."""

import numpy as np
import pytest
import torch

from sglang_kvc.host_copy import HostCopyRing


class FlightEvent:
    """A copy's event that stays in flight until the test lands it or someone waits for it."""

    def __init__(self):
        self.landed = False
        self.waited = False

    def query(self):
        return self.landed

    def synchronize(self):
        self.waited = self.waited or not self.landed
        self.landed = True


def ring_in_flight(capacity=10):
    """A CPU ring whose copies stay in flight; returns it and the events of its copies, in order."""
    events = []

    def new_event():
        events.append(FlightEvent())
        return events[-1]

    return HostCopyRing(capacity, "cpu", event_factory=new_event), events


def ids(start, count):
    return torch.arange(start, start + count, dtype=torch.int64)


def test_a_pending_copy_splits_into_the_right_page_ids_without_waiting():
    ring, events = ring_in_flight()
    pages = ring.copy(ids(10, 10))
    head, tail = pages[:3], pages[3:]
    assert not head.ready() and len(head) == 3 and len(tail) == 7 and not events[0].waited
    assert head.resolve().tolist() == [10, 11, 12] and events[0].waited and tail.ready()
    assert tail.resolve().tolist() == list(range(13, 20)) and tail[2:4].resolve().tolist() == [15, 16]
    with pytest.raises(TypeError, match="contiguous"):
        pages[::2]


def test_copies_wrap_around_and_never_straddle_the_end():
    ring, events = ring_in_flight()
    first, second = ring.copy(ids(100, 4)), ring.copy(ids(200, 4))
    assert (first.record.offset, second.record.offset, ring.used) == (0, 4, 8)
    events[0].landed = True
    third = ring.copy(ids(300, 4))  # 2 ids left at the end: it wraps, the skipped tail stays held
    assert third.record.offset == 0 and third.record.reserved == 6 and ring.used == 10
    assert first.record.ids is not None and first.record.host is None  # released: its own array
    events[1].landed = events[2].landed = True
    fourth = ring.copy(ids(400, 10))  # everything released: the whole ring
    assert fourth.record.offset == 0 and ring.used == 10 and ring.full_waits == 0
    events[3].landed = True
    assert [p.resolve().tolist() for p in (first, second, third, fourth)] == [
        list(range(100, 104)), list(range(200, 204)), list(range(300, 304)), list(range(400, 410))]


def test_spans_are_released_oldest_first():
    ring, events = ring_in_flight()
    older, newer = ring.copy(ids(0, 3)), ring.copy(ids(10, 3))
    events[1].landed = True  # the newer copy is done, the older is not
    ring.copy(ids(20, 3))
    assert newer.ready() and newer.record.ids is None and ring.used == 9  # held behind the older one
    assert list(ring.pending) == [older.record, newer.record, ring.pending[2]]
    events[0].landed = True
    ring.copy(ids(30, 1))
    assert older.record.ids.tolist() == [0, 1, 2] and newer.record.ids.tolist() == [10, 11, 12]
    assert ring.used == 4 and len(ring.pending) == 2 and ring.full_waits == 0


def test_slices_read_their_ids_after_the_ring_span_is_reused():
    ring, events = ring_in_flight()
    pages = ring.copy(ids(10, 6))
    head, tail = pages[:2], pages[2:]  # taken before the copy lands
    events[0].landed = True
    later = ring.copy(ids(500, 8))  # releases the first copy and writes over its span
    assert later.record.offset == 0 and ring.buffer[:6].tolist() == list(range(500, 506))
    middle = tail[1:3]  # taken after the first copy moved to its own array
    assert head.resolve().tolist() == [10, 11] and tail.resolve().tolist() == [12, 13, 14, 15]
    assert middle.resolve().tolist() == [13, 14] and not events[0].waited


def test_an_early_resolve_materializes_but_keeps_its_span_until_it_is_the_oldest():
    ring, events = ring_in_flight()
    older, newer = ring.copy(ids(0, 4)), ring.copy(ids(10, 4))
    assert newer.resolve().tolist() == [10, 11, 12, 13] and events[1].waited and not events[0].waited
    third = ring.copy(ids(20, 2))
    assert ring.used == 10 and newer.record in ring.pending  # waits behind the older copy
    events[0].landed = True
    last = ring.copy(ids(30, 1))
    assert list(ring.pending) == [third.record, last.record] and ring.used == 3
    assert older.resolve().tolist() == [0, 1, 2, 3] and newer.resolve().tolist() == [10, 11, 12, 13]
    assert ring.full_waits == 0


def test_a_full_ring_waits_for_the_oldest_copies_and_counts_each_wait():
    ring, events = ring_in_flight()
    copies = [ring.copy(ids(0, 4)), ring.copy(ids(10, 4))]
    copies.append(ring.copy(ids(20, 4)))  # neither of 2 ids at the end nor 0 at the start: wait for the first
    assert ring.full_waits == 1 and events[0].waited and not events[1].waited
    assert copies[2].record.offset == 0 and ring.used == 10
    copies.append(ring.copy(ids(30, 5)))  # waits for the second, then the third (4 ids free, not 5)
    assert ring.full_waits == 3 and events[1].waited and events[2].waited and not events[3].waited
    assert copies[3].record.offset == 0 and ring.used == 5
    assert [c.resolve().tolist() for c in copies] == [list(range(s, s + n)) for s, n in
                                                       ((0, 4), (10, 4), (20, 4), (30, 5))]


def test_a_copy_longer_than_the_ring_gets_a_buffer_of_its_own():
    ring, events = ring_in_flight()
    small = ring.copy(ids(0, 3))
    large = ring.copy(ids(100, 15))
    assert large.record.host is not ring.buffer and ring.used == 3 and ring.full_waits == 0
    assert not large.ready() and large[10:].resolve().tolist() == list(range(110, 115))
    events[0].landed = True
    ring.copy(ids(200, 2))
    assert len(ring.pending) == 1 and small.record.ids.tolist() == [0, 1, 2]
    empty = ring.copy(ids(0, 0))
    assert empty.ready() and len(empty) == 0 and empty.resolve().tolist() == [] and ring.used == 2


def test_cpu_copies_without_events_are_done_at_once_and_never_wait():
    ring = HostCopyRing(10, "cpu")
    source = ids(0, 7)
    copies = [ring.copy(source) for _ in range(5)]
    source.zero_()  # the ids were copied, not aliased
    assert all(c.ready() for c in copies) and ring.full_waits == 0
    assert all(np.array_equal(c.resolve(), np.arange(7)) for c in copies)
