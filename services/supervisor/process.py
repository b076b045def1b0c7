"""How the supervisor starts a service process: its package's ``__main__``.

The process itself is started by ``shared.child_process.spawn_child`` (own process
group, killed by the kernel if the supervisor dies), the primitive the tts engine
pool uses too.
"""

from __future__ import annotations

import sys


def service_command(service: str) -> list[str]:
    """The argv of one ``service`` process."""
    return [sys.executable, "-m", f"services.{service}"]
