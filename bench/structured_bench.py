"""Structured outputs' cost: throughput with a ``json_schema`` grammar on vs off,
N concurrent requests through the real scheduler and runner in one process
(bench/inprocess.py), and the grammar mask's cost per step (fill + upload, timed
around ``GrammarMatchers.step_mask``).

    python -m bench.structured_bench [--requests 32] [--max-tokens 64] [--device cpu]

Prints one line per mode and one for the mask. Output tokens per second compare
the modes fairly although constrained requests end when their JSON is complete.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.inprocess import InProcessEngine
from services.worker.runner import ModelRunner
from shared.embedded_model import ensure_embedded_model
from shared.grammar import json_schema_grammar
from shared.protocol.generation import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{2,8}\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "maxItems": 6},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}


class MaskTimer:
    """Wraps ``runner.grammars.step_mask`` and records each call's seconds and rows."""

    def __init__(self, runner: ModelRunner) -> None:
        self.calls: list[tuple[float, int]] = []
        inner: Callable[..., Any] = runner.grammars.step_mask

        def timed(states: Any, rows: Any) -> Any:
            start = time.perf_counter()
            mask = inner(states, rows)
            if mask.bitmask.is_cuda:
                import torch

                torch.cuda.synchronize()
            self.calls.append((time.perf_counter() - start, len(rows)))
            return mask

        runner.grammars.step_mask = timed  # type: ignore[method-assign]


def run(engine: InProcessEngine, requests: int, sampling: SamplingParams) -> dict[str, float]:
    prompts = [[5 + i, 17, 300, 41, 999, 7, 123, 64] for i in range(requests)]
    start = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    stopped = sum(c.finish_reason == "stop" for c in completions)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "stopped": stopped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    runner = ModelRunner(ensure_embedded_model(), args.device, "auto",
                         num_kv_blocks=max(256, args.requests * 8), block_size=16, seed=0)
    timer = MaskTimer(runner)
    engine = InProcessEngine(runner)
    eos = list(runner.model.config.eos_token_ids)
    base = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=1,
                          stop_token_ids=eos)
    grammar = json_schema_grammar(SCHEMA)
    run(engine, 2, base)  # warm up (allocator, first steps)
    run(engine, 2, SamplingParams(**{**_fields(base), "grammar": grammar}))
    timer.calls.clear()
    results = {
        "off": run(engine, args.requests, base),
        "json_schema": run(engine, args.requests,
                           SamplingParams(**{**_fields(base), "grammar": grammar})),
    }
    for mode, r in results.items():
        print(f"structured_bench device={args.device} requests={args.requests} mode={mode} "
              f"tokens={r['tokens']:.0f} wall_s={r['wall_s']:.3f} tok_s={r['tok_s']:.1f} "
              f"finished_stop={r['stopped']:.0f}")
    if timer.calls:
        seconds = [s for s, _ in timer.calls]
        rows = [n for _, n in timer.calls]
        per_row = [s / n for s, n in timer.calls]
        print(f"structured_bench mask steps={len(seconds)} "
              f"mean_rows={statistics.mean(rows):.1f} "
              f"mask_ms_per_step_mean={1e3 * statistics.mean(seconds):.3f} "
              f"p50={1e3 * statistics.median(seconds):.3f} "
              f"max={1e3 * max(seconds):.3f} "
              f"us_per_row={1e6 * statistics.mean(per_row):.1f}")
    slowdown = results["off"]["tok_s"] / results["json_schema"]["tok_s"]
    print(f"structured_bench throughput off/json_schema = {slowdown:.2f}x")


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {f: getattr(params, f) for f in params.__struct_fields__}


if __name__ == "__main__":
    main()
