"""Page ids copied between the host and the device without the scheduler's thread waiting for them."""

from __future__ import annotations

import collections
from typing import Callable, Deque, Optional

import numpy as np
import torch


def host_to_device(values, device) -> torch.Tensor:
    """Host ids (a numpy array or a CPU tensor) as a tensor on ``device``, without a host sync.

    PyTorch copies pageable host memory to a GPU synchronously (``memcpy_and_sync``: the copy, then a
    wait for the whole stream), and once a page move has made the cache's stream wait for SGLang's
    forward stream, that wait lasts until the running forward pass ends. Here the ids go through pinned
    memory and an asynchronous copy, ordered on the stream like the kernels that read them; PyTorch's
    pinned allocator keeps the staging block until the copy is done."""
    tensor = torch.as_tensor(values)
    device = torch.device(device)
    if device.type == "cpu":
        return tensor
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class _HostCopy:
    """One device-to-host copy of page ids: ``length`` ids at ``offset`` of ``host`` (a span of the
    ring, or a buffer of its own) until the copy is materialized, then ``ids`` (a numpy array of its
    own) and ``host`` is let go.

    Invariant: ``host[offset: offset + length]`` is read only after ``event`` is done (no event: done
    at once), and only until the span is released; ``ids`` once set never changes.
    """

    __slots__ = ("host", "offset", "length", "event", "ids", "reserved")

    def __init__(self, host: Optional[torch.Tensor], offset: int, length: int, event, reserved: int):
        self.host = host
        self.offset = offset
        self.length = length
        self.event = event
        self.ids: Optional[np.ndarray] = None if length else np.zeros(0, dtype=np.int64)
        self.reserved = reserved  # ring ids the span holds: its length plus a tail it skipped

    def done(self) -> bool:
        return self.ids is not None or self.event is None or self.event.query()

    def materialize(self) -> np.ndarray:
        """The copied ids in an array of their own (waits for the copy if it is still queued)."""
        if self.ids is None:
            if self.event is not None:
                self.event.synchronize()
            self.ids = self.host[self.offset: self.offset + self.length].numpy().copy()
            self.host = self.event = None
        return self.ids


class HostPageIds:
    """A slice ``[start, stop)`` of the ids of one device-to-host copy (made by ``HostCopyRing``).

    Invariant: every slice of one copy shares its record, so once the copy is done ``resolve()`` of
    a slice gives the slice of the ids the copy started from, whether the record still reads the
    ring or its own array; slicing (``ids[:n]``, ``ids[n:]``) never waits.
    """

    __slots__ = ("record", "start", "stop")

    def __init__(self, record: _HostCopy, start: int = 0, stop: Optional[int] = None):
        self.record = record
        self.start = start
        self.stop = record.length if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item: slice) -> "HostPageIds":
        span = range(self.start, self.stop)[item]
        if not isinstance(item, slice) or span.step != 1:
            raise TypeError("HostPageIds takes contiguous slices only")
        return HostPageIds(self.record, span.start, span.stop)

    def ready(self) -> bool:
        """True when ``resolve()`` will not wait for the device."""
        return self.record.done()

    def resolve(self) -> np.ndarray:
        """The ids as a host int64 array (waits for the copy if it is still queued)."""
        return self.record.materialize()[self.start: self.stop]


class HostCopyRing:
    """Device-to-host copies of page ids into spans of one int64 host buffer of ``capacity`` ids
    (pinned on CUDA), allocated once: no copy allocates host memory but one longer than the ring.

    Sizing: a new copy of ``n`` ids fits without waiting while ``held + n <= capacity / 2``, where
    ``held`` is the ids of unreleased copies (the free ids form two pieces, the larger of them at
    least ``n``; or one piece, less a skipped tail shorter than the held copy that skipped it). The
    cache's held and new copies are of pages distinct within the write tier while their nodes
    live, so it takes ``capacity = 2 x write_pages`` (the tier's pages plus the longest possible
    copy): it waits only while copies of pages since freed and taken again are still in flight.

    Invariants: spans are taken at ``tail`` and released oldest first (copies on one stream finish
    in order), so the held spans (each with any tail of the buffer it skipped, a span never
    straddling the end) are ``used`` ids ending at ``tail``; a span is released only once its copy is
    materialized, so no copy's ids are overwritten before they are read; ``full_waits`` counts the
    copies waited for because the ring had no room.
    """

    def __init__(self, capacity: int, device, event_factory: Optional[Callable[[], object]] = None):
        """``device``: where the ids come from; on CUDA the buffer is pinned and each copy records a
        ``torch.cuda.Event`` (or ``event_factory()``: anything with ``query()`` and
        ``synchronize()``), elsewhere a copy is done at once unless ``event_factory`` is given."""
        if capacity < 1:
            raise ValueError(f"a host copy ring needs a capacity of at least 1 id, got {capacity}")
        device = torch.device(device)
        self.on_cuda = device.type == "cuda"
        self.capacity = int(capacity)
        self.buffer = torch.empty(self.capacity, dtype=torch.int64, pin_memory=self.on_cuda)
        self.event_factory = event_factory or (torch.cuda.Event if self.on_cuda else None)
        self.pending: Deque[_HostCopy] = collections.deque()  # oldest first
        self.tail = 0
        self.used = 0
        self.full_waits = 0

    def copy(self, pages: torch.Tensor) -> HostPageIds:
        """Start copying ``pages`` (1-D, int64, any device) to the host; never waits unless the ring
        is full."""
        length = len(pages)
        if length == 0:
            return HostPageIds(_HostCopy(None, 0, 0, None, 0))
        if length > self.capacity:
            host, offset, reserved = torch.empty(length, dtype=torch.int64, pin_memory=self.on_cuda), 0, 0
        else:
            self._release_done()
            offset, reserved = self._take(length)
            while offset is None:
                self.full_waits += 1
                self._release(self.pending.popleft())
                self._release_done()
                offset, reserved = self._take(length)
            host = self.buffer
        host[offset: offset + length].copy_(pages, non_blocking=self.on_cuda)
        event = None
        if self.event_factory is not None:
            event = self.event_factory()
            if self.on_cuda:
                event.record()
        record = _HostCopy(host, offset, length, event, reserved)
        self.pending.append(record)
        return HostPageIds(record)

    def _take(self, length: int):
        """(offset, ids reserved) of a free span of ``length`` ids at the tail or, wrapping, at the
        start; (None, 0) if neither has room."""
        if self.used == 0:
            self.tail = 0
        head = (self.tail - self.used) % self.capacity
        if self.used and head >= self.tail:  # held ids wrap (or fill the ring): free is [tail, head)
            room_at_tail, room_at_start = head - self.tail, 0
        else:  # held ids are [head, tail): free is [tail, capacity) and [0, head)
            room_at_tail, room_at_start = self.capacity - self.tail, head
        if room_at_tail >= length:
            offset, reserved = self.tail, length
        elif room_at_start >= length:
            offset, reserved = 0, room_at_tail + length
        else:
            return None, 0
        self.tail = (offset + length) % self.capacity
        self.used += reserved
        return offset, reserved

    def _release_done(self) -> None:
        while self.pending and self.pending[0].done():
            self._release(self.pending.popleft())

    def _release(self, record: _HostCopy) -> None:
        record.materialize()
        self.used -= record.reserved
