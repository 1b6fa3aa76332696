"""`edge-hil bench uplink`: drain a telemetry backlog over a lossy long link, MQTT over QUIC vs over TLS.

Our cloud broker runs as its own process on 127.0.0.1 with QUIC and TLS listeners. In this process
the impairment proxy (`hil.impair`, a UDP relay for QUIC and a TCP relay for TLS) gives both links
the same round-trip time and the same loss, and an Uplink drains the backlog through each: QoS 1
publishes of `--message-kib` each, pipelined up to the broker's Receive Maximum, timed from the
first publish to the last PUBACK. Per loss level, side by side in one run:

    bench uplink: loss_pct=5 rtt_ms=100 backlog_mb=20.0 quic_s=... tcp_s=... ratio=...

ratio = quic_s / tcp_s (target <= 0.7 at 5 % loss). One run of all four levels at the issue's 20 MB
takes about 1.5 minutes on two cores, so 20 MB is the default (`--backlog-mb` scales it).

Fairness, honestly: the TCP relay terminates TCP on both sides, so a "lost" segment costs TCP a
retransmission timeout plus head-of-line blocking (see `hil.impair`) but never the congestion-window
collapse of real TCP; TCP fares better here than on a real radio link. Its throughput is bounded by
the relay's per-connection buffer over the RTT (about 4.7 MB/s at 100 ms), which is why TLS is on
par with or ahead of QUIC at 0 % loss. aioquic is CPU-bound at roughly 10-15 MB/s per connection
(client, proxy and the broker's aioquic share two cores here).

What made QUIC slow and noisy (instrumented: aioquic's recovery state sampled every second, UDP
RcvbufErrors from /proc/net/snmp): not PTO backoff, flow control (aioquic doubles its windows) or
ACK frequency, but real drops in the kernel - a cwnd-sized burst reaching a busy event loop
overflows a UDP socket's default ~208 KiB receive buffer (~90 datagrams; 400-1700 drops per 20 MB
run at 0 % loss). The RTT had risen meanwhile, so the loss-tolerant controller rightly took them for
congestion and - with Reno's one-MSS-per-RTT regrowth - spent the rest of the drain near 2.5 MB/s.
Fixes: the uplink's controller regrows as CUBIC does, our client asks for 4 MiB socket buffers
(`QuicSettings.socket_buffer_bytes`), and the broker's QUIC listener socket needs the same (a
cloud_broker change: with it, 0 % loss drops to ~3 s for 20 MB with no receive-buffer errors).
`start_broker_process` and `make_bench_pki` are shared with `hil.bench.handover`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hil.impair import ImpairmentProxy, Profile, lossy
from hil.net import free_port
from uplink.client import Transport, Uplink, UplinkConfig
from uplink.quic import QuicSettings, open_quic
from uplink.tcp import client_ssl_context, open_tcp

DEFAULT_LOSS_PCTS = (0.0, 1.0, 5.0, 10.0)
TransportFactory = Callable[[UplinkConfig], Awaitable[Transport]]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backlog-mb", type=float, default=20.0,
                        help="backlog to drain per transport and loss level (issue figure: 20)")
    parser.add_argument("--message-kib", type=int, default=8, help="payload per QoS 1 publish")
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="round-trip time added by the proxy")
    parser.add_argument("--loss", type=float, nargs="+", default=list(DEFAULT_LOSS_PCTS),
                        metavar="PCT", help="loss levels (per direction), in percent")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up on one drain after this")
    parser.add_argument("--seed", type=int, default=1, help="proxy loss seed")


# ------------------------------------------------------------------------------ shared rig pieces


@dataclass(frozen=True)
class BenchPki:
    ca_file: str
    cert_file: str
    key_file: str


def make_bench_pki(directory: Path) -> BenchPki:
    """A throwaway CA and a broker certificate for 127.0.0.1/localhost (TLS and QUIC verify it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    before, after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(before).not_valid_after(after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(before).not_valid_after(after)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "broker.pem").write_bytes(cert.public_bytes(pem))
    (directory / "broker.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return BenchPki(str(directory / "ca.pem"), str(directory / "broker.pem"), str(directory / "broker.key"))


@dataclass(frozen=True)
class BrokerPorts:
    tcp: int
    tls: int
    quic: int
    process: asyncio.subprocess.Process | None = None

    def terminate(self) -> None:
        """SIGTERM the broker process (it disconnects its clients and exits)."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()


@contextlib.asynccontextmanager
async def start_broker_process(pki: BenchPki, directory: Path, *, top_toml: str = "",
                               sections_toml: str = "") -> AsyncIterator[BrokerPorts]:
    """`cloud-broker run` with TCP, TLS and QUIC listeners on free 127.0.0.1 ports, until exit.

    top_toml goes before the listener tables (top-level keys: data_dir), sections_toml after them."""
    tcp, tls, quic = free_port("tcp"), free_port("tcp"), free_port("udp")
    config = directory / "broker.toml"
    config.write_text(
        "allow_anonymous = true\nlog_level = \"warning\"\n" + top_toml +
        f"[[listeners]]\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {tcp}\n"
        f"[[listeners]]\nkind = \"tls\"\nhost = \"127.0.0.1\"\nport = {tls}\n"
        f"cert_file = \"{pki.cert_file}\"\nkey_file = \"{pki.key_file}\"\n"
        f"[[listeners]]\nkind = \"quic\"\nhost = \"127.0.0.1\"\nport = {quic}\n"
        f"cert_file = \"{pki.cert_file}\"\nkey_file = \"{pki.key_file}\"\n" + sections_toml)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloud_broker.cli", "run", "--config", str(config),
        stdout=subprocess.PIPE, stderr=None)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20.0):
            for _ in range(3):
                line = (await proc.stdout.readline()).decode()
                if not line.startswith("cloud-broker: listening"):
                    raise RuntimeError(f"broker did not start: {line!r}")
        yield BrokerPorts(tcp, tls, quic, proc)
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def quic_factory(pki: BenchPki, port: int, **settings: object) -> TransportFactory:
    quic = QuicSettings(port=port, ca_file=pki.ca_file, **settings)  # type: ignore[arg-type]

    async def factory(config: UplinkConfig) -> Transport:
        link = await open_quic(config.host, quic, keep_alive_s=config.keep_alive_s,
                               connect_timeout_s=config.connect_timeout_s)
        return link.control

    return factory


def tls_factory(pki: BenchPki, port: int) -> TransportFactory:
    context = client_ssl_context(pki.ca_file)

    async def factory(config: UplinkConfig) -> Transport:
        return await open_tcp(config.host, port, context, config.connect_timeout_s)

    return factory


# ------------------------------------------------------------------------------ the drain


async def drain(factory: TransportFactory, client_id: str, messages: int, payload: bytes,
                timeout_s: float) -> float:
    """Seconds from the first publish to the last PUBACK for `messages` QoS 1 publishes."""
    uplink = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id=client_id, clean_start=True,
                                 reconnect_initial_s=0.1, reconnect_max_s=1.0, connect_timeout_s=10.0),
                    transport_factory=factory)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(uplink.run(), name=f"bench-{client_id}")
        try:
            async with asyncio.timeout(timeout_s):
                await uplink.wait_connected()
                start = time.monotonic()
                codes = await asyncio.gather(*(uplink.publish(f"backlog/{client_id}", payload)
                                               for _ in range(messages)))
                elapsed = time.monotonic() - start
        finally:
            await uplink.close()
            runner.cancel()
    if any(code >= 0x80 for code in codes):
        raise RuntimeError(f"{client_id}: the broker refused some publishes")
    return elapsed


async def one_level(pki: BenchPki, ports: BrokerPorts, profile: Profile, seed: int, messages: int,
                    payload: bytes, timeout_s: float) -> tuple[float | None, float | None]:
    results: list[float | None] = []
    for kind in ("quic", "tcp"):
        upstream = ("127.0.0.1", ports.quic if kind == "quic" else ports.tls)
        async with ImpairmentProxy(upstream, kind="udp" if kind == "quic" else "tcp", profile=profile,
                                   seed=seed) as proxy:
            factory = quic_factory(pki, proxy.port) if kind == "quic" else tls_factory(pki, proxy.port)
            try:
                results.append(await drain(factory, f"bench-{kind}", messages, payload, timeout_s))
            except TimeoutError:
                results.append(None)
    return results[0], results[1]


async def main(args: argparse.Namespace) -> int:
    payload = bytes(range(256)) * (args.message_kib * 4)
    messages = max(1, int(args.backlog_mb * 1024 * 1024 / len(payload)))
    backlog_mb = messages * len(payload) / (1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
        directory = Path(tmp)
        pki = make_bench_pki(directory)
        async with start_broker_process(pki, directory) as ports:
            for loss_pct in args.loss:
                profile = lossy(loss_pct, args.rtt_ms)
                quic_s, tcp_s = await one_level(pki, ports, profile, args.seed, messages, payload,
                                                args.timeout_s)
                ratio = (f"{quic_s / tcp_s:.2f}" if quic_s is not None and tcp_s is not None
                         else "n/a")
                q = f"{quic_s:.2f}" if quic_s is not None else f">{args.timeout_s:.0f}"
                t = f"{tcp_s:.2f}" if tcp_s is not None else f">{args.timeout_s:.0f}"
                print(f"bench uplink: loss_pct={loss_pct:g} rtt_ms={args.rtt_ms:g} "
                      f"backlog_mb={backlog_mb:.1f} quic_s={q} tcp_s={t} ratio={ratio}", flush=True)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="bench-uplink")
    add_args(_parser)
    sys.exit(asyncio.run(main(_parser.parse_args())))
