"""The Triton paged-attention kernels against a plain torch reference.

They run on CUDA; with ``TRITON_INTERPRET=1`` (and triton installed) they also run
on the CPU through Triton's interpreter, which is how they are debugged without a
GPU. Anywhere else they skip.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICE, DTYPE, TOL = torch.device("cuda"), torch.bfloat16, 2e-2
elif INTERPRET:
    DEVICE, DTYPE, TOL = torch.device("cpu"), torch.float32, 1e-4
else:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

pytestmark = pytest.mark.gpu

from services.worker.kernels.paged_attention import (  # noqa: E402
    paged_attention,
    query_tiles,
    split_decode_attention,
    tile_rows,
)

PAGE = 16


def _layout(seq_lens: list[int], query_lens: list[int], num_blocks: int, seed: int):
    """Random, non-contiguous block tables for requests of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-s // PAGE) for s in seq_lens)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for r, s in enumerate(seq_lens):
        for j in range(-(-s // PAGE)):
            tables[r, j] = free.pop()
    starts = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return tables, starts


def _reference(q, k_cache, v_cache, tables, seq_lens, query_lens, scale, window):
    """Per request: gather its keys through the table, causal (and window) mask."""
    out = torch.empty_like(q, dtype=torch.float32)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    row = 0
    for r, (s, n) in enumerate(zip(seq_lens, query_lens, strict=True)):
        slots = torch.arange(s)
        blocks = tables[r, slots // PAGE].long()
        keys = k_cache[blocks, slots % PAGE].float().repeat_interleave(group, dim=1)
        values = v_cache[blocks, slots % PAGE].float().repeat_interleave(group, dim=1)
        qs = q[row:row + n].float()
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        q_pos = torch.arange(s - n, s)[:, None]
        visible = slots[None, :] <= q_pos
        if window is not None:
            visible &= slots[None, :] > q_pos - window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[row:row + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        row += n
    return out


def _cache(num_blocks: int, kv_heads: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, PAGE, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(shape, generator=gen).to(DEVICE, DTYPE)
    return k, v


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 32), (8, 1, 64)])
def test_mixed_step_matches_reference(heads, kv_heads, head_dim, window) -> None:
    # Decodes at several depths, a first chunk, a middle chunk, a chunk of 1 token
    # that is not a decode's layout neighbour, a page-aligned length.
    seq_lens = [1, 17, 100, 37, 90, 64, 33]
    query_lens = [1, 1, 1, 37, 25, 16, 1]
    k_cache, v_cache = _cache(64, kv_heads, head_dim, seed=1)
    tables, starts = _layout(seq_lens, query_lens, 64, seed=2)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn((sum(query_lens), heads, head_dim), generator=gen).to(DEVICE, DTYPE)
    lens = torch.tensor(query_lens, dtype=torch.int32)
    _, block_q = tile_rows(heads, kv_heads, max(query_lens))
    tile_request, tile_start = query_tiles(lens, block_q)
    scale = head_dim**-0.5
    out = paged_attention(
        q, k_cache, v_cache, tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32,
                                                             device=DEVICE),
        starts.to(DEVICE), tile_request.to(DEVICE), tile_start.to(DEVICE), max(query_lens),
        scale, window,
    )
    expected = _reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, seq_lens, query_lens,
                          scale, window)
    torch.testing.assert_close(out.float().cpu(), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("window", [None, 100])
def test_split_decode_matches_reference(num_splits, window) -> None:
    heads, kv_heads, head_dim = 8, 2, 64
    seq_lens = [1, 300, 129, 64, 511]
    k_cache, v_cache = _cache(128, kv_heads, head_dim, seed=4)
    tables, _ = _layout(seq_lens, [1] * len(seq_lens), 128, seed=5)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn((len(seq_lens), heads, head_dim), generator=gen).to(DEVICE, DTYPE)
    scale = head_dim**-0.5
    out = split_decode_attention(
        q, k_cache, v_cache, tables.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), max(seq_lens), num_splits,
        scale, window,
    )
    expected = _reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, seq_lens,
                          [1] * len(seq_lens), scale, window)
    torch.testing.assert_close(out.float().cpu(), expected, atol=TOL, rtol=TOL)


