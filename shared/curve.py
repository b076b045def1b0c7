"""CURVE keys of one mesh, and how a socket uses them.

A mesh has two keypairs. Every binding socket (a singleton's ROUTER, the
supervisor's health and control sockets) is a CURVE server with the *server*
pair; every connecting socket (a replica's DEALER, the CLI) is a CURVE client
with the *client* pair and knows the server's public key. Binding processes
admit only the client public key (``shared/zap.py``), so a peer needs the mesh's
client secret to get a single frame through, and the server secret to pose as a
singleton.

The key dir (``MESHSERVE_CURVE_DIR``; ``meshserve keys`` or ``meshserve up``
makes it, 0700, files 0600) holds pyzmq's ZPL certificates::

    server.key_secret  server.key    client.key_secret  client.key

A process reads only the two ``*.key_secret`` files (each holds both halves of
its pair), which is what compose mounts as secrets.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from shared.logs import get_logger

log = get_logger("meshserve.curve")

SERVER = "server"
CLIENT = "client"
SECRET_SUFFIX = ".key_secret"
# Every binding socket names this ZAP domain, so libzmq always consults the
# process's ZAP handler (and ZAP_ENFORCE_DOMAIN would not change a thing).
ZAP_DOMAIN = b"meshserve"


class CurveKeyError(ValueError):
    """The key dir is missing, incomplete or unreadable; the message names the fix."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """Z85-encoded halves, as libzmq's socket options take them."""

    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class MeshKeys:
    """The mesh's server and client pairs; ``serve``/``connect`` set a socket up."""

    server: KeyPair
    client: KeyPair

    @property
    def allowed_clients(self) -> frozenset[bytes]:
        """Client public keys (raw 32 bytes, as ZAP presents them) a server admits."""
        return frozenset({zmq.utils.z85.decode(self.client.public)})

    def serve(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` a CURVE server (before it binds)."""
        socket.curve_secretkey = self.server.secret
        socket.curve_publickey = self.server.public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN

    def connect(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` a CURVE client of the mesh's servers (before it connects)."""
        socket.curve_secretkey = self.client.secret
        socket.curve_publickey = self.client.public
        socket.curve_serverkey = self.server.public


def secret_file(key_dir: Path, name: str) -> Path:
    return key_dir / f"{name}{SECRET_SUFFIX}"


def _load_pair(key_dir: Path, name: str) -> KeyPair:
    path = secret_file(key_dir, name)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise CurveKeyError(
            f"cannot read the mesh's {name} key {path}: {e.strerror or e}; create the keys "
            f"with `meshserve keys --dir {key_dir}`"
        ) from e
    except ValueError as e:
        raise CurveKeyError(f"{path} is not a CURVE certificate: {e}") from e
    if not secret:
        raise CurveKeyError(f"{path} holds no secret key; `meshserve keys` writes one")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Not fatal: a container's secret mount may come with a mode we cannot change.
        log.warning("secret key readable by others; chmod 600 it", path=str(path))
    return KeyPair(public, secret)


def load_keys(key_dir: Path) -> MeshKeys:
    """The mesh keys in ``key_dir``; CurveKeyError naming the fix if they are not there."""
    return MeshKeys(server=_load_pair(key_dir, SERVER), client=_load_pair(key_dir, CLIENT))


def has_keys(key_dir: Path) -> bool:
    return all(secret_file(key_dir, name).is_file() for name in (SERVER, CLIENT))


def create_keys(key_dir: Path, *, overwrite: bool = False) -> MeshKeys:
    """Write a new server and client pair into ``key_dir`` (made 0700, files 0600).

    Refuses to replace existing keys unless ``overwrite``: a running mesh keeps the
    keys it started with, and new ones would lock the CLI out of it."""
    existing = [secret_file(key_dir, n) for n in (SERVER, CLIENT)
                if secret_file(key_dir, n).exists()]
    if existing and not overwrite:
        raise CurveKeyError(
            f"{key_dir} already holds mesh keys ({', '.join(p.name for p in existing)}); "
            "pass --force to replace them"
        )
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)  # mkdir's mode does not apply to a dir that existed
    # Written aside, then renamed in (atomic): a CLI or a test reading the keys while
    # `up` creates them sees none or whole files, never a half-written one. The
    # staging dir is private, so the moment before chmod exposes nothing.
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=key_dir))
    try:
        for name in (SERVER, CLIENT):
            for path in zmq.auth.create_certificates(staging, name):
                os.chmod(path, 0o600)
        # Public halves first: a reader looks for the secret files.
        for path in sorted(staging.iterdir(), key=lambda p: p.name.endswith(SECRET_SUFFIX)):
            os.replace(path, key_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_keys(key_dir)


def ensure_keys(key_dir: Path) -> MeshKeys:
    """The keys in ``key_dir``, created first if there are none (``meshserve up``)."""
    if has_keys(key_dir):
        return load_keys(key_dir)
    log.info("creating mesh CURVE keys", key_dir=str(key_dir))
    return create_keys(key_dir, overwrite=True)
