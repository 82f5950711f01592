"""Text every machine has: the Python standard library's source files, split into training and
held-out files by a hash of their path relative to the library root (deterministic, the same on
any machine that has the file, and independent of which other files exist)."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DEFAULT_HELDOUT_PERMILLE = 50  # 5% of the files
DEFAULT_MAX_FILE_BYTES = 400_000  # a few generated test-data files are larger; they teach nothing


def stdlib_root() -> Path:
    """The standard library's source folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> List[str]:
    """Sorted ``.py`` paths under ``root``, relative with '/' separators; installed packages
    (site-packages, dist-packages) and files over ``max_file_bytes`` are left out."""
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or os.path.getsize(full) > max_file_bytes:
                continue
            rel_paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(rel_paths)


def path_bucket(rel_path: str) -> int:
    """0..999 from the SHA-256 of the relative path."""
    return int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16) % 1000


def is_held_out(rel_path: str, heldout_permille: int = DEFAULT_HELDOUT_PERMILLE) -> bool:
    return path_bucket(rel_path) < heldout_permille


def split_files(rel_paths: Sequence[str], heldout_permille: int = DEFAULT_HELDOUT_PERMILLE
                ) -> Tuple[List[str], List[str]]:
    """(train, held_out) relative paths; disjoint, each sorted."""
    train = [p for p in rel_paths if not is_held_out(p, heldout_permille)]
    held = [p for p in rel_paths if is_held_out(p, heldout_permille)]
    return train, held


def read_texts(root: Path, rel_paths: Sequence[str], max_total_bytes: Optional[int] = None) -> List[str]:
    """File contents (UTF-8; undecodable files skipped) in the given order, stopping once
    ``max_total_bytes`` of text have been read."""
    texts, total = [], 0
    for rel in rel_paths:
        try:
            text = (Path(root) / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        texts.append(text)
        total += len(text)
        if max_total_bytes is not None and total >= max_total_bytes:
            break
    return texts
