"""A service stand-in the zygote tests fork: ``python -m tests.integration.zygote_probe
REPORT_FILE exit N | sleep``. It writes what a process can see about how it was
started (pid, parent, group, session, argv, environment, stdin, __name__), and an
atexit hook appends a marker, which only a normal interpreter shutdown runs."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path


def _report(path: Path) -> None:
    facts = {
        "name": __name__,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "argv": sys.argv[1:],
        "env": dict(os.environ),
        "stdin": os.readlink("/proc/self/fd/0"),
        "cwd": os.getcwd(),
    }
    path.write_text(json.dumps(facts))


def main() -> None:
    report = Path(sys.argv[1])
    atexit.register(lambda: report.with_suffix(".atexit").write_text("ran"))
    _report(report)
    if sys.argv[2] == "exit":
        sys.exit(int(sys.argv[3]))
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