def test_fused_norms_match_reference() -> None:
    from services.worker.kernels.fused import add_rms_norm, rms_norm, silu_and_mul
    from services.worker.models.llama import rms_norm as reference_rms_norm

    gen = torch.Generator().manual_seed(7)
    x = torch.randn((5, 96), generator=gen).to(DEVICE, DTYPE)
    r = torch.randn((5, 96), generator=gen).to(DEVICE, DTYPE)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(DEVICE, DTYPE)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5),
                               atol=TOL, rtol=TOL)
    residual = r.clone()
    out = add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(residual, x + r, atol=TOL, rtol=TOL)
    torch.testing.assert_close(out, reference_rms_norm(x + r, w, 1e-5), atol=TOL, rtol=TOL)
    gate_up = torch.randn((5, 2 * 48), generator=gen).to(DEVICE, DTYPE)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               atol=TOL, rtol=TOL)


def test_rotary_and_cache_matches_reference() -> None:
    from services.worker.kernels.fused import rotary_and_cache
    from services.worker.models.config import RopeConfig
    from services.worker.models.rope import RotaryTables, apply_rotary

    heads, kv_heads, dim, tokens = 4, 2, 32, 6
    tables = RotaryTables(RopeConfig(theta=10000.0), dim, 64, DEVICE, DTYPE)
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn((tokens, (heads + 2 * kv_heads) * dim), generator=gen).to(DEVICE, DTYPE)
    positions = torch.tensor([0, 1, 2, 30, 31, 63], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([5, 17, 2, 40, 9, 63], device=DEVICE)
    k_cache = torch.zeros((4, PAGE, kv_heads, dim), device=DEVICE, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    cos, sin = tables.lookup(positions.long())
    q_ref = apply_rotary(q.reshape(tokens, heads, dim), cos, sin)
    k_ref = apply_rotary(k.reshape(tokens, kv_heads, dim), cos, sin)
    rotary_and_cache(qkv, tables.cos, tables.sin, positions, slots, k_cache, v_cache,
                     heads, kv_heads, dim)
    torch.testing.assert_close(qkv[:, : heads * dim].view(tokens, heads, dim), q_ref,
                               atol=TOL, rtol=TOL)
    flat_k = k_cache.view(-1, kv_heads, dim)
    flat_v = v_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[slots], k_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(flat_v[slots], v.reshape(tokens, kv_heads, dim))


def test_fused_forward_matches_reference_forward() -> None:
    """A mixed step (a decode over a cached prefix, a first chunk, a middle chunk)
    through the fused kernels gives the reference forward's hidden states."""
    from services.worker.kernel_batch import StagingBuffer, build_kernel_batch
    from services.worker.models.llama_fused import fused_forward
    from services.worker.runner import ModelRunner
    from services.worker.step_batch import RequestState, build_step_batch
    from shared.embedded_model import ensure_embedded_model
    from shared.protocol.generation import SamplingParams

    folder = ensure_embedded_model()
    dtype = "float32" if DTYPE is torch.float32 else "bfloat16"
    runner = ModelRunner(folder, "cpu" if DEVICE.type == "cpu" else "cuda", dtype,
                         num_kv_blocks=64, block_size=PAGE, graph_max_batch=0)
    model = runner.model
    gen = torch.Generator().manual_seed(9)
    vocab = model.config.vocab_size

    def states() -> list[RequestState]:
        tokens = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (40, 30, 50)]
        return [
            RequestState("a", tokens[0], 39, list(range(0, 3)), SamplingParams(), 0),
            RequestState("b", tokens[1], 0, list(range(10, 12)), SamplingParams(), 0),
            RequestState("c", tokens[2], 16, list(range(20, 24)), SamplingParams(), 0),
        ]

    num_tokens = [1, 30, 20]
    # Fill the cached prefixes through the reference path first (same cache both ways).
    with torch.inference_mode():
        ref_states = states()
        warm = [RequestState(s.request_id, s.token_ids, 0, s.block_ids, s.sampling, 0)
                for s in ref_states if s.num_computed]
        warm_batch = build_step_batch(warm, [s.num_computed for s in ref_states if s.num_computed],
                                      PAGE, runner.device)
        model.forward(warm_batch.input_ids, warm_batch.positions, warm_batch.meta,
                      runner.kv_cache, warm_batch.sample_rows)
        ref = build_step_batch(ref_states, num_tokens, PAGE, runner.device)
        expected = model.forward(ref.input_ids, ref.positions, ref.meta, runner.kv_cache,
                                 ref.sample_rows)
        batch = build_kernel_batch(ref_states, num_tokens, PAGE, StagingBuffer(runner.device),
                                   model.config.num_heads, model.config.num_kv_heads, {})
        got = fused_forward(model, batch.input_ids, batch.positions, batch.meta,
                            runner.kv_cache, batch.sample_rows)
    # The reference samples decodes first; both sample the same requests.
    order = [ref.samplers.index(i) for i in batch.samplers]
    torch.testing.assert_close(got.float(), expected[order].float(),
                               atol=5 * TOL, rtol=5 * TOL)


def test_graph_step_layouts_match_reference_forward() -> None:
    """The padded static-buffer layouts the CUDA graphs replay (mixed steps by
    token bucket, decodes by batch bucket) give the reference forward's hidden
    states for the rows that sample. On the CPU (interpreter) the forward runs on
    those buffers directly; on CUDA the captured graphs replay."""
    from services.worker.cuda_graphs import DecodeGraphs
    from services.worker.mixed_graphs import MixedGraphs
    from services.worker.models.llama_fused import fused_forward
    from services.worker.runner import ModelRunner
    from services.worker.step_batch import PENDING, RequestState, build_step_batch
    from shared.embedded_model import ensure_embedded_model
    from shared.protocol.generation import SamplingParams

    dtype = "float32" if DTYPE is torch.float32 else "bfloat16"
    runner = ModelRunner(ensure_embedded_model(), DEVICE.type, dtype, num_kv_blocks=64,
                         block_size=PAGE, graph_max_batch=0)
    model, cache = runner.model, runner.kv_cache
    c = model.config

    def forward(ids, positions, meta):  # type: ignore[no-untyped-def]
        return fused_forward(model, ids, positions, meta, cache)

    mixed = MixedGraphs(forward, runner.device, max_tokens=128, max_requests=4, max_blocks=8,
                        block_size=PAGE, scratch_block=63, num_heads=c.num_heads,
                        num_kv_heads=c.num_kv_heads)
    decode = DecodeGraphs(forward, runner.device, max_batch=4, max_blocks=8, block_size=PAGE,
                          scratch_block=63)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (23, 40, 9)]

    def fresh() -> list[RequestState]:
        return [RequestState(str(i), list(p), 0, list(range(10 * i, 10 * i + 4)),
                             SamplingParams(), 0) for i, p in enumerate(prompts)]

    def reference(states, num_tokens):  # type: ignore[no-untyped-def]
        batch = build_step_batch(states, num_tokens, PAGE, runner.device)
        hidden = model.forward(batch.input_ids, batch.positions, batch.meta, cache,
                               batch.sample_rows)
        return dict(zip(batch.samplers, hidden.float(), strict=True))

    with torch.inference_mode():
        # Step 1: first chunks of two prompts and the whole third (samples only it).
        ref_states, graph_states = fresh(), fresh()
        chunks = [16, 24, 9]
        expected = reference(ref_states, chunks)
        samplers, got = mixed.run(graph_states, chunks, {})
        assert samplers == [2] == list(expected)
        torch.testing.assert_close(got.float()[0], expected[2], atol=5 * TOL, rtol=5 * TOL)
        for states in (ref_states, graph_states):
            for state, n in zip(states, chunks, strict=True):
                state.num_computed += n
        # Step 2: the rest of the first two prompts beside a decode of the third,
        # whose input token is still "on the device" (fed from a sampled-ids row).
        ref_states[2].token_ids.append(5)
        graph_states[2].token_ids.append(PENDING)
        sampled = torch.tensor([9, 5], device=runner.device)
        rest = [7, 16, 1]
        expected = reference(ref_states, rest)
        samplers, got = mixed.run(graph_states, rest, {"2": (sampled, 1)})
        assert samplers == [0, 1, 2]
        for row, i in enumerate(samplers):
            torch.testing.assert_close(got.float()[row], expected[i], atol=5 * TOL, rtol=5 * TOL)
        graph_states[2].token_ids[-1] = 5
        for states in (ref_states, graph_states):
            for state, n in zip(states, rest, strict=True):
                state.num_computed += n
        for i, token in enumerate((7, 8, 9)):
            ref_states[i].token_ids.append(token)
            graph_states[i].token_ids.append(PENDING if i else token)
        # Step 3: a decode of all three through the decode buckets (3 pads to 4);
        # two inputs are fed from the device.
        expected = reference(ref_states, [1, 1, 1])
        sampled = torch.tensor([8, 9], device=runner.device)
        samplers, got = decode.run(graph_states, {"1": (sampled, 0), "2": (sampled, 1)})
        assert samplers == [0, 1, 2]
        for i in range(3):
            torch.testing.assert_close(got.float()[i], expected[i], atol=5 * TOL, rtol=5 * TOL)
