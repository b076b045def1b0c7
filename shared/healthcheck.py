"""Container healthcheck: exit 0 when this container's service reported itself
ready within the last ``MISSED_BEATS_DEAD`` heartbeats (see ProcessConfig.health_file).

``python -m shared.healthcheck URL`` probes an HTTP endpoint instead (the api's
``/health/ready``, which also turns 503 while the api drains): exit 0 on a 2xx.

``python -m shared.healthcheck --live`` asks only that the report is fresh: the
process still heartbeats. A Kubernetes liveness probe uses it, so a replica whose
readiness waits for an api that is restarting is not restarted too."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

from shared.config import MISSED_BEATS_DEAD, ProcessConfig, load_config


def check(path: str, *, live: bool = False) -> str | None:
    """None when healthy (``live``: heartbeating, ready or not), else why not."""
    try:
        state = json.loads(open(path).read())  # noqa: SIM115
    except (OSError, ValueError) as e:
        return f"no health report at {path}: {e}"
    age = time.time() - float(state["at"])
    if age > MISSED_BEATS_DEAD * float(state["heartbeat_s"]) + 1.0:
        return f"last health report is {age:.1f} s old"
    if not live and not state["ready"]:
        return "the service reports it is not ready"
    return None


HTTP_TIMEOUT_S = 4.0  # below compose's healthcheck timeout (5 s)


def check_url(url: str) -> str | None:
    """None when ``url`` answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code}: {e.read(500).decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return f"{url} did not answer: {e}"
    return None if 200 <= status < 300 else f"{url} answered {status}"


def main() -> None:
    live = sys.argv[1:] == ["--live"]
    if len(sys.argv) > 1 and not live:
        problem = check_url(sys.argv[1])
        if problem:
            sys.exit(problem)
        return
    process = load_config(ProcessConfig)
    if not process.health_file:
        sys.exit("MESHSERVE_HEALTH_FILE is not set")
    problem = check(process.health_file, live=live)
    if problem:
        sys.exit(problem)


if __name__ == "__main__":
    main()
