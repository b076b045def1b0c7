"""A tts process keeps its engines' sockets in /tmp/ms-tts-<pid>-*; one that was
killed cannot remove its folder, so the next tts sweeps folders of dead pids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.tts.service import sweep_dead_workdirs


def test_folders_of_dead_tts_processes_are_swept(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    dead = tmp_path / f"ms-tts-{child.pid}-abc"
    live = tmp_path / f"ms-tts-{os.getpid()}-def"
    old_style = tmp_path / "ms-tts-4z1h5ab1"  # no pid in the name: not ours to judge
    for folder in (dead, live, old_style):
        folder.mkdir()
        (folder / "engine-0-1.sock").touch()
    assert sweep_dead_workdirs(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and old_style.exists()
