"""The decoder's projection GEMMs on this GPU: bfloat16 against FP8 (``--quantization
fp8``), per projection shape and step size, with the FP8 path's activation
quantization timed beside it.

    python -m bench.gemm_bench --shape llama-3.1-8b --tokens 256 2048 8192

Prints microseconds and TFLOP/s per GEMM and the FP8 / bf16 speed-up of a whole
layer's four projections; ``--result-json`` writes the same rows. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.make_model import SHAPES
from bench.results import gpu_name
from services.worker.models.quantization import fp8_linear, quantize_weight

REPEATS = 50


def _time(fn: Callable[[], object]) -> float:
    """Seconds per call, from a CUDA graph of REPEATS calls (no launch gaps)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPEATS


def _projections(shape_name: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's fused projections."""
    s = SHAPES[shape_name]
    return [("qkv", s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim),
            ("o", s.heads * s.head_dim, s.hidden),
            ("gate_up", s.hidden, 2 * s.intermediate),
            ("down", s.intermediate, s.hidden)]


def bench(shape_name: str, token_counts: list[int]) -> list[dict[str, object]]:
    from services.worker.kernels.fused import quantize_rows

    rows: list[dict[str, object]] = []
    for tokens in token_counts:
        layer_bf16 = layer_fp8 = 0.0
        for name, k, n in _projections(shape_name):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
            qw = quantize_weight(w)
            qx = quantize_rows(x)
            flops = 2 * tokens * k * n
            t_bf16 = _time(lambda x=x, w=w: F.linear(x, w))
            t_fp8 = _time(lambda qx=qx, qw=qw: fp8_linear(qx, qw, None, torch.bfloat16))
            t_quant = _time(lambda x=x: quantize_rows(x))
            layer_bf16 += t_bf16
            layer_fp8 += t_fp8 + t_quant
            row = {"tokens": tokens, "gemm": name, "k": k, "n": n,
                   "bf16_us": 1e6 * t_bf16, "bf16_tflops": flops / t_bf16 / 1e12,
                   "fp8_us": 1e6 * t_fp8, "fp8_tflops": flops / t_fp8 / 1e12,
                   "quantize_us": 1e6 * t_quant}
            rows.append(row)
            print(f"M={tokens:>5} {name:>8} [{k}x{n}]: bf16 {row['bf16_us']:7.1f} us "
                  f"{row['bf16_tflops']:4.0f} TFLOP/s | fp8 {row['fp8_us']:7.1f} us "
                  f"{row['fp8_tflops']:5.0f} TFLOP/s (+ quantize {row['quantize_us']:.1f} us)")
        print(f"M={tokens:>5} layer: bf16 {1e6 * layer_bf16:.0f} us, fp8 with quantization "
              f"{1e6 * layer_fp8:.0f} us, speed-up {layer_bf16 / layer_fp8:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gemm_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256, 2048, 8192])
    parser.add_argument("--blas", choices=["cublas", "cublaslt"], default="",
                        help="the library torch's bf16 matmuls use (default: torch's choice)")
    parser.add_argument("--result-json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: the GEMM benchmark needs a CUDA GPU")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    rows = bench(args.shape, args.tokens)
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "-m", "bench.gemm_bench", *sys.argv[1:]])
        path.write_text(json.dumps({"benchmark": "bench.gemm_bench", "command": command,
                                    "gpu": gpu_name(),
                                    "shape": args.shape, "blas": args.blas or "default",
                                    "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
