"""The run dir: one mesh's sockets, its pid file and its detached log.

The supervisor holds an exclusive ``flock`` on the pid file for its whole life.
The kernel drops the lock when the process dies, however it dies, so a second
``meshserve up`` can tell a live mesh (lock held: refuse) from a stale run dir
(lock free: clean the leftovers and take over) without trusting a pid that may
have been reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
from pathlib import Path

from services.supervisor.mesh_plan import DETACHED_LOG, PID_FILE, socket_paths


class MeshAlreadyRunning(RuntimeError):
    def __init__(self, run_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another supervisor"
        super().__init__(
            f"a mesh is already running in {run_dir} ({who}); stop it with "
            f"`meshserve down --run-dir {run_dir}` or pass another --run-dir"
        )
        self.pid = pid


def pid_file(run_dir: Path) -> Path:
    return run_dir / PID_FILE


def log_file(run_dir: Path) -> Path:
    return run_dir / DETACHED_LOG


def prepare(run_dir: Path) -> None:
    """Create the run dir, private to this user (it holds control sockets)."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return int(text) if text.isdigit() else None


def _is_supervisor(pid: int) -> bool:
    """The process exists and is a meshserve supervisor (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return b"services.supervisor" in cmdline or b"meshserve" in cmdline


def running_pid(run_dir: Path) -> int | None:
    """The pid of the live supervisor of ``run_dir``, or None."""
    pid = _read_pid(pid_file(run_dir))
    if pid is None or not _is_supervisor(pid):
        return None
    return pid


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove socket files (not the log); returns what was removed."""
    removed = []
    for path in socket_paths(run_dir):
        # Not a file we can remove (a directory, say): binding it will fail with
        # an error that names the path, which says more than this one would.
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            path.unlink()
            removed.append(path)
    return removed


class RunDirLock:
    """Ownership of a run dir by one supervisor process."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = pid_file(run_dir)
        self._fd: int | None = None

    def acquire(self) -> list[Path]:
        """Take the run dir; raise MeshAlreadyRunning if a live mesh has it.
        Returns the stale socket files that were cleaned."""
        prepare(self.run_dir)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MeshAlreadyRunning(self.run_dir, _read_pid(self.path)) from None
            # The previous owner may have unlinked the file between our open and
            # our lock: then we hold a lock on a dead inode; start over.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        stale = remove_leftovers(self.run_dir)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return stale

    def release(self) -> None:
        """Idempotent: remove sockets and the pid file, then drop the lock."""
        if self._fd is None:
            return
        remove_leftovers(self.run_dir)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` (not our child) is gone; False on timeout.

    A pidfd becomes readable when the process exits: an event, not a poll.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def kill_and_wait(pid: int, timeout_s: float) -> bool:
    """SIGTERM, wait, then SIGKILL; True if the process is gone."""
    for signum, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return True
        if wait_for_exit(pid, wait_s):
            return True
    return False
