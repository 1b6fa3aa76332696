"""`edge-hil bench card`: Modbus requests per A11 card, and RTU card time against the wire-time minimum.

Part 1 (TCP, no pacing): capture one default A11 card (200 points, 125 registers per request) and
count the requests; the minimum is the planner's optimum (2 header reads, 8 curve reads, 1 time
re-read = 11). Part 2 (RTU): a paced simulator on a socat pty pair at `--baud` (default 19200)
answers as fast as the wire allows; the card's wall time is compared with the sum over its requests
of (request + response bytes) * 11 / baud. The ratio is our overhead over the physics (target <= 1.15).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path

from drivers.modbus.card import capture_card
from drivers.modbus.client import ModbusClient, ModbusRtuClient, ModbusTcpClient
from drivers.modbus.config import ModbusDevice, Table
from drivers.modbus.wire import RTU_OVERHEAD_BYTES, wire_time_s
from hil.bench import result_line
from hil.pty import pty_pair
from hil.wellsite import Wellsite, agent_devices_for

REQUEST_PDU_BYTES = 5  # function, address, count
RESPONSE_HEADER_BYTES = 2  # function, byte count


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baud", type=int, default=19200, help="RTU line speed")
    p.add_argument("--cards", type=int, default=3, help="RTU cards to time (the median is reported)")
    p.add_argument("--n-points", type=int, default=200)


class RecordingReader:
    """A card reader over a client that performs each read and records it as (table, start, count)."""

    def __init__(self, client: ModbusClient, unit_id: int) -> None:
        self.client, self.unit_id = client, unit_id
        self.requests: list[tuple[Table, int, int]] = []

    @property
    def counts(self) -> list[int]:
        """The register count of each request, in order."""
        return [count for _, _, count in self.requests]

    async def __call__(self, table: Table, start: int, count: int) -> list[int]:
        self.requests.append((table, start, count))
        words = await self.client.read(table, start, count, unit_id=self.unit_id, timeout_s=5.0)
        return [int(w) for w in words]


def rtu_wire_s(counts: list[int], baud: int) -> float:
    """Wire time of read-holding-registers requests of these sizes and their responses on an RTU line."""
    n_bytes = sum(RTU_OVERHEAD_BYTES + REQUEST_PDU_BYTES + RTU_OVERHEAD_BYTES + RESPONSE_HEADER_BYTES + 2 * c
                  for c in counts)
    return wire_time_s(n_bytes, baud)


async def _time_rtu_cards(device: ModbusDevice, args: argparse.Namespace, times: list[float],
                          wire: list[float]) -> None:
    rtu = ModbusRtuClient(device.serial_port, baudrate=args.baud, parity=device.parity,
                          stopbits=device.stopbits, timeout_s=5.0)
    try:
        await rtu.connect()
        for k in range(args.cards):
            counting = RecordingReader(rtu, device.unit_id)
            t0 = time.perf_counter()
            card = await capture_card(counting, device, clock_ns=time.time_ns)
            times.append(time.perf_counter() - t0)
            wire.append(rtu_wire_s(counting.counts, args.baud))
            assert card is not None
            print(f"RTU card {k + 1}/{args.cards}: {times[-1]:.3f} s, wire minimum {wire[-1]:.3f} s, "
                  f"{len(counting.counts)} requests, quality {card.quality}", flush=True)
    finally:
        rtu.close()


async def main(args: argparse.Namespace) -> int:
    """Modbus requests per A11 card and RTU card time / wire-time minimum."""
    async with Wellsite(1, n_points=args.n_points) as site:
        (device,) = agent_devices_for(site)
        client = ModbusTcpClient(site.host, site.endpoints[0][2])
        reader = RecordingReader(client, 1)
        try:
            card = await capture_card(reader, device, clock_ns=time.time_ns)
        finally:
            client.close()
    assert card is not None
    spec = device.card
    assert spec is not None
    # Curves: read each curve's n points on its own, or span them all including the gaps between the
    # blocks, whichever needs fewer requests; plus 2 header reads and the acquisition-time re-read.
    per_read, n_curves = device.max_registers_per_read, len(spec.curves())
    spanning = (n_curves - 1) * spec.block_registers + args.n_points
    minimum = 2 + min(n_curves * math.ceil(args.n_points / per_read), math.ceil(spanning / per_read)) + 1
    print(f"card over TCP: {len(reader.counts)} requests {reader.counts} (minimum {minimum}), "
          f"quality {card.quality}", flush=True)

    times: list[float] = []
    wire: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-card-") as tmp:
        async with pty_pair(Path(tmp) / "sim", Path(tmp) / "agent") as pair, \
                Wellsite(1, transport="rtu", serial_port=str(pair.a), agent_serial_port=str(pair.b),
                         baudrate=args.baud, n_points=args.n_points) as site:
            await _time_rtu_cards(agent_devices_for(site)[0], args, times, wire)
    order = sorted(range(len(times)), key=lambda i: times[i])
    mid = order[len(order) // 2]
    print(result_line("card", requests=len(reader.counts), minimum=minimum, baud=args.baud,
                      card_s=times[mid], wire_min_s=wire[mid], time_ratio=times[mid] / wire[mid]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(argparse.Namespace(baud=19200, cards=3, n_points=200))))
