"""``python -m shared.healthcheck``: readiness (compose, k8s readiness probes) and
``--live`` (k8s liveness probes: heartbeating is enough)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def probe(health_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHSERVE_HEALTH_FILE": str(health_file)}
    return subprocess.run([sys.executable, "-m", "shared.healthcheck", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def report(path: Path, *, ready: bool, age_s: float) -> None:
    path.write_text(json.dumps({"ready": ready, "at": time.time() - age_s, "heartbeat_s": 0.5}))


@pytest.mark.parametrize(("ready", "age_s", "ready_code", "live_code"), [
    (True, 0.0, 0, 0),
    (False, 0.0, 1, 0),  # heartbeating, waiting for a peer: alive, not ready
    (True, 60.0, 1, 1),  # stale: the process is stuck or gone
])
def test_ready_and_live(tmp_path: Path, ready: bool, age_s: float, ready_code: int,
                        live_code: int) -> None:
    path = tmp_path / "health.json"
    report(path, ready=ready, age_s=age_s)
    assert probe(path).returncode == ready_code
    assert probe(path, "--live").returncode == live_code


def test_no_report_is_neither(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    for args in ((), ("--live",)):
        done = probe(missing, *args)
        assert done.returncode == 1 and "no health report" in done.stderr
