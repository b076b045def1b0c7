"""The zygote's protocol and its fork-safety rules: messages round-trip as one
tagged union, only ``python -m`` commands are forkable, the real preload list
(torch and every service) leaves the zygote single-threaded with no CUDA driver,
and a running thread makes a fork refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from services.supervisor.zygote_client import PRELOAD, module_command
from shared.protocol.zygote import (
    ChildExited,
    Forked,
    ForkFailed,
    ForkRequest,
    ZygoteReady,
    ZygoteReport,
)

ROOT = Path(__file__).resolve().parents[2]


def test_every_report_round_trips_through_the_tagged_union() -> None:
    decoder = msgspec.msgpack.Decoder(ZygoteReport)
    reports: list[ZygoteReport] = [
        ZygoteReady(pid=10, preloaded=["torch"], preload_s=2.5),
        Forked(request_id=1, pid=11),
        ForkFailed(request_id=2, error="zygote runs 2 threads"),
        ChildExited(pid=11, returncode=-9),
    ]
    for report in reports:
        assert decoder.decode(msgspec.msgpack.encode(report)) == report


def test_a_fork_request_carries_module_args_and_the_whole_environment() -> None:
    request = ForkRequest(request_id=3, module="services.worker", args=["--x"],
                          env={"MESHSERVE_REPLICA": "1", "PATH": "/bin"})
    decoded = msgspec.msgpack.Decoder(ForkRequest).decode(msgspec.msgpack.encode(request))
    assert decoded == request and decoded.cwd is None


def test_only_python_m_commands_of_this_interpreter_are_forkable() -> None:
    python = sys.executable
    assert module_command([python, "-m", "services.worker"]) == ("services.worker", [])
    assert module_command([python, "-m", "services.api", "--a", "b"]) == (
        "services.api", ["--a", "b"])
    assert module_command([python, "-c", "pass"]) is None
    assert module_command(["/usr/bin/python3", "-m", "services.worker"]) is None
    assert module_command([python, "-m"]) is None


PRELOAD_CHECK = r"""
import sys, threading
from services.supervisor.zygote import ForkUnsafe, check_fork_safe, preload
preload(sys.argv[1].split(","))
check_fork_safe()  # the real preload: torch and every service, no thread, no CUDA
stop = threading.Event()
thread = threading.Thread(target=stop.wait)
thread.start()
try:
    check_fork_safe()
except ForkUnsafe as e:
    print("refused:", e)
finally:
    stop.set()
    thread.join()
"""


def test_the_real_preload_leaves_the_zygote_fork_safe_and_a_thread_does_not() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD_CHECK, ",".join(PRELOAD)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: zygote runs 2 threads" in done.stdout
