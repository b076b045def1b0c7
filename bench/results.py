"""The JSON result of a run: settings, figures and every request, vLLM-shaped.

Top-level keys follow ``vllm bench serve --save-result`` (``date``,
``request_throughput``, ``mean_ttft_ms``, ...) so scripts written for vLLM read
these files too; ``requests`` holds one record per measured request (warm-ups
excluded) instead of vLLM's parallel lists.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.metrics import BenchmarkMetrics, RequestRecord


def gpu_name() -> str | None:
    """The first CUDA device's name when torch is installed and sees one. The
    client usually runs beside the server, so this names the server's GPU too;
    torch is imported only here (seconds of start-up, and it is optional)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def build_result(
    settings: Mapping[str, Any],
    metrics: BenchmarkMetrics,
    records: Sequence[RequestRecord],
    slos: Mapping[str, float],
    metadata: Mapping[str, str],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    now = datetime.now().astimezone()
    result: dict[str, Any] = {
        "date": now.strftime("%Y%m%d-%H%M%S"),
        "date_iso": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "bench.serve",
                               *(sys.argv[1:] if argv is None else argv)]),
        "gpu": gpu_name(),
        **settings,
        "goodput_slos_ms": {k: 1000 * v for k, v in slos.items()},
        "metadata": dict(metadata),
        **metrics.as_dict(),
        "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in records],
    }
    return result


def result_path(result_dir: Path, result: Mapping[str, Any], filename: str | None) -> Path:
    """``--result-filename`` or vLLM's pattern, e.g.
    ``meshserve-infqps-concurrency256-llama-3.2-1b-20261104-101500.json``."""
    if filename:
        return result_dir / filename
    rate = result["request_rate"]
    rate_text = "inf" if rate == float("inf") else f"{rate:g}"
    concurrency = result["max_concurrency"]
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", str(result["model_id"]).rstrip("/").split("/")[-1])
    parts = [result["label"], f"{rate_text}qps"]
    if concurrency:
        parts.append(f"concurrency{concurrency}")
    parts += [model, result["date"]]
    return result_dir / ("-".join(parts) + ".json")


def save_result(path: Path, result: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Infinity (request_rate inf) is not JSON: written as the string "inf".
    path.write_text(json.dumps(_finite(result), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
