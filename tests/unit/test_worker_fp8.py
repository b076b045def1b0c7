"""FP8 projections (``--quantization fp8``) and the FP8 KV cache (``--kv-cache-dtype
fp8``): the quantization math, quantized models and the cache's block moves on the
CPU; the fused FP8 kernels and the quantized CUDA forward on a GPU.

FP8 e4m3 keeps 3 mantissa bits, so a quantized value is within 1/16 of its
original (half a step of 1/8); the bounds below follow from that. Greedy tokens of
a quantized model are not those of the full-precision one (every logit moves by
about a percent), so model-level checks compare logits, as vLLM's FP8 tests do,
and state the tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

from services.worker.models.quantization import (
    FP8,
    FP8_MAX,
    Fp8Weight,
    check_quantization,
    dequantize,
    fp8_linear,
    quantize_rows,
    quantize_weight,
)
from services.worker.runner import ModelRunner
from services.worker.step_batch import RequestState, build_step_batch
from shared.embedded_model import ensure_embedded_model
from shared.protocol.generation import SamplingParams

# Half a step of e4m3's 3-bit mantissa, relative to the value.
HALF_STEP = 1 / 16
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def _within_half_step(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """Each value within half an e4m3 step of its original (plus the subnormal step
    of its row's scale, for values near zero)."""
    bound = HALF_STEP * want.abs() + scale * 2.0**-9 + 1e-6
    excess = (got - want).abs() - bound
    assert excess.max().item() <= 0, f"off by {excess.max().item()} beyond half a step"


def test_weights_quantize_per_output_row() -> None:
    gen = torch.Generator().manual_seed(0)
    # Rows of very different magnitude: per-row scales keep each one's precision.
    w = torch.randn((16, 64), generator=gen) * torch.logspace(-3, 2, 16)[:, None]
    w[2] = 0.0
    q = quantize_weight(w)
    assert q.weight.dtype == FP8 and q.weight.shape == (16, 64)
    assert q.scale.shape == (1, 16) and q.scale.dtype == torch.float32
    # Each row's largest magnitude maps to FP8's largest value.
    others = [i for i in range(16) if i != 2]
    assert torch.equal(q.weight[others].float().abs().amax(1), torch.full((15,), FP8_MAX))
    assert torch.equal(q.weight[2].float(), torch.zeros(64))
    _within_half_step(dequantize(q), w, q.scale.t())
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize_weight(torch.ones((16, 40)))


def test_activation_rows_quantize_per_token() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((5, 96), generator=gen) * torch.tensor([1e-4, 1.0, 30.0, 0.0, 500.0])[:, None]
    rows = quantize_rows(x)
    assert rows.data.dtype == FP8 and rows.scale.shape == (5, 1)
    assert torch.isfinite(rows.data.float()).all()
    assert torch.equal(rows.data[3].float(), torch.zeros(96))
    _within_half_step(rows.data.float() * rows.scale, x, rows.scale)


def test_fp8_linear_is_the_product_of_the_quantized_operands() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((7, 128), generator=gen)
    w = torch.randn((48, 128), generator=gen) * 0.1
    bias = torch.randn(48, generator=gen)
    qw = quantize_weight(w)
    rows = quantize_rows(x)
    want = (rows.data.float() * rows.scale) @ dequantize(qw).t() + bias
    got = fp8_linear(x, qw, bias, torch.float32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Pre-quantized rows (what the fused kernels hand over) give the same product.
    torch.testing.assert_close(fp8_linear(rows, qw, bias, torch.float32), got)
    # And the product is near the unquantized one: a few half-steps of error at most.
    exact = x @ w.t() + bias
    assert ((got - exact).norm() / exact.norm()).item() < 0.05


def test_unknown_or_unsupported_quantization_is_refused() -> None:
    check_quantization("", torch.float16)
    check_quantization("fp8", torch.bfloat16)
    with pytest.raises(ValueError, match="quantization 'int4' not supported"):
        check_quantization("int4", torch.bfloat16)
    with pytest.raises(ValueError, match="needs dtype bfloat16 or float32"):
        check_quantization("fp8", torch.float16)
    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=8,
                    quantization="awq")


def _prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    """Logits at every prompt position of a one-step prefill (reference forward)."""
    block = runner.block_size
    states, start = [], 0
    for i, prompt in enumerate(prompts):
        blocks = -(-len(prompt) // block)
        states.append(RequestState(str(i), prompt, 0, list(range(start, start + blocks)),
                                   SamplingParams(), 0))
        start += blocks
    batch = build_step_batch(states, [len(p) for p in prompts], block, runner.device)
    rows = torch.arange(batch.input_ids.shape[0], device=runner.device)
    with torch.inference_mode():
        hidden = runner.model.forward(batch.input_ids, batch.positions, batch.meta,
                                      runner.kv_cache, rows)
        return runner.model.logits(hidden)


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _assert_tracks(got: torch.Tensor, want: torch.Tensor) -> None:
    """Quantized logits against full-precision ones. Stated tolerance, from the
    embedded model (4 layers of near-random weights, where each FP8 GEMM's output
    is off by ~5% and nothing averages it out): median relative error < 20%, cosine
    similarity > 0.97 at every position, the same top token at >= 60% of them."""
    relative = ((got - want).norm(dim=-1) / want.norm(dim=-1)).median().item()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert relative < 0.2 and cosine > 0.97 and agreement >= 0.6, (relative, cosine, agreement)


FORMATS = [("fp8", "auto"), ("", "fp8"), ("fp8", "fp8")]


@pytest.mark.parametrize(("quantization", "kv_cache_dtype"), FORMATS)
def test_quantized_model_logits_track_full_precision(quantization, kv_cache_dtype) -> None:
    folder = ensure_embedded_model()
    full = ModelRunner(folder, "cpu", "float32", num_kv_blocks=64, block_size=16)
    fp8 = ModelRunner(folder, "cpu", "float32", num_kv_blocks=64, block_size=16,
                      quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    qkv = fp8.model.layers[0].qkv
    assert isinstance(qkv, Fp8Weight) == (quantization == "fp8")
    assert fp8.model.lm_head.dtype == torch.float32  # the head is never quantized
    assert fp8.kv_cache.dtype == (FP8 if kv_cache_dtype == "fp8" else torch.float32)
    # Prompts over several blocks: later blocks attend to earlier ones read back.
    prompts = _prompts(full.model.config.vocab_size, (40, 25, 60), seed=3)
    _assert_tracks(_prefill_logits(fp8, prompts), _prefill_logits(full, prompts))
    # A model with random logits would not: the check can fail.
    with pytest.raises(AssertionError):
        _assert_tracks(torch.randn_like(_prefill_logits(full, prompts)),
                       _prefill_logits(full, prompts))


def test_fp8_cache_halves_blocks_and_moves_them_byte_exact() -> None:
    """An FP8 cache's block is half a bf16 one's; copy-on-write copies, host swaps
    and transfer staging move its bytes unchanged (through the uint8 view)."""
    from services.worker.kv_transfer.staging import BlockStager

    folder = ensure_embedded_model()
    bf16 = ModelRunner(folder, "cpu", "bfloat16", num_kv_blocks=8, block_size=16)
    runner = ModelRunner(folder, "cpu", "bfloat16", num_kv_blocks=8, block_size=16,
                         kv_cache_dtype="fp8")
    assert runner.kv_block_bytes * 2 == bf16.kv_block_bytes
    cache = runner.kv_cache
    gen = torch.Generator().manual_seed(6)
    cache.raw_k.copy_(torch.randint(0, 120, cache.raw_k.shape, generator=gen, dtype=torch.uint8))
    cache.raw_v.copy_(torch.randint(0, 120, cache.raw_v.shape, generator=gen, dtype=torch.uint8))
    block = lambda i: (cache.raw_k[:, i].clone(), cache.raw_v[:, i].clone())  # noqa: E731
    original = block(1)
    cache.copy_blocks([1], [2])
    assert all(torch.equal(a, b) for a, b in zip(block(2), original, strict=True))
    runner.host_cache.resize(4)
    runner.host_cache.swap([1], [3], [], [])
    cache.raw_k[:, 1].zero_()
    runner.host_cache.swap([], [], [3], [5])
    assert all(torch.equal(a, b) for a, b in zip(block(5), original, strict=True))
    stager = BlockStager(cache)
    assert stager.layout.dtype == "float8_e4m3fn"
    payload = stager.gather([2]).numpy().tobytes()
    assert len(payload) == runner.kv_block_bytes
    stager.scatter([6], memoryview(payload))
    assert all(torch.equal(a, b) for a, b in zip(block(6), original, strict=True))


def test_worker_settings_reach_the_runner() -> None:
    """MESHSERVE_QUANTIZATION / MESHSERVE_KV_CACHE_DTYPE (`--quantization`,
    `--kv-cache-dtype`) through the worker's config to the model it loads."""
    from services.worker.config import WorkerConfig
    from services.worker.service import _load_runner
    from shared.config import load_config

    config = load_config(WorkerConfig, environ={"MESHSERVE_QUANTIZATION": "fp8",
                                                "MESHSERVE_KV_CACHE_DTYPE": "fp8",
                                                "MESHSERVE_NUM_KV_BLOCKS": "16"})
    runner = _load_runner(config, "cpu")
    assert isinstance(runner.model.layers[-1].down, Fp8Weight)
    assert runner.kv_cache.dtype == FP8


def test_unknown_kv_cache_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' not supported"):
        ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=8,
                    kv_cache_dtype="int8")


gpu = pytest.mark.skipif(not CUDA, reason="FP8 kernels need CUDA (Triton's interpreter "
                         "rounds to float8 differently from the GPU)")


@gpu
@pytest.mark.gpu
def test_fused_fp8_kernels_match_the_reference_quantization() -> None:
    from services.worker.kernels import fused
    from services.worker.models.llama import rms_norm as reference_rms_norm

    dev, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((9, 4096), generator=gen).to(dev, dtype)
    r = torch.randn((9, 4096), generator=gen).to(dev, dtype)
    w = (1 + 0.1 * torch.randn(4096, generator=gen)).to(dev, dtype)

    def check(rows, want: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
        ref = quantize_rows(want)
        torch.testing.assert_close(rows.scale, ref.scale, rtol=2e-2, atol=0)
        _within_half_step(rows.data.float() * rows.scale, want.float(), rows.scale)

    check(fused.rms_norm(x, w, 1e-5, fp8=True), reference_rms_norm(x, w, 1e-5))
    residual = r.clone()
    check(fused.add_rms_norm(x, residual, w, 1e-5, fp8=True),
          reference_rms_norm(x + r, w, 1e-5))
    torch.testing.assert_close(residual, x + r)
    gate_up = torch.randn((9, 2 * 14336), generator=gen).to(dev, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    check(fused.silu_and_mul(gate_up, fp8=True), torch.nn.functional.silu(gate) * up)
    check(fused.quantize_rows(x), x)
    zero = fused.quantize_rows(torch.zeros((2, 256), device=dev, dtype=dtype))
    assert torch.equal(zero.data.float(), torch.zeros((2, 256), device=dev))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("quantization", "kv_cache_dtype"), FORMATS)
def test_quantized_cuda_steps_track_full_precision(quantization, kv_cache_dtype) -> None:
    """On the GPU: FP8 logits (torch._scaled_mm on the tensor cores, an FP8 cache read
    back) track bf16 ones as on the CPU; the worker's CUDA path (fused kernels writing
    FP8 rows and FP8 K/V, the attention kernel widening them, CUDA graphs) samples
    the tokens those logits pick, and its graphs replay what its eager steps compute."""
    from bench.inprocess import InProcessEngine

    folder = ensure_embedded_model()
    formats = {"quantization": quantization, "kv_cache_dtype": kv_cache_dtype}
    bf16 = ModelRunner(folder, "cuda", "bfloat16", num_kv_blocks=256, block_size=16)
    fp8 = ModelRunner(folder, "cuda", "bfloat16", num_kv_blocks=256, block_size=16, **formats)
    prompts = _prompts(bf16.model.config.vocab_size, (40, 25, 60, 7), seed=5)
    logits = _prefill_logits(fp8, prompts)
    _assert_tracks(logits.float(), _prefill_logits(bf16, prompts).float())
    fp8.reset()
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    graphed = [c.token_ids for c in InProcessEngine(fp8).generate(prompts, sampling)]
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    picked = logits[last.to(logits.device)].argmax(-1).tolist()
    assert sum(p == g[0] for p, g in zip(picked, graphed, strict=True)) >= 3
    eager = ModelRunner(folder, "cuda", "bfloat16", num_kv_blocks=256, block_size=16,
                        graph_max_batch=0, graph_max_tokens=0, **formats)
    assert [c.token_ids for c in InProcessEngine(eager).generate(prompts, sampling)] == graphed
