"""Loopback port helpers for rigs and tests: free ports, and waiting until our own server listens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time


def free_port(kind: str = "tcp", host: str = "127.0.0.1") -> int:
    """A port that is free on host right now for kind ("tcp" or "udp"); the caller binds it next."""
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_port_owner_pids(port: int) -> set[int]:
    """PIDs whose sockets listen on 127.0.0.1:port (via /proc), to check that a listener is ours."""
    inodes: set[str] = set()
    hexport = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if local.endswith(":" + hexport) and state == "0A":
                    inodes.add(inode)
    pids: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        pids.add(int(pid))
    return pids


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (an exited child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_tcp_listening(
    port: int, pid: int | None = None, timeout_s: float = 10.0, host: str = "127.0.0.1"
) -> None:
    """Block until host:port accepts connections; with pid, also check that this process owns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            pass
        else:
            if pid is None or pid in tcp_port_owner_pids(port):
                return
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(f"process {pid} exited before listening on {host}:{port}")
        if time.monotonic() > deadline:
            owner = tcp_port_owner_pids(port)
            raise TimeoutError(
                f"{host}:{port} not listening by pid {pid} after {timeout_s}s (owners: {owner})"
            )
        time.sleep(0.05)


async def async_wait_tcp_listening(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Async variant of wait_tcp_listening without the owner check (for in-process servers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not listening after {timeout_s}s") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
