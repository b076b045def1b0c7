"""Summarize a scheduler step timeline (``meshserve up --set step_log=FILE``).

    python -m bench.step_timeline FILE [--gap 0.5] [--buckets 10]

The log is cut into runs wherever no step was planned for ``--gap`` seconds (a
benchmark's warm-up, measured and streamed runs come out as separate runs). For
each run it prints the steps, tokens and requests per step, and how long a step
took from plan to result; then the run split into ``--buckets`` equal slices of
time, so one sees whether early steps ran small while requests were arriving.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench.metrics import percentile


@dataclass
class Step:
    planned: float
    requests: int
    tokens: int
    waiting: int
    done: float | None = None


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)


def read_runs(path: Path, gap_s: float) -> list[Run]:
    runs: list[Run] = []
    open_steps: dict[tuple[str, int], Step] = {}
    last_plan = float("-inf")
    for line in path.read_bytes().splitlines():
        event = msgspec.json.decode(line)
        key = (event["worker"], event["step"])
        if event["event"] == "plan":
            if event["t"] - last_plan > gap_s or not runs:
                runs.append(Run())
            last_plan = event["t"]
            step = Step(event["t"], event["requests"], event["tokens"], event["waiting"])
            runs[-1].steps.append(step)
            open_steps[key] = step
        elif (step := open_steps.pop(key, None)) is not None:
            step.done = event["t"]
    return runs


def describe(index: int, run: Run, buckets: int) -> list[str]:
    steps = run.steps
    start = steps[0].planned
    end = max((s.done or s.planned) for s in steps)
    tokens = [s.tokens for s in steps]
    latency = [1000 * (s.done - s.planned) for s in steps if s.done is not None]
    lines = [
        f"run {index}: {len(steps)} steps over {end - start:.3f} s "
        f"(monotonic {start:.3f} .. {end:.3f}), "
        f"{sum(tokens)} tokens ({sum(tokens) / len(steps):.0f}/step, "
        f"{sum(s.requests for s in steps) / len(steps):.0f} requests/step); "
        f"plan->result p50 {percentile(latency, 50):.1f} ms, p90 {percentile(latency, 90):.1f} ms"
    ]
    width = (end - start) / buckets or 1.0
    sliced: list[list[Step]] = [[] for _ in range(buckets)]
    for s in steps:
        sliced[min(int((s.planned - start) / width), buckets - 1)].append(s)
    for b, inside in enumerate(sliced):
        if not inside:
            lines.append(f"  {b * width:7.3f}s  no step planned")
            continue
        lines.append(
            f"  {b * width:7.3f}s  {len(inside):4d} steps  "
            f"{sum(s.tokens for s in inside) / len(inside):6.0f} tok/step  "
            f"{sum(s.requests for s in inside) / len(inside):5.0f} req/step  "
            f"waiting {max(s.waiting for s in inside):4d}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_timeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between runs")
    parser.add_argument("--buckets", type=int, default=10)
    args = parser.parse_args(argv)
    for index, run in enumerate(read_runs(args.path, args.gap)):
        print("\n".join(describe(index, run, args.buckets)))


if __name__ == "__main__":
    main()
