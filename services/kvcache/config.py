from __future__ import annotations

import msgspec


class KvCacheConfig(msgspec.Struct, frozen=True):
    """KV manager settings (env MESHSERVE_<FIELD>)."""

    block_size: int = 16
