from sglang_kvc import demo


def test_demo_runs_under_pressure_and_beats_stock_on_hits(capsys):
    result = demo.run_demo(["--rounds", "3"])
    out = capsys.readouterr().out
    assert "cache-hit tokens" in out and "k4v2" in out
    stats = result["stats"]
    assert sum(stats["demoted_tokens"]) > 0  # memory pressure was reached
    assert result["total_hit_kvc"] >= result["total_hit_stock"] > 0
    assert sum(stats["hit_tokens"]) == result["total_hit_kvc"]


def test_demo_refuses_bad_ladder():
    import pytest

    with pytest.raises(SystemExit, match="K bits 3 are not supported"):
        demo.run_demo(["--kv-compression", "k3v3"])
