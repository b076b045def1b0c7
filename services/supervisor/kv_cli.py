"""`meshserve kv ...`: KV debugging utilities against a running mesh.

    meshserve kv stats [--json]            usage per pool, cached blocks, hit rate,
                                           evictions, preemptions, host usage, swaps;
                                           per worker: queue, running, hit rate, routing
    meshserve kv dump REQUEST_ID [--json]  block table: ids, hashes, ref counts, tier
    meshserve kv set host-swap-gb N        resize every worker's host swap space now
    meshserve kv set routing MODE          place new requests by prefix | least-loaded |
                                           round-robin from now on

The CLI joins the mesh briefly as a ``cli`` replica: it says hello to the KV
manager (and, for stats, the scheduler, which owns the hit and preemption
counters), asks, and leaves. No torch import here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio
import msgspec
import zmq.asyncio

from services.supervisor.control import mesh_keys
from services.supervisor.mesh_plan import mesh_addresses
from shared.curve import CurveKeyError
from shared.mesh import DealerEndpoint, Identity, Received, UpstreamJoined
from shared.mesh_auth import MeshAuth
from shared.protocol.common import Rejected
from shared.protocol.generation import SchedulerStatus, SetRouting, WorkerStatus
from shared.protocol.kv import KvDump, KvDumpRequest, KvSetHostSwap, KvStats, KvStatsRequest

ASK_TIMEOUT_S = 10.0


class KvCliError(Exception):
    pass


def add_parser(commands: argparse._SubParsersAction, add_run_dir) -> None:  # type: ignore[type-arg,no-untyped-def]
    kv = commands.add_parser("kv", help="KV cache statistics and request dumps")
    sub = kv.add_subparsers(dest="kv_command", required=True, metavar="KV_COMMAND")
    stats = sub.add_parser("stats", help="usage, cached blocks, hit rate, evictions, preemptions")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_dir(stats)
    dump = sub.add_parser("dump", help="one request's block table")
    dump.add_argument("request_id", metavar="REQUEST_ID")
    dump.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_dir(dump)
    setting = sub.add_parser("set", help="change a KV setting of the running mesh")
    setting.add_argument("setting", choices=["host-swap-gb", "routing"])
    setting.add_argument("value", metavar="VALUE")
    add_run_dir(setting)


async def _ask(address: str, question: object, answer_type: type,
               auth: MeshAuth | None = None) -> object:
    ctx = zmq.asyncio.Context()
    endpoint: DealerEndpoint = DealerEndpoint(
        ctx, address, Identity("cli", os.getpid()), answer_type | Rejected, heartbeat_s=0.5,
        auth=auth)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(endpoint.run)
            with anyio.fail_after(ASK_TIMEOUT_S):
                async for event in endpoint.inbox:
                    if isinstance(event, UpstreamJoined):
                        await endpoint.send(question)
                    elif isinstance(event, Received):
                        if isinstance(event.body, Rejected):
                            raise KvCliError(f"{address} refused: {event.body.reason}")
                        tg.cancel_scope.cancel()
                        return event.body
    except TimeoutError as e:
        raise KvCliError(f"no answer from {address} within {ASK_TIMEOUT_S:g} s") from e
    finally:
        endpoint.close()
        ctx.destroy(linger=0)
    raise KvCliError(f"{address} closed")


def _auth(run_dir: Path) -> MeshAuth:
    """The CLI joins the mesh as a CURVE client with the mesh's keys."""
    try:
        return MeshAuth(mesh_keys(run_dir), "cli")
    except CurveKeyError as e:
        raise KvCliError(str(e)) from e


