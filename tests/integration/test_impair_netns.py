"""Network namespaces for HIL faults: a veth pair that carries traffic, nftables drops of UDP only, and
teardown that leaves nothing behind. Not a required test: without root, `ip` or `nft` it skips (also
under CI=true) with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hil.netns import NetnsPair, unavailable_reason

pytestmark = pytest.mark.integration

# a UDP and a TCP echo server in one process; prints "ready" once both are bound
SERVER = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((host, port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((host, port)); t.listen()
def udp():
    while True:
        data, addr = u.recvfrom(2048); u.sendto(data, addr)
def tcp():
    while True:
        c, _ = t.accept(); c.sendall(c.recv(2048)); c.close()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# asks both echoes once; prints "udp=ok|timeout tcp=ok|timeout"
CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1.0)
try:
    u.sendto(b"u", (host, port))  # an nftables drop in OUTPUT refuses locally with EPERM
    udp = "ok" if u.recvfrom(16)[0] == b"u" else "bad"
except OSError: udp = "timeout"
try:
    t = socket.create_connection((host, port), timeout=1.0); t.sendall(b"t")
    tcp = "ok" if t.recv(16) == b"t" else "bad"
except OSError: tcp = "timeout"
print(f"udp={udp} tcp={tcp}")
"""

PORT = 47000


def need(nft: bool) -> None:
    reason = unavailable_reason(need_nft=nft)
    if reason:
        pytest.skip(f"optional namespace test: {reason}")


def ask(net: NetnsPair) -> str:
    done = net.run("a", [sys.executable, "-c", CLIENT, net.address("b"), str(PORT)], timeout_s=20)
    return done.stdout.decode().strip()


def start_server(net: NetnsPair) -> None:
    proc = net.popen("b", [sys.executable, "-c", SERVER, net.address("b"), str(PORT)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout.decode()


def test_two_namespaces_talk_over_their_veth_pair_and_vanish_afterwards() -> None:
    need(nft=False)
    with NetnsPair() as net:
        assert net.address("a").startswith("198.18.") and net.address("b").startswith("198.18.")
        start_server(net)
        assert ask(net) == "udp=ok tcp=ok"
        names = namespaces()
        assert net.namespace("a") in names and net.namespace("b") in names
    names = namespaces()
    assert net.namespace("a") not in names and net.namespace("b") not in names


def test_blocking_udp_leaves_tcp_working_and_unblocking_restores_udp() -> None:
    need(nft=True)
    with NetnsPair() as net:
        start_server(net)
        net.block("a", "udp")
        assert ask(net) == "udp=timeout tcp=ok"
        net.unblock("a")
        assert ask(net) == "udp=ok tcp=ok"
