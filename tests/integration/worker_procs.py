"""A real worker process, and the scheduler's side of its socket, for the worker's
message-level tests (tests/integration/test_worker_*.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import zmq.asyncio

from shared.mesh import Identity, Peer, PeerJoined, RouterEndpoint
from tests.integration.procs import mesh_addresses, read_log, running_service

START_TIMEOUT_S = 180.0  # importing torch and loading the model on a busy machine


@contextmanager
def running_worker(model_dir: Path, num_kv_blocks: int, block_size: int, prefix: str,
                   extra_env: Callable[[Path], Mapping[str, str]] | None = None,
                   ) -> Iterator[Path]:
    """A CPU worker process over ``model_dir``; yields the folder of its sockets and
    log. ``extra_env`` gives more settings, from that folder."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = {
        "MESHSERVE_MODEL": str(model_dir),
        "MESHSERVE_DEVICE": "cpu",
        "MESHSERVE_NUM_KV_BLOCKS": str(num_kv_blocks),
        "MESHSERVE_BLOCK_SIZE": str(block_size),
        "MESHSERVE_TORCH_THREADS": "1",
        **(extra_env(path) if extra_env is not None else {}),
    }
    try:
        with running_service("worker", path, env) as proc:
            yield path
            assert proc.poll() is None, read_log(path, "worker")[-4000:]
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def scheduler_router(worker_dir: Path,
                           body_type: Any) -> AsyncIterator[tuple[RouterEndpoint[Any], Peer]]:
    """The scheduler's bound router, once the worker in ``worker_dir`` joined it. A
    new ``Identity`` is a new incarnation: the worker treats it as a restart."""
    ctx = zmq.asyncio.Context()
    router: RouterEndpoint[Any] = RouterEndpoint(
        ctx, mesh_addresses(worker_dir).scheduler_addr, Identity("scheduler", 0), body_type,
        heartbeat_s=0.1)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            with anyio.fail_after(START_TIMEOUT_S):
                async for event in router.inbox:
                    if isinstance(event, PeerJoined):
                        break
            # The router answers the hello with a Welcome right after reporting the
            # join; let it go out before any plan, as a real scheduler would.
            await anyio.wait_all_tasks_blocked()
            yield router, event.peer
            tg.cancel_scope.cancel()
    finally:
        router.close()
        ctx.destroy(linger=0)
