"""FP8 weights for the decoder's projections (vLLM's ``--quantization fp8``).

A bf16/fp16 checkpoint is quantized as it loads: each projection weight becomes
float8 e4m3 with one float32 scale per output row (per channel), and each
activation row entering it is quantized on the fly with a scale of its own (per
token, dynamic). The matmul then runs on the GPU's FP8 tensor cores through
``torch._scaled_mm``, which applies both scales in its epilogue and returns the
model dtype. Per-channel weight scales keep a row with small weights from losing
its precision to the largest row; per-token activation scales do the same for
tokens (an outlier token does not flatten every other row of the batch).

Only the q/k/v, o, gate/up and down projections are quantized, as in vLLM: the
embedding, the LM head and the norms stay in the model dtype (the head decides
the sampled token, and its share of the FLOPs is small).

``quantize_rows`` here is the torch reference of the activation quantization
(and the CPU path); on CUDA the fused kernels of ``services/worker/kernels``
write the quantized rows directly, ``fp8_linear`` accepts either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.device import FP8

FP8_MAX = float(torch.finfo(FP8).max)  # 448
# An all-zero row would get scale 0 (and 0 / 0 in its quantized values): every
# scale is at least this, so such a row quantizes to zeros.
MIN_AMAX = 1e-12
QUANTIZATIONS = ("", "fp8")


@dataclass(frozen=True, slots=True)
class Fp8Weight:
    """A projection weight [out, in] in float8 e4m3, ``weight * scale`` ~ the original."""

    weight: torch.Tensor  # [out, in], FP8, contiguous (``.t()`` is _scaled_mm's column-major B)
    scale: torch.Tensor  # [1, out] float32: one per output row

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


@dataclass(frozen=True, slots=True)
class QuantizedRows:
    """Activations [rows, width] in float8 e4m3 with one float32 scale per row."""

    data: torch.Tensor  # [rows, width] FP8
    scale: torch.Tensor  # [rows, 1] float32


Weight = torch.Tensor | Fp8Weight
Activation = torch.Tensor | QuantizedRows


def check_quantization(name: str, dtype: torch.dtype) -> None:
    """Refuse a quantization this worker cannot run, naming what would work."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization {name!r} not supported; use fp8 or leave it empty")
    if name == "fp8" and dtype == torch.float16:
        # _scaled_mm's per-row scales produce bfloat16 (or float32) only.
        raise ValueError("quantization fp8 needs dtype bfloat16 or float32, not float16")


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """Per-output-row FP8 quantization of a weight [out, in]. Both sizes must be
    multiples of 16, which the FP8 tensor-core GEMM requires (every Llama-family
    model's are)."""
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        raise ValueError(f"quantization fp8 needs projection sizes divisible by 16, "
                         f"this model has one of {tuple(weight.shape)}")
    w32 = weight.float()
    scale = w32.abs().amax(dim=1).clamp(min=MIN_AMAX) / FP8_MAX
    data = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(data.contiguous(), scale[None, :].contiguous())


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """Per-row dynamic FP8 quantization of activations [rows, width]."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    data = (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return QuantizedRows(data, scale)


def fp8_linear(
    x: Activation, weight: Fp8Weight, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``x @ weight.T + bias`` on FP8 tensor cores, in ``out_dtype``. On the CPU
    (tests, not speed: torch's CPU ``_scaled_mm`` takes per-tensor scales only, in
    some versions) the same product of the FP8 operands in float32."""
    rows = x if isinstance(x, QuantizedRows) else quantize_rows(x)
    if rows.data.is_cuda:
        out = torch._scaled_mm(rows.data, weight.weight.t(), rows.scale, weight.scale,
                               out_dtype=out_dtype, use_fast_accum=True)
    else:
        out = ((rows.data.float() * rows.scale) @ dequantize(weight).t()).to(out_dtype)
    return out if bias is None else out.add_(bias)


def linear(
    x: Activation, weight: Weight, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """One projection, whichever form its weight (and its input) has."""
    if isinstance(weight, Fp8Weight):
        return fp8_linear(x, weight, bias, out_dtype)
    assert isinstance(x, torch.Tensor), "quantized rows need an FP8 weight"
    return F.linear(x, weight, bias)


def dequantize(weight: Fp8Weight) -> torch.Tensor:
    """The float32 weight an ``Fp8Weight`` stands for (tests compare against it)."""
    return weight.weight.float() * weight.scale.t()
