"""A host copy of the write tier's free page ids, kept without reading SGLang's device free lists."""

from __future__ import annotations

import numpy as np

EMPTY = np.zeros(0, dtype=np.int64)


class FreeMirror:
    """Host sets ``free`` (sorted ascending) and ``release`` mirroring SGLang's device lists
    ``free_pages`` and ``release_pages`` (with ``need_sort``, so ``free_pages`` is always sorted).

    Invariant: ``free`` is a subset of the device's ``free_pages`` and ``release`` of its
    ``release_pages`` (so every page the mirror holds is truly free); when ``complete`` they are
    equal as sets. Each update keeps it:
    * ``reset``: both lists read from the device (complete).
    * ``merge`` (after SGLang's ``merge_and_sort_free``): the device sorts the union of its lists
      into ``free_pages``, the mirror the union of its subsets.
    * ``consume(n)`` (after an alloc took the first, so smallest, ``n`` of ``free_pages``): the
      mirror drops its ``n`` smallest. A page ``k`` the mirror keeps has at least ``n`` smaller
      pages in the mirror, so (the mirror being a subset) at least ``n`` smaller on the device:
      the device kept it too. Complete, the two drop the same pages.
    * ``add_release``: a free whose page ids the host knows; ``forget``: one it does not (the
      device list grows, the mirror does not: still a subset, no longer complete).
    * ``remove``: pages taken out of both device lists (hidden frames, claimed pages).
    """

    def __init__(self):
        self.free = EMPTY
        self.release = EMPTY
        self.complete = False

    def reset(self, free: np.ndarray, release: np.ndarray) -> None:
        self.free = np.sort(np.asarray(free, dtype=np.int64))
        self.release = np.asarray(release, dtype=np.int64)
        self.complete = True

    def merge(self) -> None:
        if len(self.release):
            # two sorted runs: the stable sort (timsort) merges them in linear time
            self.free = np.sort(np.concatenate((self.free, np.sort(self.release))), kind="stable")
            self.release = EMPTY

    def consume(self, count: int) -> None:
        if count > 0:
            self.free = self.free[count:]

    def add_release(self, pages: np.ndarray) -> None:
        if len(pages):
            self.release = np.concatenate((self.release, np.asarray(pages, dtype=np.int64)))

    def forget(self) -> None:
        self.complete = False

    def remove(self, free_keep: np.ndarray, release_keep: np.ndarray) -> None:
        """Keep only the pages the boolean masks (over ``free``, ``release``) select."""
        self.free = self.free[free_keep]
        self.release = self.release[release_keep]

    def pages(self) -> np.ndarray:
        return np.concatenate((self.free, self.release))

    def __len__(self) -> int:
        return len(self.free) + len(self.release)
