"""PNG plots of a run: latency CDFs (TTFT, TPOT, ITL) and output throughput over
time. matplotlib is not a dependency of the project: without it the run says so
and the JSON result (every request's timings) is the record to plot from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.metrics import RequestRecord, output_tokens_per_second

NO_MATPLOTLIB = (
    "--plot: matplotlib is not installed, so no plots were drawn "
    "(pip install matplotlib; every timing is in the --save-result JSON)"
)


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def draw(records: Sequence[RequestRecord], duration_s: float, stem: Path) -> list[Path]:
    """Write ``<stem>-latency-cdf.png`` and ``<stem>-throughput.png``; returns the
    paths, or raises ImportError with ``NO_MATPLOTLIB`` when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(NO_MATPLOTLIB) from e

    done = [r for r in records if r.success]
    series = {
        "TTFT": [1000 * r.ttft_s for r in done],
        "TPOT": [1000 * t for r in done if (t := r.tpot_s) is not None],
        "ITL": [1000 * gap for r in done for gap in r.itl_s],
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    cdf_path = stem.with_name(stem.name + "-latency-cdf.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        if values:
            xs, ys = _cdf(values)
            ax.step(xs, ys, where="post")
        ax.set_title(f"{name} CDF ({len(values)} samples)")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(cdf_path, dpi=120)
    plt.close(fig)

    throughput_path = stem.with_name(stem.name + "-throughput.png")
    per_second = output_tokens_per_second(done, duration_s)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(per_second)), per_second, width=1.0, align="edge")
    ax.set_title("Output throughput over time")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("output tokens / s")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(throughput_path, dpi=120)
    plt.close(fig)
    return [cdf_path, throughput_path]
