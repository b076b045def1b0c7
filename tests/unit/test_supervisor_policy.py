"""The supervisor's pure rules: backoff, restart intensity, child health and
liveness. Time is passed in, so these need no clock and no processes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.supervisor.children import Child, ChildState
from services.supervisor.restart_policy import (
    Backoff,
    GiveUp,
    Restart,
    RestartPolicy,
)
from shared.child_process import RestartWindow

BEAT = 0.5


def test_backoff_doubles_from_a_tenth_to_five_seconds() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_backoff_resets_only_after_ten_healthy_seconds() -> None:
    backoff = Backoff()
    for _ in range(4):
        backoff.next_delay()
    backoff.observe_healthy(9.9)
    assert backoff.pending_s == 1.6
    backoff.observe_healthy(10.0)
    assert backoff.next_delay() == 0.1


@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=40))
def test_intensity_allows_at_most_five_within_any_thirty_seconds(gaps: list[float]) -> None:
    intensity = RestartWindow(max_restarts=5, period_s=30.0)
    now, accepted = 0.0, []
    for gap in gaps:
        now += gap
        if intensity.record(now):
            accepted.append(now)
        else:
            # Refused exactly when this restart would be the sixth in the window.
            window = [t for t in accepted if now - t <= 30.0]
            assert len(window) >= 5
            return
    for t in accepted:
        assert sum(1 for u in accepted if t <= u <= t + 30.0) <= 5


def test_sixth_restart_within_the_window_gives_up_naming_the_service() -> None:
    policy = RestartPolicy()
    decisions = [policy.on_exit("worker", 0, now=float(i)) for i in range(6)]
    assert all(isinstance(d, Restart) for d in decisions[:5])
    assert [d.delay_s for d in decisions[:5]] == [0.1, 0.2, 0.4, 0.8, 1.6]  # type: ignore[union-attr]
    last = decisions[5]
    assert isinstance(last, GiveUp) and last.service == "worker"
    assert "worker" in last.reason and "giving up" in last.reason


def test_restarts_spread_over_time_never_give_up() -> None:
    policy = RestartPolicy()
    for i in range(20):
        assert isinstance(policy.on_exit("tokenizer", 0, now=i * 7.0), Restart)


def test_intensity_is_per_service_and_backoff_per_replica() -> None:
    policy = RestartPolicy(max_restarts=2)
    assert policy.on_exit("tokenizer", 0, 0.0) == Restart(0.1)
    assert policy.on_exit("tokenizer", 1, 0.1) == Restart(0.1)  # its own backoff
    assert policy.on_exit("worker", 0, 0.2) == Restart(0.1)  # its own intensity
    assert isinstance(policy.on_exit("tokenizer", 0, 0.3), GiveUp)


def test_a_scaled_away_replica_id_starts_with_a_fresh_backoff() -> None:
    policy = RestartPolicy()
    policy.on_exit("worker", 1, 0.0)
    policy.on_exit("worker", 1, 1.0)
    policy.forget("worker", 1)
    assert policy.on_exit("worker", 1, 100.0) == Restart(0.1)


def test_child_is_healthy_only_with_a_recent_ready_hello() -> None:
    child = Child("worker", 0)
    child.spawned(pid=42, now=0.0)
    assert child.state is ChildState.STARTING and not child.healthy(0.0, BEAT)
    child.heard(ready=False, at=1.0)
    assert child.state is ChildState.STARTING and not child.healthy(1.0, BEAT)
    child.heard(ready=True, at=2.0)
    assert child.state is ChildState.RUNNING and child.healthy(2.0, BEAT)
    assert child.healthy(3.5, BEAT)  # three beats
    assert not child.healthy(3.6, BEAT)


def test_health_duration_tracks_uninterrupted_health() -> None:
    child = Child("tokenizer", 0)
    child.spawned(pid=7, now=0.0)
    child.heard(ready=True, at=1.0)
    assert child.update_health(1.0, BEAT) == 0.0
    child.heard(ready=True, at=5.0)
    assert child.update_health(5.0, BEAT) == 4.0
    child.heard(ready=False, at=5.5)
    assert child.update_health(5.5, BEAT) == 0.0
    child.heard(ready=True, at=6.0)
    assert child.update_health(6.0, BEAT) == 0.0


def test_liveness_silent_after_hello_or_no_hello_at_all() -> None:
    child = Child("api", 0)
    child.spawned(pid=9, now=0.0)
    assert child.liveness_problem(100.0, BEAT, hello_timeout_s=120.0) is None
    assert "no hello within 120 s" in (child.liveness_problem(121.0, BEAT, 120.0) or "")
    child.heard(ready=False, at=2.0)
    assert child.liveness_problem(3.5, BEAT, 120.0) is None
    assert "missed heartbeats" in (child.liveness_problem(3.6, BEAT, 120.0) or "")
    child.stopping = True  # a child being stopped is not "unresponsive"
    assert child.liveness_problem(10.0, BEAT, 120.0) is None


def test_liveness_a_step_that_runs_past_the_step_timeout_while_beating() -> None:
    child = Child("worker", 0)
    child.spawned(pid=9, now=0.0)
    child.heard(ready=True, at=1.0, busy_s=2.9)
    assert child.liveness_problem(1.2, BEAT, 120.0, step_timeout_s=3.0) is None
    child.heard(ready=True, at=1.5, busy_s=3.4)  # it beats, but the same step runs on
    problem = child.liveness_problem(1.6, BEAT, 120.0, step_timeout_s=3.0) or ""
    assert "one step has run 3.4 s" in problem
    assert child.liveness_problem(1.6, BEAT, 120.0, step_timeout_s=0.0) is None  # no limit
    child.heard(ready=True, at=2.0, busy_s=0.0)  # the step came back: fine again
    assert child.liveness_problem(2.1, BEAT, 120.0, step_timeout_s=3.0) is None
    child.exited()
    child.spawned(pid=10, now=3.0)  # a new process starts with no busy time
    assert child.busy_s == 0.0


def test_a_restart_forgets_the_previous_process_hellos() -> None:
    child = Child("worker", 0)
    child.spawned(pid=1, now=0.0)
    child.heard(ready=True, at=1.0)
    child.exited()
    assert not child.healthy(1.0, BEAT) and child.status(1.0, BEAT).pid is None
    child.heard(ready=True, at=1.1)  # a late hello of the dead process: ignored
    assert child.last_hello_at == 1.0
    child.spawned(pid=2, now=2.0)
    assert child.last_hello_at is None and child.liveness_problem(10.0, BEAT, 120.0) is None
    status = child.status(3.0, BEAT)
    assert (status.pid, status.state, status.healthy) == (2, "starting", False)
    assert status.uptime_s == 1.0
