"""benchmarks/startup_compiles.py on the CPU: start-up phases from a real server log, and compiles from a
Triton cache laid out as Triton writes it, attributed to the phase that ran when each was written."""

import json
import os

from benchmarks import startup_compiles as sc

KVC_LOG = "benchmarks/results/e2e-logs/kvc-k8v8-k4v4-kc-k4v2-g32-kc/server.log"


def test_phases_of_a_kvc_server_log_in_order():
    with open(KVC_LOG) as handle:
        phases = sc.log_phases(handle.read())
    assert [p["phase"] for p in phases] == [name for name, _ in sc.PHASES]
    times = [p["at"] for p in phases]
    assert times == sorted(times)
    capture = dict(zip([p["phase"] for p in phases], times))
    assert capture["after prefill capture"] - capture["prefill graph capture"] == 60  # the log: elapsed=59.61 s


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
