"""The zygote: a fork server that imports torch and the services once, then forks a
ready-made child per request from the supervisor (Android's zygote, Python's
``multiprocessing`` forkserver with preload).

    python -m services.supervisor.zygote --fd N --preload torch,services.worker.service,...

A fresh ``python -m services.worker`` spends seconds importing torch before it can
load a model; a child forked from here starts with every preloaded module in place
(shared copy-on-write with the zygote), which is what brings a killed worker back
within the issue's 5 s.

A forked child does what ``shared.child_process.spawn_child`` gives a spawned one:
its own process group, ``PR_SET_PDEATHSIG=SIGKILL`` (tied to this zygote, which has
it tied to the supervisor, so a SIGKILLed supervisor takes both down), stdin from
/dev/null, stdout/stderr inherited (the supervisor's), exactly the requested
environment; then it runs the module as ``__main__`` and exits through the normal
interpreter shutdown (threads joined, atexit handlers, stdio flushed).

Fork safety: forking copies only the calling thread, so the zygote forks only while
it is the single thread of its process (checked before every fork) and while no
CUDA driver is loaded (checked after preloading; the child initialises CUDA itself).
The zygote reaps its children and reports each exit code to the supervisor.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback

import msgspec

from shared.protocol.zygote import (
    MAX_PACKET,
    ChildExited,
    Forked,
    ForkFailed,
    ForkRequest,
    ZygoteReady,
    ZygoteReport,
)

PR_SET_PDEATHSIG = 1
# A child that cannot be made into a proper service process exits with this.
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


def thread_count() -> int:
    """Threads of this process as the kernel sees them (native ones included)."""
    return len(os.listdir("/proc/self/task"))


def cuda_driver_loaded() -> bool:
    """True once libcuda is mapped: CUDA state does not survive a fork."""
    with open("/proc/self/maps") as maps:
        return any("libcuda.so" in line for line in maps)


class ForkUnsafe(RuntimeError):
    """The zygote's process is in a state a fork must not copy."""


def check_fork_safe() -> None:
    threads = thread_count()
    if threads != 1:
        raise ForkUnsafe(f"zygote runs {threads} threads; a fork would copy their locks")
    if cuda_driver_loaded():
        raise ForkUnsafe("the CUDA driver is loaded in the zygote; forked children cannot use it")


def preload(modules: list[str]) -> None:
    """Import ``modules`` and check the process can still fork safely."""
    # OpenBLAS (numpy's, imported by torch) starts its thread pool as it loads; one
    # thread keeps the zygote single-threaded. The mesh uses numpy only for audio
    # resampling, so its children lose no BLAS parallelism that matters.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    for name in modules:
        importlib.import_module(name)
    check_fork_safe()


class Zygote:
    """The serving loop: fork requests in, ``Forked``/``ChildExited`` reports out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self._decoder = msgspec.msgpack.Decoder(ForkRequest)
        self._encoder = msgspec.msgpack.Encoder()
        # SIGCHLD wakes the select loop through this pipe (Python's wakeup fd).
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)

    def report(self, message: ZygoteReport, fds: list[int] | None = None) -> None:
        data = self._encoder.encode(message)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def serve(self) -> ForkRequest | None:
        """Serve until the supervisor closes its end (None). Returns the request
        in a forked child, which then becomes that service."""
        while True:
            readable, _, _ = select.select([self.sock, self._wakeup_r], [], [])
            if self._wakeup_r in readable:
                self._drain_wakeups()
                self._reap()
            if self.sock in readable:
                data = self.sock.recv(MAX_PACKET)
                if not data:
                    return None
                request = self._decode(data)
                if request is not None and self._fork(request) == 0:
                    return request

    def _decode(self, data: bytes) -> ForkRequest | None:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as e:
            # A private socket, but a bad packet still must not end the zygote.
            print(f"zygote: rejected a malformed request: {e}", file=sys.stderr, flush=True)
            self.report(ForkFailed(request_id=-1, error=f"malformed request: {e}"))
            return None

    def _fork(self, request: ForkRequest) -> int | None:
        """Fork one child; 0 in the child, its pid (or None) in the zygote."""
        try:
            check_fork_safe()
            pid = os.fork()
        except (ForkUnsafe, OSError) as e:
            self.report(ForkFailed(request_id=request.request_id, error=str(e)))
            return None
        if pid == 0:
            self._become_child(request)
            return 0
        # Also set here, so the group exists whichever of the two runs first.
        # (An error means the child got there first or already exited: both fine.)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        # The zygote reaps the child, so it cannot be recycled before this pidfd exists.
        pidfd = os.pidfd_open(pid)
        try:
            self.report(Forked(request_id=request.request_id, pid=pid), [pidfd])
        finally:
            os.close(pidfd)
        return pid

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.report(ChildExited(pid=pid, returncode=os.waitstatus_to_exitcode(status)))

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def _become_child(self, request: ForkRequest) -> None:
        """In the forked child: shed the zygote, take on a spawned child's traits."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self.sock.close()
            os.setpgid(0, 0)
            if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            # The zygote may have died between fork and prctl; then no signal comes.
            if os.getppid() != self.pid:
                os._exit(SETUP_FAILED)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.environ.clear()
            os.environ.update(request.env)
            if request.cwd is not None:
                os.chdir(request.cwd)
        except BaseException:
            traceback.print_exc()
            os._exit(SETUP_FAILED)


def run_as_main(request: ForkRequest) -> None:
    """What ``python -m <module> <args>`` does, in this already-started interpreter."""
    sys.argv = [request.module, *request.args]
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.supervisor.zygote")
    parser.add_argument("--fd", type=int, required=True, help="the supervisor's socket")
    parser.add_argument("--preload", default="", help="modules to import, comma-separated")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    modules = [m for m in args.preload.split(",") if m]
    started = time.monotonic()
    preload(modules)
    zygote = Zygote(sock)
    zygote.report(ZygoteReady(pid=os.getpid(), preloaded=modules,
                              preload_s=round(time.monotonic() - started, 3)))
    request = zygote.serve()
    if request is None:
        return  # the supervisor closed its end: the mesh is stopping
    del zygote
    # Only a forked child gets here; from now on it is that service's process.
    run_as_main(request)


if __name__ == "__main__":
    main()
