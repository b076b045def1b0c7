from __future__ import annotations

import msgspec


class KvCacheConfig(msgspec.Struct, frozen=True):
    """KV manager settings (env MESHSERVE_<FIELD>)."""

    # Host swap space per worker, in GB (1e9 bytes); resizable at run time with
    # `meshserve kv set host-swap-gb N`.
    host_swap_gb: float = 1.0
