"""Per-worker queues and placement through the whole mesh: greedy output stays
token-exact with transformers for every routing mode, with 2 CPU workers and, after
`meshserve scale worker=3` at run time, with 3, and while `scale worker=2` takes a
worker away in the middle of a round. One mesh: the mode is switched with
`meshserve kv set routing MODE` between rounds (the same prompts each round, so
later rounds also run on prefix hits); `meshserve kv stats` and /metrics show where
requests went."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import anyio
import pytest

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import Mesh, start_mesh
from tests.e2e.test_kv_cache import metric, shared_prefix_prompts
from tests.e2e.test_token_exact import complete_all, oracle

pytestmark = pytest.mark.slow

MODES = ("prefix", "round-robin", "least-loaded")
# Two prefixes (40 and 64 tokens), three questions each.
PROMPTS = shared_prefix_prompts()[:6]


def kv_stats(mesh: Mesh) -> dict:
    done = mesh.cli("kv", "stats", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for_workers(mesh: Mesh, count: int, deadline_s: float = 120) -> dict:
    """kv stats once the scheduler knows ``count`` workers (a scaled one says hello
    after its model loaded)."""
    deadline = time.monotonic() + deadline_s
    while True:
        stats = kv_stats(mesh)
        if len(stats["workers"]) == count or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def run_modes(mesh: Mesh) -> dict[str, tuple[list[tuple[str, int, str]], dict[str, int]]]:
    """Per mode: the answers, and the requests placed on each worker in that round."""
    rounds = {}
    placed = {w["worker"]: w["requests_placed"] for w in kv_stats(mesh)["workers"]}
    for mode in MODES:
        switched = mesh.cli("kv", "set", "routing", mode)
        assert switched.returncode == 0, switched.stderr
        assert f"routing {mode}" in switched.stdout
        answers = anyio.run(complete_all, mesh.base_url, PROMPTS)
        after = {w["worker"]: w["requests_placed"] for w in kv_stats(mesh)["workers"]}
        rounds[mode] = answers, {w: n - placed.get(w, 0) for w, n in after.items()}
        placed = after
    return rounds


def round_during(mesh: Mesh, prompts: list[list[int]],
                 *command: str) -> list[tuple[str, int, str]]:
    """One round of ``prompts`` while ``meshserve COMMAND`` runs (a scale, a restart)."""
    answers: list[list[tuple[str, int, str]]] = []
    client = threading.Thread(
        target=lambda: answers.append(anyio.run(complete_all, mesh.base_url, prompts)))
    client.start()
    try:
        done = mesh.cli(*command, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        client.join(timeout=300)
    assert answers, "the round did not finish"
    return answers[0]


def scale_down_mid_round(mesh: Mesh) -> list[tuple[str, int, str]]:
    """A round-robin round (every worker gets requests) during which the mesh scales
    to 2 workers: the leaving worker's queued and running requests are re-placed."""
    assert mesh.cli("kv", "set", "routing", "round-robin").returncode == 0
    answers = round_during(mesh, PROMPTS, "scale", "worker=2")
    assert len(wait_for_workers(mesh, 2)["workers"]) == 2
    return answers


def test_every_routing_mode_is_token_exact_with_two_and_three_workers(
        tmp_path: Path) -> None:
    expected = oracle(ensure_embedded_model(), PROMPTS)
    mesh = start_mesh(tmp_path, extra_args=["--workers", "2", "--routing", "prefix"])
    try:
        two = run_modes(mesh)
        refused = mesh.cli("kv", "set", "routing", "random")
        text_stats = mesh.cli("kv", "stats")
        scaled = mesh.cli("scale", "worker=3", timeout=180)
        assert scaled.returncode == 0, scaled.stderr
        assert len(wait_for_workers(mesh, 3)["workers"]) == 3
        three = run_modes(mesh)
        shrunk = scale_down_mid_round(mesh)
        placed_series = metric(mesh.base_url, "meshserve:worker_requests_placed_total")
        final = kv_stats(mesh)
    finally:
        mesh.stop()
    for workers, rounds in ((2, two), (3, three)):
        for mode, (answers, placed) in rounds.items():
            assert answers == expected, (workers, mode)
            assert sum(placed.values()) == len(PROMPTS), (workers, mode, placed)
        # Round-robin spreads one round's six requests over every worker evenly.
        assert set(rounds["round-robin"][1].values()) == {len(PROMPTS) // workers}, rounds
    # Prefix routing on a cold mesh keeps each prefix's questions together: one
    # prefix per worker. With 3 workers, both prefixes are cached on the first two
    # (earlier rounds): the joined worker, cold, gets none while loads are even.
    assert sorted(two["prefix"][1].values()) == [3, 3], two["prefix"]
    (joined,) = set(three["prefix"][1]) - set(two["prefix"][1])
    assert three["prefix"][1][joined] == 0, three["prefix"]
    assert shrunk == expected
    assert refused.returncode == 1 and "routing must be one of" in refused.stderr
    assert text_stats.returncode == 0 and "WORKER" in text_stats.stdout
    assert "HIT_RATE" in text_stats.stdout
    assert placed_series >= 0
    assert final["routing"] == "round-robin"
    # Per worker: the two left (the third's counters went with it).
    hits = [w["prefix_cache_hits"] for w in final["workers"]]
    assert len(hits) == 2 and 0 < sum(hits) <= final["prefix_cache_hits"]
