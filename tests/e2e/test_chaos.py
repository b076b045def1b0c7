"""Chaos under load (issue 10): 32 concurrent greedy streams on a mesh of 2 workers
and 2 tokenizers while one service is killed -9, SIGSTOPped, or has a step that
never completes. Nothing may be lost: every stream completes with the text of an
undisturbed run, none hangs, the service is back within 5 s and no KV block leaks.
Killing the api ends its streams at once and leaves nothing running in the mesh.

The rounds are ``bench/chaos.py``'s (the script prints the same table); one mesh
serves the whole module, the undisturbed round first.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from bench.chaos import (
    ChaosMesh,
    Fault,
    RoundReport,
    check_kv,
    check_texts,
    format_table,
    prompts,
    run_round,
    started_mesh,
)
from tests.e2e.mesh import log_tail

pytestmark = pytest.mark.slow

STREAMS = 32
# Long enough that the fault (0.5 s after every stream has text) lands mid-stream
# on a quiet machine too.
MAX_TOKENS = 256
# The target for a killed service to serve again is 5 s. Children are
# forked from the supervisor's zygote (torch and the services already imported), so
# a restart is no longer mostly imports: this test measured 1.1-1.3 s for tokenizer,
# worker, kvcache and scheduler and 2.6 s for the api at 32 streams (load average
# 2-4; a fresh `python -m` worker took 6 s idle, 11-15 s under load). The limit
# leaves about 4 times the slowest for a CI machine shared with other suites: it
# fails on a service that does not come back, or on children spawned afresh again.
BACK_WITHIN_S = 10.0
# The worker is no slower to return than the rest since it no longer imports torch;
# the mesh serves on through the other worker meanwhile (the dead one's requests are
# requeued there within 3 beats).
WORKER_BACK_WITHIN_S = BACK_WITHIN_S
API_STREAMS_END_WITHIN_S = 1.0
API_MAX_TOKENS = 1536  # 32 of these take ~a minute here: a drain in seconds is an abort
API_DRAIN_SLACK_S = 3.0  # the abort's way to the scheduler and the next KV sync
STEP_TIMEOUT_S = 4.0
HEARTBEAT_S = 0.5  # ProcessConfig's default, which the mesh runs with


class Chaos:
    def __init__(self, mesh: ChaosMesh, stall_file: Path) -> None:
        self.mesh = mesh
        self.stall_file = stall_file
        self.texts = prompts(STREAMS)
        self.reference: list[str] = []

    def round(self, fault: Fault | None, max_tokens: int = MAX_TOKENS) -> RoundReport:
        report = anyio.run(self._round, fault, max_tokens)
        if self.reference and max_tokens == MAX_TOKENS:
            check_texts(report, self.reference)
        check_kv(self.mesh, report)
        self.mesh.wait_healthy()
        drained = report.drained_after_s
        print(f"{format_table([report]).splitlines()[-1]} drained after "
              f"{'-' if drained is None else f'{drained:.1f} s'}")  # shown with -s
        return report

    async def _round(self, fault: Fault | None, max_tokens: int) -> RoundReport:
        # kill_after 0.5 s, and never before every stream has shown text: the
        # fault lands mid-stream even on a fast machine.
        return await run_round(self.mesh, self.texts, max_tokens, fault=fault,
                               kill_after_s=0.5)

    def explain(self, report: RoundReport) -> str:
        errors = sorted({r.error for r in report.results if r.error})[:5]
        return (f"\n{format_table([report])}\nerrors: {errors}\npools: {report.kv_pools}\n"
                f"--- {self.mesh.log_path} ---\n{log_tail(self.mesh.log_path, 40)}")

    def kills(self, child: str) -> list[str]:
        """The supervisor's reasons for killing ``child`` as unresponsive."""
        reasons = []
        for line in self.mesh.log_path.read_text(errors="replace").splitlines():
            if '"child unresponsive; killing it"' in line:
                event = json.loads(line)
                if event.get("child") == child:
                    reasons.append(event["reason"])
        return reasons


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    tmp = tmp_path_factory.mktemp("chaos")
    stall_file = tmp / "stall-one-step"
    extra = ["--set", f"step_timeout_s={STEP_TIMEOUT_S}",
             "--set", f"fault_stall_file={stall_file}"]
    with started_mesh(workers=2, tokenizers=2, extra=extra, log_path=tmp / "mesh.log") as mesh:
        chaos = Chaos(mesh, stall_file)
        baseline = chaos.round(None)
        assert baseline.completed == STREAMS, chaos.explain(baseline)
        chaos.reference = [r.text for r in baseline.results]
        assert all(chaos.reference), "every undisturbed stream has text"
        yield chaos


