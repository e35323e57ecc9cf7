"""benchmarks/early_exit.py's Pareto plot: a PNG from result documents (synthetic rows, no model run)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import early_exit  # noqa: E402


def test_pareto_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"concurrency": c, "strategy": s, "policy": p, "agree": a, "speedup": x}
            for c in (1, 16) for s, p, a, x in [("full", "-", 1.0, 1.0), ("parallel", "target 0.9", 0.93, 1.3),
                                                 ("copy", "fixed 0.1", 0.8, 1.6), ("speculative", "fixed 0.2", 1.0, 0.9)]]
    docs = [{"config": {"measure": m}, "model": "m", "rows": rows} for m in ("max_prob", "saturation")]
    early_exit.pareto_plot(docs, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
