"""`edge-hil bench file`: a file over MQTT file transfer on a QUIC data stream vs raw aioquic, same run.

Ours: the cloud broker as its own process (`cloud-broker run`, QUIC listener, `[file_transfer]`
enabled, segments fsynced as in production unless `--no-fsync`) and, in this process, the agent's
real uploader (`agent.files.FileUploader`: outbox in SQLite, segments read and hashed on threads,
pipelined QoS 1 publishes, async fin answered on `$file-response/...`) running over a
`uplink.streams.DataStreamUplink` - a QUIC data stream beside an idle control stream. Timed from
the start of the upload (whole-file SHA-256 included) to the cloud's fin verdict (assembly, SHA-256
check and export included): what a user waits for.

Raw: the same stack without us - a bare aioquic client writes the same bytes on one stream to a bare
aioquic sink server (its own process, same certificate, same flow-control windows as our listener)
that answers when it has read them all. No MQTT, no TLS session reuse, nothing on disk. Two sinks:
  * stock: aioquic's own asyncio server, as anyone would write it (the issue's baseline);
  * batched: the same sink on the broker's batched UDP transport (cloud_broker.listeners.udp), i.e.
    the receive path our listener uses - what is left of the gap then is MQTT, file transfer and disk.

    bench file: size_mb=100 ours_mb_s=... raw_quic_mb_s=... ratio=... raw_batched_mb_s=... ratio_same_io=...

ratio = ours_mb_s / raw_quic_mb_s (target >= 0.7); ratio_same_io = ours_mb_s / raw_batched_mb_s. Each
round runs stock, batched, ours (`--rounds`); the line reports medians of the per-round ratios, every
round is printed too. The receiver is the bottleneck on this stack (its CPU is busy the whole transfer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hil.bench.uplink import BenchPki, make_bench_pki, start_broker_process
from hil.net import free_port

RAW_ALPN = "bench-raw"
MIB = 1 << 20


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=int, default=100, help="file size in MiB")
    parser.add_argument("--segment-kib", type=int, default=1000,
                        help="file-transfer segment size (the broker's 1 MiB packet limit bounds it)")
    parser.add_argument("--window", type=int, default=16, help="segments in flight (data stream window)")
    parser.add_argument("--rounds", type=int, default=3, help="raw/ours rounds (median ratio reported)")
    parser.add_argument("--no-fsync", action="store_true", help="broker does not fsync segments")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up on one transfer after this")


# ------------------------------------------------------------------------------ raw aioquic


def _raw_server_configuration(cert_file: str, key_file: str) -> Any:
    from aioquic.quic.configuration import QuicConfiguration

    # The flow-control windows our QUIC listener uses (cloud_broker.listeners.quic): same ceiling.
    configuration = QuicConfiguration(is_client=False, alpn_protocols=[RAW_ALPN], max_data=4 << 20)
    configuration.load_cert_chain(cert_file, key_file)
    return configuration


async def _raw_sink(port: int, cert_file: str, key_file: str, io: str) -> None:
    """Serve until killed: count the bytes of each client stream; at its FIN answer the count.

    io "stock": aioquic's own asyncio server (one datagram per wake-up, a transmit after each).
    io "batched": the same server on the broker's batched UDP transport
    (cloud_broker.listeners.udp), flushing once per receive batch as the broker's listener does."""
    import socket

    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.asyncio.server import QuicServer, serve
    from aioquic.quic import events

    from cloud_broker.listeners.udp import BatchedDatagramTransport

    touched: dict[Sink, None] = {}

    class Sink(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._counts: dict[int, int] = {}

        def quic_event_received(self, event: events.QuicEvent) -> None:
            if isinstance(event, events.StreamDataReceived):
                total = self._counts.get(event.stream_id, 0) + len(event.data)
                self._counts[event.stream_id] = total
                if event.end_stream:
                    self._quic.send_stream_data(event.stream_id, b"%d" % total, end_stream=True)
                    self.transmit()

    class BatchedSink(Sink):
        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
            self._process_events()
            touched[self] = None

    class BatchedServer(QuicServer):
        def batch_done(self) -> None:
            for protocol in list(touched):
                protocol.transmit()
            touched.clear()

    configuration = _raw_server_configuration(cert_file, key_file)
    if io == "batched":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", port))
        BatchedDatagramTransport(asyncio.get_running_loop(), sock,
                                 BatchedServer(configuration=configuration, create_protocol=BatchedSink))
    else:
        await serve("127.0.0.1", port, configuration=configuration, create_protocol=Sink)
    print("raw sink: listening", flush=True)
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def raw_sink_process(pki: BenchPki, io: str = "stock") -> AsyncIterator[int]:
    port = free_port("udp")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hil.bench.file", "--raw-sink", str(port), pki.cert_file, pki.key_file, io,
        stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20.0):
            line = await proc.stdout.readline()
        if not line.startswith(b"raw sink: listening"):
            raise RuntimeError(f"raw sink did not start: {line!r}")
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def raw_transfer_s(port: int, pki: BenchPki, data: bytes) -> float:
    """Seconds to move data over one aioquic stream (handshake excluded) until the sink confirms."""
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    configuration = QuicConfiguration(is_client=True, alpn_protocols=[RAW_ALPN], server_name="localhost")
    configuration.load_verify_locations(cafile=pki.ca_file)
    configuration.verify_mode = ssl.CERT_REQUIRED
    async with connect("127.0.0.1", port, configuration=configuration) as client:
        reader, writer = await client.create_stream()
        start = time.monotonic()
        # aioquic takes the whole buffer at once; congestion and flow control pace it out.
        writer.write(data)
        writer.write_eof()
        answer = await reader.read()
        elapsed = time.monotonic() - start
    if int(answer) != len(data):
        raise RuntimeError(f"raw sink counted {answer!r} bytes of {len(data)}")
    return elapsed


