"""When to restart a child and when to give up: OTP's one_for_one rules, pure.

Two independent limits, both driven by explicit timestamps so tests need no clock:

- ``Backoff`` (per child): a crashing child waits 0.1 s, then 0.2 s, 0.4 s, ...
  capped at 5 s before its next start. A child that stayed healthy for 10 s has
  proved itself, and its next crash starts over at 0.1 s.
- Restart intensity (per service, a ``shared.child_process.RestartWindow``): more
  than 5 restarts of one service within 30 s means restarting does not help (a bad
  model path, a port in use); the supervisor must give up loudly instead of
  flapping forever.

``RestartPolicy`` combines them into one decision per exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.child_process import RestartWindow


class Backoff:
    """Exponential delay before restarting one child."""

    def __init__(self, initial_s: float = 0.1, maximum_s: float = 5.0, reset_after_s: float = 10.0):
        assert 0 < initial_s <= maximum_s, "backoff must start positive and below its cap"
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.reset_after_s = reset_after_s
        self._next_s = initial_s

    def next_delay(self) -> float:
        """The delay to wait now; the one after it doubles (up to the cap)."""
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.maximum_s)
        return delay

    def observe_healthy(self, healthy_for_s: float) -> None:
        """Report how long the child has been healthy without interruption."""
        if healthy_for_s >= self.reset_after_s:
            self._next_s = self.initial_s

    @property
    def pending_s(self) -> float:
        """What ``next_delay`` would return, without advancing."""
        return self._next_s


@dataclass(frozen=True, slots=True)
class Restart:
    """Restart the child after ``delay_s``."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop the mesh: ``service`` restarted too often."""

    service: str
    reason: str


Decision = Restart | GiveUp


@dataclass(slots=True)
class RestartPolicy:
    """Per-child backoff and per-service intensity, decided on each child exit.

    Children are keyed by ``(service, replica)``. Operator restarts (``meshserve
    restart``) and deliberate stops never go through here: only unplanned exits
    and kills for missed heartbeats count against the intensity.
    """

    max_restarts: int = 5
    period_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    backoff_reset_s: float = 10.0
    _backoffs: dict[tuple[str, int], Backoff] = field(default_factory=dict)
    _intensity: dict[str, RestartWindow] = field(default_factory=dict)

    def backoff(self, service: str, replica: int) -> Backoff:
        key = (service, replica)
        if key not in self._backoffs:
            self._backoffs[key] = Backoff(
                self.backoff_initial_s, self.backoff_max_s, self.backoff_reset_s
            )
        return self._backoffs[key]

    def on_exit(self, service: str, replica: int, now: float) -> Decision:
        """A child of ``service`` ended unexpectedly at ``now``: restart or give up."""
        intensity = self._intensity.setdefault(
            service, RestartWindow(self.max_restarts, self.period_s)
        )
        if not intensity.record(now):
            return GiveUp(
                service,
                f"{service} restarted more than {self.max_restarts} times "
                f"in {self.period_s:g} s; giving up",
            )
        return Restart(self.backoff(service, replica).next_delay())

    def on_healthy(self, service: str, replica: int, healthy_for_s: float) -> None:
        self.backoff(service, replica).observe_healthy(healthy_for_s)

    def forget(self, service: str, replica: int) -> None:
        """A replica was scaled away; a future replica with its id starts fresh."""
        self._backoffs.pop((service, replica), None)
