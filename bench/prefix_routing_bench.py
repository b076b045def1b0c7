"""Prefix routing against load-only routing on a shared-prefix workload.

Starts a mesh of --workers CPU workers (embedded model) once per routing mode, in
this one invocation, and sends each the same workload through `bench.serve`'s
prefix dataset: --num-prompts requests over --num-prefixes prefixes of
--prefix-len tokens, each with a short suffix of its own and few output tokens,
at --request-rate (Poisson; 0: all at once). Per mode it prints the prefix-cache
hit rate (from `meshserve kv stats`, overall and per worker), throughput and TTFT
p50/p99, then the ratios of prefix routing to each other mode, and writes the
figures as JSON into --result-dir.

The default pool (--kv-blocks 300 a worker, --lease-blocks 32) holds about half
of the 8 prefixes of 800 tokens (50 blocks each) per worker: the regime routing is
for, where a worker's cache can hold its share of the prefixes but not all of them.
Prefixes this long make a miss cost enough prefill for TTFT to show it on a shared
CPU (with 400-token prefixes, 160 blocks, the hit rates differ as much, 91.7% against
48.4%, but TTFT p99 was within the machine's noise). With the CPU default of 4096
blocks every worker ends up caching every prefix whatever the routing, and only the
first request of each prefix on each worker differs (`--kv-blocks 0 --num-prefixes 4
--num-prompts 48 --request-rate 0`: the burst). A small pool needs a small lease too:
blocks leased ahead are taken from the evictable cached ones.

    .venv/bin/python -m bench.prefix_routing_bench
    .venv/bin/python -m bench.prefix_routing_bench --kv-blocks 0 --num-prefixes 4 \
        --num-prompts 48 --request-rate 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import serve
from bench.mesh_bench import started_mesh, write_result

MODES = ("prefix", "round-robin", "least-loaded")


def kv_stats(run_dir: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "services.supervisor", "kv", "stats", "--json",
         "--run-dir", run_dir], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode:
        raise RuntimeError(f"meshserve kv stats failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def serve_run(url: str, args: argparse.Namespace, dataset: list[str], result: Path | None
              ) -> None:
    """One `bench.serve` run against ``url`` (its table printed unless warming up)."""
    argv = ["--base-url", url, "--seed", str(args.seed), "--no-progress", *dataset]
    if args.request_rate:
        argv += ["--request-rate", str(args.request_rate)]
    if result is None:
        with contextlib.redirect_stdout(io.StringIO()):
            code = serve.main(argv)
    else:
        argv += ["--save-result", "--result-dir", str(result.parent),
                 "--result-filename", result.name]
        code = serve.main(argv)
    if code:
        raise RuntimeError(f"bench.serve {shlex.join(argv)} failed")


def hit_rate(hits: int, queries: int) -> float:
    return hits / queries if queries else 0.0


def run_mode(mode: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    run_dir = tempfile.mkdtemp(prefix="mspr-", dir="/tmp")
    mesh_args = ["--workers", str(args.workers), "--routing", mode, "--tts", "0",
                 "--device", "cpu", "--num-kv-blocks", str(args.kv_blocks),
                 "--set", f"lease_blocks={args.lease_blocks}", *args.mesh_args]
    print(f"\n=== routing {mode}: {args.workers} workers ===", flush=True)
    with started_mesh("", mesh_args, run_dir) as url:
        # Warm-up on unrelated random prompts (no prefix of the workload): first-call
        # costs are not load, and every worker runs a step before the clock starts.
        serve_run(url, args, ["--dataset-name", "random", "--random-input-len", "64",
                              "--random-output-len", "4", "--num-prompts",
                              str(4 * args.workers), "--seed", str(args.seed + 1)], None)
        before = kv_stats(run_dir)
        result = scratch / f"{mode}.json"
        serve_run(url, args, [
            "--dataset-name", "prefix", "--num-prefixes", str(args.num_prefixes),
            "--prefix-len", str(args.prefix_len), "--random-input-len", str(args.suffix_len),
            "--random-output-len", str(args.output_len), "--num-prompts",
            str(args.num_prompts)], result)
        after = kv_stats(run_dir)
    served = json.loads(result.read_text())
    earlier = {w["worker"]: w for w in before["workers"]}
    workers = {}
    for w in after["workers"]:
        was = earlier.get(w["worker"], {})
        hits = w["prefix_cache_hits"] - was.get("prefix_cache_hits", 0)
        queries = w["prefix_cache_queries"] - was.get("prefix_cache_queries", 0)
        workers[w["worker"]] = {
            "requests": w["requests_placed"] - was.get("requests_placed", 0),
            "rebalanced_in": w["rebalanced_in"] - was.get("rebalanced_in", 0),
            "prefix_cache_hit_rate": hit_rate(hits, queries),
        }
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return {
        "routing": mode,
        "prefix_cache_hit_rate": hit_rate(hits, queries),
        "prefix_cache_hits": hits, "prefix_cache_queries": queries,
        "completed": served["completed"], "failed": served["failed"],
        "duration_s": served["duration"],
        "request_throughput": served["request_throughput"],
        "output_throughput": served["output_throughput"],
        "total_token_throughput": served["total_token_throughput"],
        "ttft_p50_ms": served["median_ttft_ms"], "ttft_p99_ms": served["p99_ttft_ms"],
        "workers": workers,
    }


def report(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    print("\nrouting        hit rate  req/s   tok/s (in+out)  TTFT p50 ms  TTFT p99 ms  "
          "requests per worker")
    for mode, row in rows.items():
        split = " ".join(f"{w['requests']}" for w in row["workers"].values())
        print(f"{mode:<13}  {row['prefix_cache_hit_rate']:7.1%}  "
              f"{row['request_throughput']:5.2f}  {row['total_token_throughput']:14.0f}  "
              f"{row['ttft_p50_ms']:11.0f}  {row['ttft_p99_ms']:11.0f}  {split}")
    ratios: dict[str, dict[str, float]] = {}
    if "prefix" not in rows:
        return ratios
    ours = rows["prefix"]
    for mode, row in rows.items():
        if mode == "prefix":
            continue
        ratios[mode] = {
            "hit_rate": ours["prefix_cache_hit_rate"] / max(row["prefix_cache_hit_rate"], 1e-9),
            "throughput": ours["total_token_throughput"] / row["total_token_throughput"],
            "ttft_p50": row["ttft_p50_ms"] / ours["ttft_p50_ms"],
            "ttft_p99": row["ttft_p99_ms"] / ours["ttft_p99_ms"],
        }
        r = ratios[mode]
        print(f"prefix vs {mode}: hit rate x{r['hit_rate']:.2f}, throughput "
              f"x{r['throughput']:.2f}, TTFT p50 {r['ttft_p50']:.2f}x lower, "
              f"p99 {r['ttft_p99']:.2f}x lower")
    return ratios


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES),
                        help="routing modes to compare, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=800)
    parser.add_argument("--suffix-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=192)
    parser.add_argument("--kv-blocks", type=int, default=300,
                        help="KV blocks of each worker (0: the worker's default)")
    parser.add_argument("--lease-blocks", type=int, default=32,
                        help="blocks the scheduler leases ahead per worker (0: auto)")
    parser.add_argument("--request-rate", type=float, default=16.0,
                        help="requests per second (Poisson); 0: all at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh-args", default="",
                        help="more `meshserve up` flags, e.g. '--set num_kv_blocks=256'")
    parser.add_argument("--result-dir", default="bench/results")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise SystemExit(f"--modes: choose among {', '.join(MODES)}")
    args.mesh_args = shlex.split(args.mesh_args)
    with tempfile.TemporaryDirectory(prefix="prefix-routing-") as scratch:
        rows = {mode: run_mode(mode, args, Path(scratch)) for mode in modes}
    ratios = report(rows)
    commit = git_commit()
    rate = f"r{args.request_rate:g}" if args.request_rate else "burst"
    kv = f"kv{args.kv_blocks}" if args.kv_blocks else "kvdefault"
    name = (f"cpu-{args.workers}w-p{args.num_prefixes}x{args.prefix_len}-{rate}-{kv}-"
            f"prefix_routing_bench-{commit}.json")
    write_result(Path(args.result_dir) / name, {
        "benchmark": "bench.prefix_routing_bench",
        "command": shlex.join(["python", "-m", "bench.prefix_routing_bench", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
        "workers": args.workers, "num_prefixes": args.num_prefixes,
        "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
        "output_len": args.output_len, "num_prompts": args.num_prompts,
        "kv_blocks": args.kv_blocks, "lease_blocks": args.lease_blocks,
        "request_rate": args.request_rate or "inf", "modes": rows,
        "prefix_over": ratios,
    })


if __name__ == "__main__":
    main()