# ------------------------------------------------------------------------------ ours


async def ours_transfer_s(quic_port: int, pki: BenchPki, path: Path, work: Path, segment_bytes: int,
                          window: int, timeout_s: float, round_no: int) -> float:
    """Seconds for agent.files.FileUploader to get path confirmed over a QUIC data stream."""
    from agent.files.config import FilesSection
    from agent.files.uploader import FileUploader
    from uplink.client import Uplink, UplinkConfig
    from uplink.failover import FailoverConfig, FailoverTransportFactory
    from uplink.mqtt.stream_session import DataStreamConfig
    from uplink.quic import QuicSettings
    from uplink.streams import DataStreamUplink

    factory = FailoverTransportFactory(FailoverConfig(
        quic=QuicSettings(port=quic_port, ca_file=pki.ca_file), tcp_enabled=False))
    client_id = f"bench-file-{round_no}"
    uplink = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id=client_id, max_inflight=1000),
                    transport_factory=factory)
    data = DataStreamUplink(uplink, lambda: factory.quic_link, DataStreamConfig(max_inflight=window),
                            name="files")
    settings = FilesSection(segment_size_bytes=segment_bytes, max_inflight_segments=window)
    uploader = FileUploader(data, work / f"outbox-{round_no}.sqlite3", settings,
                            owner="bench", consume_inbound=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="bench-file-uplink")
        tg.create_task(data.run(), name="bench-file-stream")
        try:
            async with asyncio.timeout(timeout_s):
                await data.wait_connected()
                start = time.monotonic()
                outcome = await uploader.send(path, dispose="keep")
                elapsed = time.monotonic() - start
        finally:
            await uploader.close()
            await data.close()
            await uplink.close()
    if not outcome.ok:
        raise RuntimeError(f"upload failed: {outcome.error}")
    return elapsed


# ------------------------------------------------------------------------------ the run


async def main(args: argparse.Namespace) -> int:
    size = args.size_mb * MIB
    segment_bytes = args.segment_kib * 1024
    with tempfile.TemporaryDirectory(prefix="bench-file-") as tmp:
        work = Path(tmp)
        pki = make_bench_pki(work)
        payload = os.urandom(size)
        path = work / "payload.bin"
        await asyncio.to_thread(path.write_bytes, payload)
        fsync = "false" if args.no_fsync else "true"
        ratios: list[float] = []
        same_io: list[float] = []
        ours_all: list[float] = []
        raw_all: list[float] = []
        batched_all: list[float] = []
        async with (start_broker_process(
                pki, work, top_toml=f"data_dir = \"{work / 'broker'}\"\n",
                sections_toml=f"[file_transfer]\nenable = true\nfsync = {fsync}\n") as ports,
                raw_sink_process(pki, "stock") as raw_port,
                raw_sink_process(pki, "batched") as batched_port):
            for n in range(args.rounds):
                raw_s = await raw_transfer_s(raw_port, pki, payload)
                batched_s = await raw_transfer_s(batched_port, pki, payload)
                ours_s = await ours_transfer_s(ports.quic, pki, path, work, segment_bytes, args.window,
                                               args.timeout_s, n)
                raw_all.append(size / MIB / raw_s)
                batched_all.append(size / MIB / batched_s)
                ours_all.append(size / MIB / ours_s)
                ratios.append(raw_s / ours_s)
                same_io.append(batched_s / ours_s)
                print(f"bench file: round={n + 1} ours_s={ours_s:.2f} raw_quic_s={raw_s:.2f} "
                      f"raw_batched_s={batched_s:.2f} ratio={raw_s / ours_s:.2f} "
                      f"ratio_same_io={batched_s / ours_s:.2f}", flush=True)
        print(f"bench file: size_mb={args.size_mb} ours_mb_s={statistics.median(ours_all):.1f} "
              f"raw_quic_mb_s={statistics.median(raw_all):.1f} ratio={statistics.median(ratios):.2f} "
              f"raw_batched_mb_s={statistics.median(batched_all):.1f} "
              f"ratio_same_io={statistics.median(same_io):.2f} "
              f"segment_kib={args.segment_kib} window={args.window} fsync={fsync}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--raw-sink":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_raw_sink(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
        sys.exit(0)
    _parser = argparse.ArgumentParser(prog="bench-file")
    add_args(_parser)
    sys.exit(asyncio.run(main(_parser.parse_args())))