def assert_nothing_lost(chaos: Chaos, report: RoundReport, back_within_s: float) -> None:
    why = chaos.explain(report)
    assert report.running_at_kill == STREAMS, f"the fault came too late to matter{why}"
    assert report.hung == 0, why
    assert report.completed == STREAMS, why
    assert report.differs == 0, f"a stream's text is not the undisturbed run's{why}"
    assert report.back_after_s is not None and report.back_after_s <= back_within_s, why
    assert report.leaked_blocks == 0 and report.leaked_requests == 0, why


@pytest.mark.parametrize("service", [
    "tokenizer",
    "worker",
    "kvcache",
    "scheduler",
])
def test_kill_9_under_load_loses_nothing(chaos: Chaos, service: str) -> None:
    report = chaos.round(Fault(service))
    assert_nothing_lost(chaos, report,
                        WORKER_BACK_WITHIN_S if service == "worker" else BACK_WITHIN_S)


def test_killing_the_api_ends_its_streams_at_once_and_leaves_nothing_running(
    chaos: Chaos,
) -> None:
    # Long requests: left running, they would hold the mesh for most of a minute.
    report = chaos.round(Fault("api"), max_tokens=API_MAX_TOKENS)
    why = chaos.explain(report)
    assert report.running_at_kill == STREAMS, why
    assert report.failed == STREAMS and report.hung == 0, why
    ended = report.failed_ended_after_s
    assert ended is not None and ended <= API_STREAMS_END_WITHIN_S, why
    assert report.back_after_s is not None and report.back_after_s <= BACK_WITHIN_S, why
    # The tokenizers abort every request of the dead api once its successor says
    # hello (an api that only missed beats may come back: its requests are kept);
    # the pools hold nothing soon after.
    assert report.leaked_blocks == 0 and report.leaked_requests == 0, why
    drained = report.drained_after_s
    assert drained is not None and drained <= report.back_after_s + API_DRAIN_SLACK_S, why


def test_a_sigstopped_worker_is_replaced_and_its_requests_complete(chaos: Chaos) -> None:
    report = chaos.round(Fault("worker", signal.SIGSTOP))
    # Killed for its silence (3 beats, seen at the next beat), then restarted.
    reasons = chaos.kills("worker/0")
    assert reasons and "missed heartbeats" in reasons[-1], chaos.explain(report)
    silent_s = float(reasons[-1].split("silent for ")[1].split(" s")[0])
    assert silent_s <= HEARTBEAT_S * 5, reasons
    assert_nothing_lost(chaos, report, WORKER_BACK_WITHIN_S + HEARTBEAT_S * 4)


def test_a_worker_whose_step_never_completes_is_replaced(chaos: Chaos) -> None:
    report = chaos.round(Fault("worker", stall_file=chaos.stall_file))
    assert not chaos.stall_file.exists(), "a worker's step took the fault"
    reasons = [r for w in ("worker/0", "worker/1") for r in chaos.kills(w)
               if "no progress" in r]
    assert reasons, chaos.explain(report)
    # Its heartbeats kept coming; the step's age crossed the timeout and the next
    # beat's check killed it.
    stalled_s = float(reasons[-1].split("one step has run ")[1].split(" s")[0])
    # (logged to 0.1 s: a step killed at 4.04 s of a 4 s timeout reads "4.0 s")
    assert STEP_TIMEOUT_S <= stalled_s <= STEP_TIMEOUT_S + HEARTBEAT_S * 3, reasons
    assert_nothing_lost(chaos, report, STEP_TIMEOUT_S + WORKER_BACK_WITHIN_S + HEARTBEAT_S * 4)
