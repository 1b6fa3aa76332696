"""Two throwaway network namespaces joined by a veth pair, with nftables drops, for HIL network faults.

Theory of operation. Some faults cannot be faked by a relay: "UDP is blocked, TCP is allowed" must be seen
by the real client's own sockets, as on a hotel or corporate network. Where we are root, `NetnsPair` creates
namespaces `<prefix>a` and `<prefix>b`, joins them with a veth pair carrying addresses from 198.18.0.0/15
(RFC 2544, reserved for network benchmark tests, so never a real peer), and runs processes inside them with
`ip netns exec`. `block()` installs nftables rules in one namespace (a table of our own, `inet fieldgate`),
`unblock()` removes them. Leaving the context deletes both namespaces, which also removes the veth pair and
every rule, and kills nothing but the processes this object started. Traffic never leaves our namespaces.

Requirements: root, iproute2 (`ip`), and nftables (`nft`) for the blocking part. `unavailable_reason()`
says what is missing so tests can skip with a clear message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

SUBNET_PREFIX = "198.18"  # RFC 2544 benchmark range: private to our namespaces
NFT_TABLE = "fieldgate"
Side = Literal["a", "b"]


def _binary(name: str) -> str | None:
    candidates = (f"/usr/sbin/{name}", f"/sbin/{name}")
    return shutil.which(name) or next((p for p in candidates if os.path.exists(p)), None)


def unavailable_reason(need_nft: bool = True) -> str | None:
    """Why NetnsPair cannot run here (not root, no `ip`, no `nft`), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _binary("ip") is None:
        return "iproute2 (ip) is not installed"
    if need_nft and _binary("nft") is None:
        return "nftables (nft) is not installed"
    return None


def _nft() -> str:
    return _binary("nft") or "nft"


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr. Not retryable."""


@dataclass
class NetnsPair:
    """Namespaces a and b joined by a veth pair; use as a context manager (`with NetnsPair() as net:`).

    index picks the /30 inside 198.18.0.0/16 and the names, so parallel rigs do not collide; the default
    derives it from the process id.
    """

    index: int = field(default_factory=lambda: os.getpid() % 16000)
    prefix: str = ""
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False, repr=False)
    _created: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < 16384:
            raise ValueError("index must be within 0..16383 (one /30 of 198.18.0.0/16 each)")
        self.prefix = self.prefix or f"fg{self.index}"
        if len(self.prefix) + 2 > 15:  # interface names are at most 15 characters
            raise ValueError("prefix too long for interface names")
        third, fourth = divmod(self.index * 4, 256)
        self.addresses: dict[Side, str] = {"a": f"{SUBNET_PREFIX}.{third}.{fourth + 1}",
                                           "b": f"{SUBNET_PREFIX}.{third}.{fourth + 2}"}

    def namespace(self, side: Side) -> str:
        return f"{self.prefix}{side}"

    def address(self, side: Side) -> str:
        """The veth address of a side; a process in the other namespace reaches this side there."""
        return self.addresses[side]

    # ---- lifecycle

    def __enter__(self) -> NetnsPair:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        reason = unavailable_reason(need_nft=False)
        if reason:
            raise NetnsError(reason)
        try:
            for side in ("a", "b"):
                self._ip("netns", "add", self.namespace(side))
                self._created.append(self.namespace(side))
            va, vb = f"{self.prefix}va", f"{self.prefix}vb"
            self._ip("link", "add", va, "netns", self.namespace("a"), "type", "veth", "peer", "name", vb,
                     "netns", self.namespace("b"))
            sides: tuple[tuple[Side, str], ...] = (("a", va), ("b", vb))
            for side, dev in sides:
                ns = self.namespace(side)
                self._ip("-n", ns, "addr", "add", f"{self.addresses[side]}/30", "dev", dev)
                self._ip("-n", ns, "link", "set", dev, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Stop our processes, then delete our namespaces (veth and nft rules go with them)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        while self._created:
            # deleting a namespace that is already gone is fine: the goal (no namespace) holds
            subprocess.run([_binary("ip") or "ip", "netns", "del", self._created.pop()],
                           capture_output=True, check=False)

    # ---- processes

    def exec_argv(self, side: Side, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside a side's namespace."""
        return [_binary("ip") or "ip", "netns", "exec", self.namespace(side), *argv]

    def run(self, side: Side, argv: Sequence[str], timeout_s: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run argv to completion inside a side's namespace."""
        done = subprocess.run(self.exec_argv(side, argv), capture_output=True, timeout=timeout_s, check=False)
        if check and done.returncode != 0:
            raise NetnsError(f"{list(argv)} in {self.namespace(side)} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        return done

    def popen(self, side: Side, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start argv inside a side's namespace; it is killed when the pair is destroyed."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.exec_argv(side, argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    # ---- nftables

    def block(self, side: Side, protocol: Literal["udp", "tcp", "all"] = "udp",
              port: int | None = None) -> None:
        """Drop inbound and outbound traffic of a protocol (optionally one port) in a side's namespace."""
        if _binary("nft") is None:
            raise NetnsError("nftables (nft) is not installed")
        if protocol == "all":
            match = ""
        else:
            match = f"meta l4proto {protocol} " + (f"th dport {port} " if port is not None else "")
        ruleset = (f"table inet {NFT_TABLE} {{\n"
                   f"  chain input {{ type filter hook input priority 0; policy accept; {match}drop; }}\n"
                   f"  chain output {{ type filter hook output priority 0; policy accept; {match}drop; }}\n"
                   "}\n")
        self.unblock(side)
        done = subprocess.run(self.exec_argv(side, [_nft(), "-f", "-"]), input=ruleset.encode(),
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise NetnsError(f"nft rules in {self.namespace(side)}: {done.stderr.decode(errors='replace')}")

    def unblock(self, side: Side) -> None:
        """Remove our nftables table from a side's namespace (no-op when absent)."""
        if _binary("nft") is None:
            return
        # "delete table" fails when the table is absent; that is the state we want, so the result is ignored
        subprocess.run(self.exec_argv(side, [_nft(), "delete", "table", "inet", NFT_TABLE]),
                       capture_output=True, check=False)

    def _ip(self, *args: str) -> None:
        done = subprocess.run([_binary("ip") or "ip", *args], capture_output=True, check=False)
        if done.returncode != 0:
            raise NetnsError(f"ip {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")


@contextlib.contextmanager
def netns_pair(index: int | None = None) -> Iterator[NetnsPair]:
    """`with netns_pair() as net:` — a NetnsPair created on entry and torn down on exit."""
    pair = NetnsPair() if index is None else NetnsPair(index=index)
    with pair:
        yield pair
