"""The QUIC listener's UDP socket buffers: sized from the listener's `quic = {...}` options."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec
import pytest

from cloud_broker.config import ListenerConfig, QuicOptions
from cloud_broker.listeners.quic import QuicListener
from tests.integration.quic_support import make_pki, start_broker


def _kernel_cap(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


def _buffers(listener: QuicListener) -> tuple[int, int]:
    assert listener.server is not None and listener.server._transport is not None
    sock: socket.socket = listener.server._transport.get_extra_info("socket")
    level = socket.SOL_SOCKET
    return sock.getsockopt(level, socket.SO_RCVBUF), sock.getsockopt(level, socket.SO_SNDBUF)


@pytest.mark.parametrize("size_bytes", [4 << 20, 1 << 20])
async def test_the_quic_listener_asks_the_kernel_for_the_configured_socket_buffers(
        tmp_path: Path, size_bytes: int) -> None:
    pki = make_pki(tmp_path)
    running = await start_broker(pki, tls=False, socket_buffer_bytes=size_bytes)
    try:
        rcv, snd = _buffers(running.quic)
    finally:
        await running.close()
    # Linux doubles the request (bookkeeping) and caps it at [rw]mem_max; the default is ~208 KiB.
    assert rcv >= min(2 * size_bytes, 2 * _kernel_cap("rmem_max"))
    assert snd >= min(2 * size_bytes, 2 * _kernel_cap("wmem_max"))


def test_socket_buffer_bytes_is_a_quic_listener_option_and_is_validated() -> None:
    listener = msgspec.convert({"kind": "quic", "cert_file": "c.pem", "key_file": "k.pem",
                                "quic": {"socket_buffer_bytes": 8 << 20}}, ListenerConfig)
    assert listener.quic.socket_buffer_bytes == 8 << 20
    assert QuicOptions().socket_buffer_bytes == 4 << 20
    with pytest.raises(msgspec.ValidationError, match="socket_buffer_bytes"):
        msgspec.convert({"socket_buffer_bytes": -1}, QuicOptions)
