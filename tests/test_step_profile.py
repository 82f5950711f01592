"""benchmarks/step_profile.py: the trace summary, and the profile call against a fake server."""

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks import step_profile


def _trace():
    kernel = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}
    return {"traceEvents": [
        kernel("_decode_stage1", 0, 30), kernel("_decode_reduce", 30, 10), kernel("_dequant_kernel", 40, 10),
        kernel("_write_kernel", 50, 5), kernel("nvjet_tst_128x64_64x4", 55, 40), kernel("triton_poi_fused_add", 95, 5),
        kernel("_requant_kernel", 100, 10),
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0, "dur": 7},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 9, "dur": 3},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},
    ]}


def test_summary_groups_kernel_time_and_counts_cpu_ops():
    summary = step_profile.summarize_trace(_trace())
    assert summary["kernel_us"] == 110 and summary["span_us"] == 110
    assert summary["groups_us"] == {"gemm": 40, "attention": 40, "requantize": 10, "kv_dequantize": 10,
                                    "kv_write": 5, "other": 5}
    assert step_profile.attention_share(summary) == round(50 / 110, 4)
    assert summary["kernels"][0] == {"name": "nvjet_tst_128x64_64x4", "us": 40, "count": 1, "group": "gemm"}
    assert summary["cpu_ops"] == [{"name": "aten::copy_", "us": 10, "count": 2}]
    assert step_profile.attention_share({"error": "x"}) is None


def test_profile_server_starts_the_profiler_sends_a_burst_and_keeps_only_the_summary(tmp_path):
    seen = {"generate": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/start_profile":
                seen["profile"] = body
                with gzip.open(tmp_path / "prof" / "x-TP-0.trace.json.gz", "wt") as f:
                    json.dump(_trace(), f)
                reply = b"Start profiling.\n"
            else:
                seen["generate"] += 1
                assert len(body["input_ids"]) == 40 and body["input_ids"][:16] == seen.setdefault(
                    "prefix", body["input_ids"][:16])
                reply = json.dumps({"text": "ok"}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply)

    (tmp_path / "prof").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        summary = step_profile.profile_server(url, str(tmp_path / "prof"), vocab_size=1000, num_steps=5,
                                              requests=3, prefix_len=16, prompt_len=40, output_len=4, wait_s=10)
    finally:
        server.shutdown()
    assert seen["profile"] == {"output_dir": str(tmp_path / "prof"), "num_steps": 5, "activities": ["CPU", "GPU"]}
    assert seen["generate"] == 3 and summary["answered"] == 3
    assert summary["kernel_us"] == 110 and summary["trace_files"] == ["x-TP-0.trace.json.gz"]
    assert list((tmp_path / "prof").iterdir()) == []  # the raw trace is not kept


def test_a_server_without_profiling_is_an_error_not_a_crash(tmp_path):
    summary = step_profile.profile_server("http://127.0.0.1:9", str(tmp_path), vocab_size=100, wait_s=1)
    assert summary == {"error": "POST /start_profile failed"}
