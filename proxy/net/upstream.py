"""Opening connections to PostgreSQL: TCP, then the SSLRequest dance, then TLS.

libpq's sslmode semantics: `prefer` takes TLS when offered and plaintext
otherwise; `require` insists on TLS (and verifies the CA when ca_file is set,
as libpq does with a root certificate); `verify-full` also checks the host
name. The TLS decision is made on the raw socket before any protocol object
exists, so the session only ever sees a ready byte stream.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Literal, cast

from proxy.errors import UpstreamUnavailable
from proxy.settings import UpstreamSettings
from proxy.wire import frontend as fe

AsyncpgSsl = ssl.SSLContext | Literal["prefer", "require"] | bool


def asyncpg_ssl(up: UpstreamSettings) -> AsyncpgSsl:
    """upstream.tls as asyncpg's `ssl` argument (for the schema reader and the ledger)."""
    if up.tls == "disable":
        return False
    if up.tls == "prefer":
        return "prefer"
    return upstream_ssl_context(up) or "require"


def upstream_ssl_context(up: UpstreamSettings) -> ssl.SSLContext | None:
    if up.tls == "disable":
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if up.ca_file is not None:
        ctx.load_verify_locations(cafile=str(up.ca_file))
        ctx.check_hostname = up.tls == "verify-full"
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _tcp(up: UpstreamSettings) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise UpstreamUnavailable(f"cannot connect to {up.host}:{up.port}: {last}")


async def _negotiate_tls(sock: socket.socket, up: UpstreamSettings) -> bool:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, fe.encode_ssl_request())
    answer = await loop.sock_recv(sock, 1)
    if answer == b"S":
        return True
    if answer == b"N" and up.tls == "prefer":
        return False
    raise UpstreamUnavailable(f"upstream {up.host}:{up.port} does not offer TLS (tls: {up.tls})")


async def _open(
    up: UpstreamSettings, ctx: ssl.SSLContext | None, factory: Callable[[], asyncio.Protocol]
) -> asyncio.Transport:
    sock = await _tcp(up)
    try:
        use_tls = ctx is not None and await _negotiate_tls(sock, up)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            factory,
            sock=sock,
            ssl=ctx if use_tls else None,
            server_hostname=up.host if use_tls else None,
        )
    except BaseException:
        sock.close()
        raise
    return transport


async def open_upstream(
    up: UpstreamSettings, ctx: ssl.SSLContext | None, factory: Callable[[], asyncio.Protocol]
) -> asyncio.Transport:
    """Connect (with TLS as configured) and return the transport; raises UpstreamUnavailable."""
    try:
        return await asyncio.wait_for(_open(up, ctx, factory), up.connect_timeout_s)
    except TimeoutError:
        raise UpstreamUnavailable(f"timed out connecting to {up.host}:{up.port}") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamUnavailable(f"cannot connect to {up.host}:{up.port}: {exc}") from None


class _CancelSender(asyncio.Protocol):
    def __init__(self, packet: bytes) -> None:
        self._packet = packet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        out = cast(asyncio.WriteTransport, transport)
        out.write(self._packet)
        out.close()


async def send_cancel(
    up: UpstreamSettings, ctx: ssl.SSLContext | None, pid: int, secret: bytes
) -> None:
    """Forward a cancel to the upstream backend (pid, secret)."""
    packet = fe.encode_cancel(pid, secret)
    await open_upstream(up, ctx, lambda: _CancelSender(packet))
