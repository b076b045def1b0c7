"""The KV manager actor: a bound ROUTER in front of ``KvManager``."""

from __future__ import annotations

import anyio

from services.kvcache.block_pool import BlockPoolError
from services.kvcache.config import KvCacheConfig
from services.kvcache.manager import KvManager
from shared.config import load_config
from shared.endpoints import bind_router
from shared.logs import get_logger
from shared.mesh import PeerJoined, PeerLost, Received, RouterEndpoint
from shared.protocol.common import Rejected
from shared.protocol.kv import (
    KvDumpRequest,
    KvPoolClose,
    KvPoolOpen,
    KvSetHostSwap,
    KvStatsRequest,
    KvSync,
)
from shared.service import ServiceRuntime
from shared.telemetry import tracer

log = get_logger("meshserve.kvcache")
_tracer = tracer("meshserve.kvcache")

KvInbound = KvPoolOpen | KvPoolClose | KvSync | KvStatsRequest | KvDumpRequest | KvSetHostSwap


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(KvCacheConfig)
    manager = KvManager(host_swap_gb=config.host_swap_gb)
    router: RouterEndpoint[KvInbound] = bind_router(
        runtime, runtime.addresses.kvcache_addr, KvInbound
    )
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        runtime.ready = True
        async for event in router.inbox:
            match event:
                case Received(peer=peer, body=body, envelope=envelope):
                    assert peer is not None
                    if isinstance(body, KvSetHostSwap):
                        try:
                            stats, resizes = manager.set_host_swap(body)
                        except BlockPoolError as e:
                            await router.send(peer, Rejected(reason=str(e),
                                                             msg_id=envelope.msg_id))
                            continue
                        log.info("host swap resized", host_swap_gb=body.host_swap_gb)
                        for scheduler in router.peers_of("scheduler"):
                            for resize in resizes:
                                await router.send(scheduler, resize)
                        await router.send(peer, stats)
                        continue
                    try:
                        reply = _handle(manager, body, event)
                    except BlockPoolError as e:
                        router.rejections.record(envelope.sender, str(e))
                        await router.send(peer, Rejected(reason=str(e), msg_id=envelope.msg_id))
                        continue
                    if reply is not None:
                        await router.send(peer, reply)
                case PeerJoined(peer=peer):
                    log.info("peer joined", peer=peer.name)
                    if peer.hello.service == "scheduler":
                        _reconcile(manager, peer.hello.incarnation)
                case PeerLost(peer=peer, reason=reason):
                    log.info("peer lost", peer=peer.name, reason=reason)


def _reconcile(manager: KvManager, scheduler: str) -> None:
    """A scheduler incarnation spoke: the pools of a dead one are closed."""
    for pool_id, blocks in manager.reconcile(scheduler).items():
        log.warning("closed the pool of a dead scheduler incarnation", pool=pool_id,
                    released_blocks=blocks, scheduler=scheduler)


def _handle(manager: KvManager, body: KvInbound, event: Received[KvInbound]) -> object | None:
    match body:
        case KvSync():
            with _tracer.start_as_current_span("kvcache.sync", context=event.context) as span:
                span.set_attribute("meshserve.kv.pool", body.pool_id)
                return manager.sync(body)
        case KvPoolOpen():
            log.info("pool opened", pool=body.pool_id, blocks=body.num_blocks)
            _reconcile(manager, body.owner)
            return manager.open_pool(body)
        case KvPoolClose():
            log.info("pool closed", pool=body.pool_id)
            manager.close_pool(body)
            return None
        case KvStatsRequest():
            return manager.stats()
        case KvDumpRequest():
            return manager.dump(body)
        case _:
            return None
