"""Disaggregated prefill and decode through the whole mesh: `--workers 2
--worker-roles prefill,decode` on the CPU with the embedded model. Every prompt is
computed on the prefill worker, its K/V travel to the decode worker over the KV
transfer engine, and the decode worker generates the rest: greedy output must stay
token-exact with transformers, and `meshserve kv stats` and /metrics must show the
hand-offs (transfers completed on both workers, bytes moved, none failed or left).
Then the decode worker is restarted while a round runs: the answers stay exact (its
requests are recomputed on the prefill worker) and no pool keeps a block."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import Mesh, start_mesh
from tests.e2e.test_kv_cache import metric, shared_prefix_prompts
from tests.e2e.test_routing import kv_stats, round_during
from tests.e2e.test_token_exact import complete_all, oracle

pytestmark = pytest.mark.slow

# Two prefixes (40 and 64 tokens, one not block aligned), three questions each: the
# second round of the same prompts also hits the prefill worker's prefix cache.
PROMPTS = shared_prefix_prompts()[:6]


def settled_stats(mesh: Mesh, deadline_s: float = 15.0) -> dict:
    """kv stats once no pool holds a request (the frees of the last steps reach the
    KV manager with the next sync), or at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        stats = kv_stats(mesh)
        if all(p["requests"] == 0 for p in stats["pools"]) or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def restart_decode_mid_round(mesh: Mesh) -> list[tuple[str, int, str]]:
    """A round during which the decode worker is restarted (SIGTERM, start again)."""
    return round_during(mesh, PROMPTS, "restart", "worker/1")


def test_prefill_worker_hands_off_to_decode_worker_token_exact(tmp_path: Path) -> None:
    expected = oracle(ensure_embedded_model(), PROMPTS)
    mesh = start_mesh(tmp_path, extra_args=["--workers", "2", "--worker-roles",
                                            "prefill,decode"])
    try:
        first = anyio.run(complete_all, mesh.base_url, PROMPTS)
        again = anyio.run(complete_all, mesh.base_url, PROMPTS)
        counts = settled_stats(mesh)
        restarted = restart_decode_mid_round(mesh)
        stats = settled_stats(mesh)
        text = mesh.cli("kv", "stats")
        moved = metric(mesh.base_url, "meshserve:worker_kv_transfer_bytes_total", at_least=1)
    finally:
        mesh.stop()
    assert first == expected
    assert again == expected
    assert restarted == expected
    workers = {w["worker"]: w for w in counts["workers"]}
    assert {w["role"] for w in workers.values()} == {"prefill", "decode"}
    prefill = next(w for w in workers.values() if w["role"] == "prefill")
    decode = next(w for w in workers.values() if w["role"] == "decode")
    # Every request was placed on the prefill worker and handed off once (the
    # completions run 24 tokens: none finishes with its first).
    assert prefill["requests_placed"] == 2 * len(PROMPTS) and decode["requests_placed"] == 0
    for w in (prefill, decode):
        assert w["transfers_completed"] == 2 * len(PROMPTS), w
        assert w["transfers_failed"] == w["transfers_in_flight"] == 0, w
        assert w["transfer_bytes"] > 0, w
    assert prefill["transfer_bytes"] == decode["transfer_bytes"]
    # The decode worker restarted while a round ran: its requests were recomputed on the
    # prefill worker (and decoded there or handed off again), and no block leaked.
    after = {w["worker"]: w for w in stats["workers"]}
    assert len(after) == 2 and after["worker/0"]["transfers_in_flight"] == 0
    assert text.returncode == 0 and "XFER" in text.stdout and "decode" in text.stdout
    assert moved > 0
    # Nothing leaked: no pool holds blocks for a request once all of them ended.
    assert [pool["requests"] for pool in counts["pools"]] == [0, 0], counts["pools"]
    assert [pool["requests"] for pool in stats["pools"]] == [0, 0], stats["pools"]
