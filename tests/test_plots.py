"""benchmarks/plots.py: figures saved as palette PNGs, smaller than matplotlib's own, same size in pixels."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import plots  # noqa: E402


def _figure():
    fig, ax = plt.subplots(figsize=(6, 3))
    for i in range(5):
        ax.plot(range(50), [(x * (i + 1)) % 17 for x in range(50)], "o-", label=f"line {i}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def test_a_saved_figure_is_a_smaller_palette_png_of_the_same_size(tmp_path):
    fig = _figure()
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=100)
    path = tmp_path / "plot.png"
    plots.save_figure(fig, str(path), dpi=100)
    plt.close(fig)
    saved = Image.open(path)
    assert saved.mode == "P" and saved.size == Image.open(io.BytesIO(raw.getvalue())).size
    assert path.stat().st_size < len(raw.getvalue())


def test_the_cli_rewrites_pngs_in_place_only_when_smaller(tmp_path, capsys):
    fig = _figure()
    path = tmp_path / "old.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    before = path.stat().st_size
    assert plots.main([str(path)]) == 0
    after = path.stat().st_size
    assert after < before and Image.open(path).mode == "P"
    assert plots.main([str(path)]) == 0 and path.stat().st_size <= after  # a second pass never grows it
    assert f"{path}: {before} -> {after} bytes" in capsys.readouterr().out.splitlines()[0]
