"""benchmarks/startup_compiles.py on the CPU: start-up phases from a real server log, and compiles from a
Triton cache laid out as Triton writes it, attributed to the phase that ran when each was written."""

import json
import os
import tarfile

from benchmarks import startup_compiles as sc

KVC_LOGS = "benchmarks/results/e2e-logs-f826840.tgz"
KVC_LOG = "e2e-logs-f826840/kvc-k8v8-k4v4-kc/server.log"


def test_phases_of_a_kvc_server_log_in_order():
    with tarfile.open(KVC_LOGS) as logs:
        phases = sc.log_phases(logs.extractfile(KVC_LOG).read().decode())
    assert [p["phase"] for p in phases] == [name for name, _ in sc.PHASES]
    times = [p["at"] for p in phases]
    assert times == sorted(times)
    capture = dict(zip([p["phase"] for p in phases], times))
    assert capture["after prefill capture"] - capture["prefill graph capture"] == 56  # the log: elapsed=55.97 s


def _entry(root, digest, name, written, warps=4):
    os.makedirs(os.path.join(root, digest))
    path = os.path.join(root, digest, f"{name}.json")
    with open(path, "w") as handle:
        json.dump({"name": name, "num_warps": warps, "num_stages": 3}, handle)
    os.utime(path, (written, written))
    return path


def test_compiles_are_attributed_to_the_phase_running_when_written(tmp_path):
    phases = [{"phase": "load weights", "at": 100.0}, {"phase": "prefill graph capture", "at": 110.0},
              {"phase": "decode graph capture", "at": 170.0}]
    triton_dir, inductor_dir = str(tmp_path / "triton"), str(tmp_path / "inductor")
    _entry(triton_dir, "a1", "_write_kernel", 105.5)
    _entry(triton_dir, "b2", "_fwd_kernel", 165.0)
    _entry(inductor_dir, "c3", "triton_poi_fused_add_0", 110.0)
    _entry(triton_dir, "d4", "_decode_stage1", 171.0, warps=2)
    grp = os.path.join(triton_dir, "d4", "__grp___decode_stage1.json")
    with open(grp, "w") as handle:
        json.dump({"child_paths": {}}, handle)  # a group file: not a compile
    with open(os.path.join(triton_dir, "d4", "broken.json"), "w") as handle:
        handle.write("{not json")

    found = sc.attribute(sc.cache_compiles([triton_dir, inductor_dir]), phases, started=95.0)
    assert [(c["kernel"], c["phase"], c["written"]) for c in found["compiles"]] == [
        ("_write_kernel", "load weights", 10.5), ("triton_poi_fused_add_0", "prefill graph capture", 15.0),
        ("_fwd_kernel", "prefill graph capture", 70.0), ("_decode_stage1", "decode graph capture", 76.0)]
    assert found["per_phase"] == {"load weights": 1, "prefill graph capture": 2, "decode graph capture": 1}
    assert found["compiles"][-1]["num_warps"] == 2
    assert found["phases"][1] == {"phase": "prefill graph capture", "at_s": 15.0}
    assert sc.phase_at(phases, 99.0) == "start"


def test_a_system_starts_on_empty_caches_of_its_own_and_its_compiles_are_listed(monkeypatch, tmp_path):
    """run_system with a stand-in server: the server gets e2e's per-system Triton cache (and Inductor's
    beside it), its log's phases and the cache entries it wrote come back in the record."""
    from benchmarks import e2e

    started = []

    class FakeServer:
        def __init__(self, flags, port, log_path, env):
            self.flags, self.log_path, self.env, self.args = flags, log_path, env, flags

        def start(self, timeout_s):
            started.append(self.env)
            with open(self.log_path, "w") as handle:
                handle.write("[2026-12-01 10:00:00] Load weight begin.\n"
                             "[2026-12-01 10:00:05] Capture target prefill CUDA graph begin. backend=breakable\n")
            _entry(self.env["TRITON_CACHE_DIR"], "e5", "_fwd_kernel", json_time("2026-12-01 10:00:06"))
            return 7.0

        def stop(self):
            return 0

    def json_time(text):
        import time
        return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))

    monkeypatch.setattr(sc, "Server", FakeServer)
    args = e2e.parse_args(["--out", str(tmp_path), "--systems", "kvc=k8v8,k4v4-kc"])
    args.port, args.timeout_s, args.fresh_triton_cache = 31100, 10, str(tmp_path / "caches")
    budget = e2e.run_budgets(args, e2e.run_traces(args))[False]
    record = sc.run_system("kvc=k8v8,k4v4-kc", args, budget)
    assert started[0]["TRITON_CACHE_DIR"] == str(tmp_path / "caches" / "kvc-k8v8-k4v4-kc")
    assert started[0]["TORCHINDUCTOR_CACHE_DIR"].endswith("-inductor")
    assert record["startup_s"] == 7.0 and "--kv-compression" in record["flags"]
    assert [(c["kernel"], c["phase"]) for c in record["compiles"]] == [("_fwd_kernel", "prefill graph capture")]
    assert record["per_phase"] == {"prefill graph capture": 1}