def _stats(run_dir: Path, as_json: bool) -> None:
    addresses = mesh_addresses(run_dir)
    auth = _auth(run_dir)

    async def both() -> tuple[KvStats, SchedulerStatus]:
        kv = await _ask(addresses.kvcache_addr, KvStatsRequest(), KvStats, auth)
        scheduler = await _ask(addresses.scheduler_addr, KvStatsRequest(), SchedulerStatus,
                               auth)
        assert isinstance(kv, KvStats) and isinstance(scheduler, SchedulerStatus)
        return kv, scheduler

    kv, scheduler = anyio.run(both)
    queries = scheduler.prefix_cache_queries
    hit_rate = scheduler.prefix_cache_hits / queries if queries else 0.0
    if as_json:
        print(msgspec.json.encode({
            "pools": kv.pools, "kv_cache_usage_perc": scheduler.kv_usage,
            "prefix_cache_queries": queries, "prefix_cache_hits": scheduler.prefix_cache_hits,
            "prefix_cache_hit_rate": hit_rate, "preemptions": scheduler.num_preemptions,
            "host_blocks": scheduler.host_kv_blocks,
            "host_used_blocks": scheduler.host_kv_used_blocks,
            "swap_outs": scheduler.num_swap_outs, "swap_ins": scheduler.num_swap_ins,
            "swapped_out_blocks": scheduler.swapped_out_blocks,
            "swapped_in_blocks": scheduler.swapped_in_blocks,
            "swap_fallbacks": scheduler.swap_fallbacks,
            "fork_shared_blocks": scheduler.fork_shared_blocks,
            "cow_block_copies": scheduler.cow_block_copies,
            "routing": scheduler.routing,
            "workers": [msgspec.structs.asdict(w) | {"prefix_cache_hit_rate": _hit_rate(w)}
                        for w in scheduler.per_worker],
        }).decode())
        return
    print(f"kv usage {scheduler.kv_usage:.1%}  prefix cache hit rate {hit_rate:.1%} "
          f"({scheduler.prefix_cache_hits}/{queries} tokens)  preemptions "
          f"{scheduler.num_preemptions}  forks: {scheduler.fork_shared_blocks} blocks shared, "
          f"{scheduler.cow_block_copies} copied")
    print(f"host swap {scheduler.host_kv_used_blocks}/{scheduler.host_kv_blocks} blocks  "
          f"swaps: {scheduler.num_swap_outs} out ({scheduler.swapped_out_blocks} blocks), "
          f"{scheduler.num_swap_ins} in ({scheduler.swapped_in_blocks} blocks), "
          f"{scheduler.swap_fallbacks} sent to recompute by a shrink")
    rows = [("POOL", "BLOCKS", "USED", "LEASED", "FREE", "CACHED", "EVICTIONS", "REQUESTS",
             "HOST", "HOST_USED")]
    for p in kv.pools:
        rows.append((p.pool_id, str(p.num_blocks), str(p.used_blocks), str(p.leased_blocks),
                     str(p.free_blocks), str(p.cached_blocks), str(p.evictions),
                     str(p.requests), str(p.host_num_blocks), str(p.host_used_blocks)))
    _print_table(rows)
    print(f"routing {scheduler.routing or '-'}")
    # XFER: prefill/decode hand-offs it sent or received, in flight/completed/failed.
    worker_rows = [("WORKER", "ROLE", "WAITING", "RUNNING", "HIT_RATE", "HIT_TOKENS", "PLACED",
                    "REBALANCED_IN", "KV_USAGE", "XFER", "XFER_BYTES")]
    for w in scheduler.per_worker:
        hits = f"{w.prefix_cache_hits}/{w.prefix_cache_queries}"
        worker_rows.append((w.worker, w.role, str(w.waiting), str(w.running),
                            f"{_hit_rate(w):.1%}", hits,
                            str(w.requests_placed), str(w.rebalanced_in), f"{w.kv_usage:.1%}",
                            f"{w.transfers_in_flight}/{w.transfers_completed}/{w.transfers_failed}",
                            str(w.transfer_bytes)))
    _print_table(worker_rows)


def _hit_rate(worker: WorkerStatus) -> float:
    queries = worker.prefix_cache_queries
    return worker.prefix_cache_hits / queries if queries else 0.0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _dump(run_dir: Path, request_id: str, as_json: bool) -> None:
    answer = anyio.run(_ask, mesh_addresses(run_dir).kvcache_addr,
                       KvDumpRequest(request_id), KvDump, _auth(run_dir))
    assert isinstance(answer, KvDump)
    if as_json:
        print(msgspec.json.encode(answer).decode())
        return
    if not answer.pool_id:
        raise KvCliError(f"no KV pool holds request {request_id!r}")
    print(f"request {request_id}  pool {answer.pool_id}  {len(answer.blocks)} blocks")
    print("INDEX  BLOCK  REFS  TIER    HASH")
    for i, row in enumerate(answer.blocks):
        block_hash = f"{row.block_hash & (2**64 - 1):016x}" if row.block_hash is not None else "-"
        print(f"{i:<5}  {row.block_id:<5}  {row.ref_count:<4}  {row.tier:<6}  {block_hash}")


def _set(run_dir: Path, setting: str, text: str) -> None:
    if setting == "routing":
        status = anyio.run(_ask, mesh_addresses(run_dir).scheduler_addr, SetRouting(text),
                           SchedulerStatus, _auth(run_dir))
        assert isinstance(status, SchedulerStatus)
        print(f"routing {status.routing} ({status.workers} workers)")
        return
    assert setting == "host-swap-gb"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise KvCliError(f"host-swap-gb must be a number >= 0, got {text}")
    answer = anyio.run(_ask, mesh_addresses(run_dir).kvcache_addr,
                       KvSetHostSwap(host_swap_gb=value), KvStats, _auth(run_dir))
    assert isinstance(answer, KvStats)
    for p in answer.pools:
        print(f"{p.pool_id}: host swap {value:g} GB = {p.host_num_blocks} blocks "
              f"({p.host_used_blocks} in use)")


def main(args: argparse.Namespace, run_dir: Path) -> int:
    try:
        if args.kv_command == "stats":
            _stats(run_dir, args.json)
        elif args.kv_command == "dump":
            _dump(run_dir, args.request_id, args.json)
        elif args.kv_command == "set":
            _set(run_dir, args.setting, args.value)
    except KvCliError as e:
        print(f"meshserve: {e}", file=sys.stderr)
        return 1
    return 0
