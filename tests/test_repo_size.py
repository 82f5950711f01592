"""The device tool copies the working tree with the SGLang kit (``.gpukit/``, ~48.4 MB) and refuses more
than 64 MiB in all: tracked files must leave the kit room, or no GPU run can start. When this fails, pack
superseded result logs (``tar czf e2e-logs-<run>.tgz e2e-logs-<run>``, as README's earlier runs are)."""

import os
import subprocess

import pytest

DEVICE_COPY_LIMIT = 64 * 2 ** 20
KIT_BYTES = 48_500_000  # .gpukit/ as make-sglang-kit.sh + make_gpu_wheels.sh build it (2026-12-01)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tracked_files_leave_room_for_the_gpu_kit():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [os.path.join(ROOT, name) for name in names.decode().split("\0") if name]
    tracked = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
    assert tracked + KIT_BYTES <= DEVICE_COPY_LIMIT, (
        f"tracked files {tracked / 1e6:.1f} MB + kit {KIT_BYTES / 1e6:.1f} MB exceed the device copy's "
        f"{DEVICE_COPY_LIMIT / 2 ** 20:.0f} MiB; pack superseded logs in benchmarks/results as .tgz")
