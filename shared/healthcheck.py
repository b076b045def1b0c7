"""Container healthcheck: exit 0 when this container's service reported itself
ready within the last ``MISSED_BEATS_DEAD`` heartbeats (see ProcessConfig.health_file)."""

from __future__ import annotations

import json
import sys
import time

from shared.config import MISSED_BEATS_DEAD, ProcessConfig, load_config


def check(path: str) -> str | None:
    """None when healthy, else why not."""
    try:
        state = json.loads(open(path).read())  # noqa: SIM115
    except (OSError, ValueError) as e:
        return f"no health report at {path}: {e}"
    age = time.time() - float(state["at"])
    if age > MISSED_BEATS_DEAD * float(state["heartbeat_s"]) + 1.0:
        return f"last health report is {age:.1f} s old"
    if not state["ready"]:
        return "the service reports it is not ready"
    return None


def main() -> None:
    process = load_config(ProcessConfig)
    if not process.health_file:
        sys.exit("MESHSERVE_HEALTH_FILE is not set")
    problem = check(process.health_file)
    if problem:
        sys.exit(problem)


if __name__ == "__main__":
    main()
