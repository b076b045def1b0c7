"""Greedy output through the whole mesh is token-identical to transformers with the
KV features in play: the prefix cache on (with hits, shown by /metrics) and off,
``n=3`` choices that share their prompt's blocks, and a KV pool small enough that
requests are preempted and recomputed."""

from __future__ import annotations

import json
import random
import re
import time
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import start_mesh
from tests.e2e.test_token_exact import MAX_TOKENS, complete_all, oracle

CHUNKED = ["--set", "max_prefill_chunk=48", "--set", "max_num_batched_tokens=256",
           "--set", "block_size=16"]


def shared_prefix_prompts(seed: int = 11) -> list[list[int]]:
    """Three system-prompt-like prefixes (some not block aligned), each followed by
    several different questions, plus prompts that are a prefix of another."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 2048) for _ in range(n)] for n in (40, 64, 130)]
    prompts = []
    for prefix in prefixes:
        for n in (1, 7, 23):
            prompts.append(prefix + [rng.randrange(3, 2048) for _ in range(n)])
    prompts.append(prefixes[2][:100])
    return prompts


def metric(base_url: str, name: str, at_least: float | None = None) -> float:
    """A /metrics value. The api learns the scheduler's counters from a status sent
    every heartbeat, so a counter read right after the requests may lag: with
    ``at_least``, wait (bounded) until it got there."""
    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(base_url + "/metrics", timeout=30).text
        match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} missing from /metrics"
        value = float(match.group(1))
        if at_least is None or value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


async def complete_n(base_url: str, prompt: list[int], n: int) -> list[tuple[str, str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        response = await client.post("/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "n": n})
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return [(c["text"], c["finish_reason"]) for c in choices]


async def complete_salted(base_url: str, prompt: list[int], salt: str) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        response = await client.post("/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "cache_salt": salt})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"], choice["finish_reason"]


@pytest.fixture(scope="module")
def expected() -> list[tuple[str, int, str]]:
    return oracle(ensure_embedded_model(), shared_prefix_prompts())


def test_prefix_cache_on_hits_and_matches_transformers(
        tmp_path: Path, expected: list[tuple[str, int, str]]) -> None:
    prompts = shared_prefix_prompts()
    mesh = start_mesh(tmp_path, extra_args=CHUNKED)
    try:
        first = anyio.run(complete_all, mesh.base_url, prompts)
        # Again: now every prefix is cached from the first round.
        second = anyio.run(complete_all, mesh.base_url, prompts)
        forks = anyio.run(partial(complete_n, mesh.base_url, prompts[5], 3))
        hits = metric(mesh.base_url, "vllm:prefix_cache_hits_total",
                      at_least=sum((len(p) - 1) // 16 * 16 for p in prompts))
        queries = metric(mesh.base_url, "vllm:prefix_cache_queries_total",
                         at_least=sum(len(p) for p in prompts))
        stats = mesh.cli("kv", "stats", "--json")
        # Same prompt, other salts: nothing of the rounds above may be reused.
        salted_hits_before = json.loads(stats.stdout)["prefix_cache_hits"]
        salted = [anyio.run(partial(complete_salted, mesh.base_url, prompts[5], salt))
                  for salt in ("tenant-a", "tenant-b")]
        salted_stats = json.loads(mesh.cli("kv", "stats", "--json").stdout)
        missing = mesh.cli("kv", "dump", "no-such-request")
    finally:
        mesh.stop()
    assert first == expected
    assert second == expected
    text, _, finish = expected[5]
    assert forks == [(text, finish)] * 3
    assert salted == [(text, finish)] * 2
    assert salted_stats["prefix_cache_hits"] == salted_hits_before
    # The n=3 request was computed once and forked: choices 1 and 2 took over every
    # prompt block, and exactly one block (the last prompt block) was copied each.
    figures = json.loads(stats.stdout)
    prompt_blocks = -(-len(prompts[5]) // 16)
    assert figures["fork_shared_blocks"] == 2 * prompt_blocks
    assert figures["cow_block_copies"] == 2
    # The second round alone hits every full block short of each last token.
    assert hits >= sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert queries >= sum(len(p) for p in prompts)
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["prefix_cache_hits"] >= hits and figures["prefix_cache_hit_rate"] > 0.3
    assert figures["pools"][0]["cached_blocks"] > 0 and figures["pools"][0]["used_blocks"] == 0
    assert missing.returncode == 1 and "no KV pool holds" in missing.stderr


def test_prefix_cache_off_matches_transformers(
        tmp_path: Path, expected: list[tuple[str, int, str]]) -> None:
    prompts = shared_prefix_prompts()
    mesh = start_mesh(tmp_path, extra_args=[*CHUNKED, "--set", "enable_prefix_caching=false"])
    try:
        got = anyio.run(complete_all, mesh.base_url, prompts)
        forks = anyio.run(partial(complete_n, mesh.base_url, prompts[5], 3))
        hits = metric(mesh.base_url, "vllm:prefix_cache_hits_total")
        stats = mesh.cli("kv", "stats", "--json")
    finally:
        mesh.stop()
    assert got == expected
    text, _, finish = expected[5]
    assert forks == [(text, finish)] * 3
    assert hits == 0
    figures = json.loads(stats.stdout)
    assert figures["fork_shared_blocks"] > 0 and figures["cow_block_copies"] == 2


# 12 blocks of 16 tokens (192 slots): every prompt (up to 153 + 24 tokens) fits
# alone, but the n=3 request on the longest prompt cannot: its choices share 9
# full prompt blocks and each needs 3 blocks of its own (the copied partial block
# and two more for its outputs), 18 in all. The choices arrive in one Submit and
# run together, so preemption happens however the other requests trickle in.
SMALL_POOL = [*CHUNKED, "--set", "num_kv_blocks=12", "--set", "lease_blocks=4"]
FORKED = 8  # the 130-token prefix plus 23 tokens: 10 prompt blocks


def test_small_pool_preempts_by_recompute_and_matches_transformers(
        tmp_path: Path, expected: list[tuple[str, int, str]]) -> None:
    prompts = shared_prefix_prompts()
    assert expected[FORKED][1] == 24  # no early stop: the choices need all their blocks
    mesh = start_mesh(tmp_path, extra_args=[*SMALL_POOL, "--set", "preemption_mode=recompute"])
    try:
        got = anyio.run(complete_all, mesh.base_url, prompts)
        forks = anyio.run(partial(complete_n, mesh.base_url, prompts[FORKED], 3))
        preemptions = metric(mesh.base_url, "vllm:num_preemptions_total", at_least=1)
        swaps = metric(mesh.base_url, "meshserve:kv_swap_outs_total")
    finally:
        mesh.stop()
    assert got == expected
    text, _, finish = expected[FORKED]
    assert forks == [(text, finish)] * 3
    assert preemptions > 0
    assert swaps == 0


def test_small_pool_swaps_to_host_and_matches_transformers(
        tmp_path: Path, expected: list[tuple[str, int, str]]) -> None:
    prompts = shared_prefix_prompts()
    mesh = start_mesh(tmp_path, extra_args=[*SMALL_POOL, "--set", "host_swap_gb=0.01"])
    try:
        got = anyio.run(complete_all, mesh.base_url, prompts)
        forks = anyio.run(partial(complete_n, mesh.base_url, prompts[FORKED], 3))
        swapped = json.loads(mesh.cli("kv", "stats", "--json").stdout)
        swap_metric = metric(mesh.base_url, "meshserve:kv_swap_outs_total",
                             at_least=swapped["swap_outs"])
        # Resize while the mesh runs: no host room, so preemption recomputes.
        shrink = mesh.cli("kv", "set", "host-swap-gb", "0")
        shrunk = json.loads(mesh.cli("kv", "stats", "--json").stdout)
        forks_recomputed = anyio.run(partial(complete_n, mesh.base_url, prompts[FORKED], 3))
        after_shrink = json.loads(mesh.cli("kv", "stats", "--json").stdout)
        grow = mesh.cli("kv", "set", "host-swap-gb", "0.005")
        forks_swapped_again = anyio.run(partial(complete_n, mesh.base_url, prompts[FORKED], 3))
        regrown = json.loads(mesh.cli("kv", "stats", "--json").stdout)
        text_stats = mesh.cli("kv", "stats")
    finally:
        mesh.stop()
    assert got == expected
    text, _, finish = expected[FORKED]
    assert forks == forks_recomputed == forks_swapped_again == [(text, finish)] * 3
    # The embedded model's block is 64 KiB (fp32): 0.01 GB is 152 host blocks.
    assert swapped["host_blocks"] == 10_000_000 // 65_536
    assert swapped["swap_outs"] > 0 and swapped["swap_ins"] == swapped["swap_outs"]
    assert swapped["swapped_out_blocks"] > 0 and swapped["host_used_blocks"] == 0
    assert swap_metric == swapped["swap_outs"]
    assert shrink.returncode == 0 and "0 blocks" in shrink.stdout, shrink.stderr
    assert shrunk["host_blocks"] == 0 and shrunk["pools"][0]["host_num_blocks"] == 0
    assert after_shrink["swap_outs"] == swapped["swap_outs"]
    assert after_shrink["preemptions"] > swapped["preemptions"]  # by recompute
    assert grow.returncode == 0, grow.stderr
    assert regrown["host_blocks"] == 5_000_000 // 65_536
    assert regrown["swap_outs"] > after_shrink["swap_outs"]
    assert "host swap" in text_stats.stdout and "HOST_USED" in text_stats.stdout
