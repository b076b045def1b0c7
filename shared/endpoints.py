"""Endpoint factories: how an actor gets its sockets from its ``ServiceRuntime``.

Every actor wires its endpoints the same way: the process's ZMQ context and
identity, an address from ``MeshAddresses``, the heartbeat from ``ProcessConfig``
the process's CURVE keys (``runtime.auth``, when it has some) and, on a
dealer, a hello that reports the process's readiness and capacity. These
two functions are the one place that wiring is written; the socket rule (DESIGN.md)
stays visible at the call site: singletons ``bind_router``, replicas
``connect_dealer``.

    router: RouterEndpoint[KvInbound] = bind_router(runtime, runtime.addresses.kvcache_addr,
                                                    KvInbound)
    api: DealerEndpoint[FromApi] = connect_dealer(runtime, runtime.addresses.api_addr, FromApi)

Neither touches the network until its ``run`` is started in a task group: the
router binds there, the dealer connects and starts saying hello there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.mesh import DealerEndpoint, RouterEndpoint
from shared.protocol.common import Hello

if TYPE_CHECKING:
    from shared.service import ServiceRuntime


def bind_router(runtime: ServiceRuntime, address: str, body_type: Any) -> RouterEndpoint[Any]:
    """The ROUTER a singleton binds at ``address`` (when run), accepting
    ``body_type`` (a Struct or a union of tagged Structs) from its replicas."""
    return RouterEndpoint(
        runtime.zmq, address, runtime.identity, body_type,
        heartbeat_s=runtime.process.heartbeat_s,
        auth=runtime.auth,
    )


def connect_dealer(
    runtime: ServiceRuntime,
    address: str,
    body_type: Any,
    *,
    hello: Callable[[], Hello] | None = None,
) -> DealerEndpoint[Any]:
    """The DEALER a replica connects to the singleton at ``address`` (when run).

    Its hello, sent every beat, is ``runtime.hello()`` (the process's current
    ``ready`` and ``capacity``) unless ``hello`` builds another one (e.g. a worker
    announcing its KV geometry)."""
    return DealerEndpoint(
        runtime.zmq, address, runtime.identity, body_type,
        heartbeat_s=runtime.process.heartbeat_s,
        hello=hello or runtime.hello,
        auth=runtime.auth,
    )
