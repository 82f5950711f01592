"""Page ids copied from the device to the host without the scheduler's thread waiting for them."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class HostPageIds:
    """A slice ``[start, stop)`` of a host buffer that a device-to-host copy fills (CUDA: pinned
    memory, ``non_blocking``, an event recorded after it; elsewhere: copied at once).

    Invariant: every slice of one copy shares its buffer and event, so once the event is done
    ``resolve()`` of a slice gives the slice of the ids the copy started from; slicing
    (``ids[:n]``, ``ids[n:]``) never waits.
    """

    def __init__(self, buffer: torch.Tensor, event: Optional[torch.cuda.Event], start: int = 0,
                 stop: Optional[int] = None):
        self.buffer = buffer
        self.event = event
        self.start = start
        self.stop = len(buffer) if stop is None else stop

    @classmethod
    def copy_from(cls, pages: torch.Tensor) -> "HostPageIds":
        """Start copying ``pages`` (int64, any device) to the host."""
        if pages.device.type == "cpu":
            return cls(pages, None)
        if pages.device.type != "cuda":
            return cls(pages.cpu(), None)
        buffer = torch.empty(pages.shape, dtype=pages.dtype, pin_memory=True)
        buffer.copy_(pages, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(buffer, event)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item: slice) -> "HostPageIds":
        span = range(self.start, self.stop)[item]
        if not isinstance(item, slice) or span.step != 1:
            raise TypeError("HostPageIds takes contiguous slices only")
        return HostPageIds(self.buffer, self.event, span.start, span.stop)

    def ready(self) -> bool:
        """True when ``resolve()`` will not wait for the device."""
        return self.event is None or self.event.query()

    def resolve(self) -> np.ndarray:
        """The ids as a host int64 array (waits for the copy if it is still queued)."""
        if self.event is not None:
            self.event.synchronize()
        return self.buffer[self.start: self.stop].numpy()
