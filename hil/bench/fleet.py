"""`edge-hil bench fleet`: agent CPU, memory and latency acquiring a wellsite fleet into the durable queue.

Two cases, each with the simulator and the agent in separate child processes so the agent's own CPU
time and peak RSS are measured (getrusage of the agent process, its SQLite writer thread included):
  * fleet:  `--wells` (833) A11 wells over Modbus TCP, a port per well; scalars every
            `--scalar-interval-s` (10 s); cards every 10 minutes compressed `--speedup` times
            (default 30: a card per well every 20 s) for `--duration-s`;
  * stress: `--stress-wells` (100) wells whose RTUs publish a new card every second, polled for all
            829 values (28 scalars + acquisition time + 4 x 200 points) every second.
The agent side is the real pipeline: ModbusDriver -> agent.pipeline.Pipeline ->
store_forward AsyncQueue(SqliteQueue). Reported per case: values acquired and committed, agent CPU ms
per 1,000 committed values (target <= 2), CPU share of one core, peak RSS (target <= 80 MB),
poll-to-commit latency p50/p99 per record (from the reading's timestamp to the commit returning;
target p50 <= 100 ms), values lost (acquired but not committed; target 0), and for the stress case the
share of the scheduled values actually acquired (a bus that cannot keep up skips polls; a card holds
28 scalars + 4 x 200 curve points, or 2 x 200 for the fifth of the wells without a power meter) and
the simulator's CPU share (whether the simulator, not the agent, is the limit).

The floor (fleet case, unless `--skip-floor`): while the agent runs, a bare client in its own process,
against its own simulator, sends the very same requests on the same schedule (the agent's read plan,
the card's request sequence recorded from one capture, `drivers.scheduling.Schedule` phases) on the
same event loop, and does only what any Python Modbus/TCP client must: frame, send, receive, unpack
the registers. No decoding into points, no pipeline, no store. `ratio_to_floor` = agent CPU per request
/ floor CPU per request, measured side by side: it says how much our acquisition costs above the least
a Python process on this machine can spend on the same bus traffic, and unlike the absolute figure it
does not move with the shared machine's load. The agent's CPU is also
split by thread (event loop vs the store's writer), and BAD readings are counted by reason. `--loop` picks
the agent child's event loop as `edge-agent run --loop` does: auto (the default, like the agent's) is uvloop
when it is installed, else asyncio; the simulator always runs on asyncio, so the loops compare on the same
load.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from agent.pipeline import Pipeline
from agent.runtime import settle_gc
from drivers.base import CardReading, Quality, Reading
from drivers.modbus.card import capture_card
from drivers.modbus.client import ModbusTcpClient
from drivers.modbus.config import A11_CARD_SCALARS, ModbusDevice, Table
from drivers.modbus.driver import CARD_JOB, ModbusDriver
from drivers.scheduling import Schedule
from hil.bench import result_line
from hil.bench.card import RecordingReader
from hil.cards import well_profile
from hil.wellsite import Endpoint, Wellsite, agent_devices_for
from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord
from store_forward.sqlite import SqliteQueue

SIM_SEED = 1
CHILD_TIMEOUT_S = 600.0
LOOPS = ("auto", "asyncio", "uvloop")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wells", type=int, default=833)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--scalar-interval-s", type=float, default=10.0)
    p.add_argument("--speedup", type=float, default=30.0, help="compress the 10-minute card interval")
    p.add_argument("--stress-wells", type=int, default=100)
    p.add_argument("--stress-duration-s", type=float, default=30.0)
    p.add_argument("--skip-fleet", action="store_true")
    p.add_argument("--skip-stress", action="store_true")
    p.add_argument("--skip-floor", action="store_true",
                   help="fleet case without the bare client measured side by side (no ratio_to_floor)")
    p.add_argument("--profile", metavar="PREFIX", default="",
                   help="cProfile each case's agent into PREFIX.fleet and PREFIX.stress")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="the agent child's event loop as `edge-agent run --loop` (auto: uvloop if installed)")


# -- agent child -------------------------------------------------------------------------------------
class _TimedQueue:
    """The pipeline's appender: times each commit against the records' data timestamps."""

    def __init__(self, inner: AsyncQueue) -> None:
        self.inner = inner
        self.latencies_ms: list[float] = []

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        seqs = await self.inner.append(records)
        now_ns = time.time_ns()
        self.latencies_ms += [(now_ns - r.ts_ns) / 1e6 for r in records]
        return seqs


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_agent(endpoints: list[Endpoint], *, duration_s: float, scalar_interval_s: float,
                    card_interval_s: float, db_path: Path, label: str) -> dict[str, Any]:
    devices = agent_devices_for(endpoints, poll_interval_s=scalar_interval_s, card_interval_s=card_interval_s,
                                timeout_s=5.0)
    queue = AsyncQueue(lambda: SqliteQueue(db_path))
    await queue.start()
    timed = _TimedQueue(queue)
    pipeline = Pipeline(timed, flush_interval_s=0.05)
    driver = ModbusDriver(devices)
    acquired = bad = bad_values = 0
    bad_reasons: collections.Counter[str] = collections.Counter()

    def emit(item: Reading | CardReading) -> None:
        nonlocal acquired, bad, bad_values
        if isinstance(item, CardReading):
            # counted like the committed record (uplink.schema CardRecord.value_count)
            values = len(item.scalars) + item.n_points * (
                2 + (item.current_a is not None) + (item.power_kw is not None))
        else:
            values = 1
        if item.quality == Quality.GOOD:
            acquired += values
        else:
            bad += 1
            bad_values += values  # a BAD reading is still committed (value None, with its reason)
            bad_reasons[item.reason or "?"] += 1
        pipeline.emit(item)

    settle_gc()  # as the agent does once its drivers are built (agent.runtime)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    threads0 = _thread_cpu_s()
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        driver_task = tg.create_task(driver.run(emit), name="bench-modbus-driver")
        pipeline_task = tg.create_task(pipeline.run(), name="bench-pipeline")
        while (elapsed := time.monotonic() - t0) < duration_s:
            await asyncio.sleep(min(5.0, duration_s - elapsed))
            print(f"  {label}: {time.monotonic() - t0:5.1f} s, {acquired} values acquired, "
                  f"{pipeline.stats.values_committed} committed, {bad} bad", file=sys.stderr, flush=True)
        driver_task.cancel()
        await asyncio.sleep(0)
        pipeline_task.cancel()  # its final flush commits what is pending
    wall_s = time.monotonic() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    threads1 = _thread_cpu_s()
    await queue.close()
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    committed = pipeline.stats.values_committed
    return {
        "acquired": acquired, "committed": committed, "bad": bad, "lost": acquired + bad_values - committed,
        "cpu_ms_per_1k": 1000.0 * cpu_s / max(1, committed) * 1000.0, "cpu_share": cpu_s / wall_s,
        "rss_mb": _peak_rss_bytes() / 2**20, "p50_ms": _percentile(timed.latencies_ms, 0.5),
        "p99_ms": _percentile(timed.latencies_ms, 0.99), "wall_s": wall_s,
        "values_per_s": committed / wall_s, "overflow": pipeline.stats.dropped_overflow,
        "user_s": usage1.ru_utime - usage0.ru_utime, "sys_s": usage1.ru_stime - usage0.ru_stime,
        "requests": driver.requests_sent(), "bad_reasons": dict(bad_reasons),
        # where the CPU went: the event loop thread vs the store's writer thread (user+system)
        "cpu_ms_per_1k_by_thread": {
            name: round(1e6 * (cpu - threads0.get(name, 0.0)) / max(1, committed), 3)
            for name, cpu in threads1.items()},
    }


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) per thread name of this process, from /proc (Linux)."""
    out: dict[str, float] = {}
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = names.get(int(task.name), "other")
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) * tick_s
    return out


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def card_values(well: str, seed: int = SIM_SEED, n_points: int = 200) -> int:
    """Values one card of this simulated well carries: 28 scalars and 2 curves, 4 with a power meter."""
    return len(A11_CARD_SCALARS) + n_points * (4 if well_profile(well, seed).has_power_meter else 2)


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss, which keeps the forking parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# -- floor child -------------------------------------------------------------------------------------
_READ_FUNCTION = {"holding": 3, "input": 4, "coil": 1, "discrete_input": 2}
_REQUEST = struct.Struct(">HHHBBHH")  # MBAP header (tid, protocol 0, length 6, unit) + read PDU


class _FloorConnection(asyncio.BufferedProtocol):
    """The least a Modbus/TCP read costs a Python client: frame, send, await the answer, unpack it."""

    def __init__(self) -> None:
        self._buffer = memoryview(bytearray(4096))
        self._waiter: asyncio.Future[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._tid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(bytes(self._buffer[:nbytes]))  # one answer per read: nothing else is sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the simulator closed the connection"))

    async def read(self, unit: int, function: int, start: int, count: int) -> tuple[int, ...]:
        assert self._transport is not None
        self._tid = self._tid % 0xFFFF + 1
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(_REQUEST.pack(self._tid, 0, 6, unit, function, start, count))
        answer = await self._waiter
        if len(answer) < 9 or answer[7] != function:
            raise RuntimeError(f"floor: unexpected answer {answer[:16].hex()}")
        return struct.unpack_from(f">{answer[8] >> 1}H", answer, 9)


async def _card_requests(device: ModbusDevice) -> list[tuple[Table, int, int]]:
    """The requests one full capture of the device's card costs, recorded from a capture."""
    client = ModbusTcpClient(device.host, device.port, timeout_s=5.0)
    try:
        reader = RecordingReader(client, device.unit_id)
        card = await capture_card(reader, device, clock_ns=time.time_ns)
        if card is None or card.quality != Quality.GOOD:
            raise RuntimeError(f"floor: {device.name} gave no card to record its requests from")
        return reader.requests
    finally:
        client.close()


async def run_floor(endpoints: list[Endpoint], *, duration_s: float, scalar_interval_s: float,
                    card_interval_s: float) -> dict[str, Any]:
    """The bare client's CPU per request on the agent's request pattern (see the module docstring)."""
    devices = agent_devices_for(endpoints, poll_interval_s=scalar_interval_s, card_interval_s=card_interval_s,
                                timeout_s=5.0)
    planner = ModbusDriver(devices)  # only for its read plans: never run
    card_requests = await _card_requests(devices[0])
    loop = asyncio.get_running_loop()
    requests = 0

    async def well(device: ModbusDevice, slot: int, start_s: float) -> None:
        nonlocal requests
        _, conn = await loop.create_connection(_FloorConnection, device.host, device.port)
        unit = device.unit_id
        jobs: dict[str, list[tuple[int, int, int]]] = {
            g: [(_READ_FUNCTION[b.table], b.start, b.count) for b in blocks]
            for g, blocks in planner.plans(device.name).items()}
        jobs[CARD_JOB] = [(_READ_FUNCTION[t], start, count) for t, start, count in card_requests]
        schedule = Schedule([(key, card_interval_s if key == CARD_JOB else device.interval_of(key))
                             for key in jobs], now_s=start_s, first_slot=slot * len(jobs))
        while True:
            delay = schedule.next_deadline() - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for key in schedule.pop_due(time.monotonic()):
                for function, start, count in jobs[key]:
                    await conn.read(unit, function, start, count)
                    requests += 1

    settle_gc()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(well(d, slot, t0)) for slot, d in enumerate(devices)]
        await asyncio.sleep(duration_s)
        for task in tasks:
            task.cancel()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"requests": requests, "cpu_s": cpu_s, "us_per_request": 1e6 * cpu_s / max(1, requests)}


# -- orchestration -----------------------------------------------------------------------------------
def _child(*argv: str) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "hil.bench.fleet", *argv], cwd=root, env=env,
                            stdout=subprocess.PIPE, text=True)


async def _serve_child(wells: int, card_interval_s: float, endpoints_file: Path) -> subprocess.Popen[str]:
    """A simulator child serving `wells`; returns once its endpoints are written to `endpoints_file`."""
    sim = _child("sim", str(wells), str(card_interval_s))
    assert sim.stdout is not None
    line = await asyncio.to_thread(sim.stdout.readline)
    if not line:
        await asyncio.to_thread(sim.wait, 30)
        raise RuntimeError("the simulator exited before serving")
    await asyncio.to_thread(endpoints_file.write_text, line)
    return sim


async def _result_of(child: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, _ = await asyncio.to_thread(child.communicate, timeout=CHILD_TIMEOUT_S)
    if child.returncode != 0:
        raise RuntimeError(f"the {what} child failed with {child.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def _case(label: str, *, wells: int, duration_s: float, scalar_interval_s: float,
                card_interval_s: float, sim_card_interval_s: float | None = None,
                profile: str = "", loop: str = "asyncio", floor: bool = False) -> dict[str, Any]:
    sims: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        try:
            sim_card_s = str(sim_card_interval_s or card_interval_s)
            sims.append(await _serve_child(wells, float(sim_card_s), Path(tmp, "endpoints.json")))
            if floor:  # its own simulator: the two clients must not share a server's queueing
                sims.append(await _serve_child(wells, float(sim_card_s), Path(tmp, "floor.json")))
            print(f"{label}: {wells} wells served, agent running {duration_s:.0f} s on {loop}"
                  + (", the bare client beside it" if floor else ""), flush=True)
            agent = _child("agent", label, str(Path(tmp, "endpoints.json")), str(duration_s),
                           str(scalar_interval_s), str(card_interval_s), str(Path(tmp, "queue.db")), profile,
                           loop)
            bare = (_child("floor", str(Path(tmp, "floor.json")), str(duration_s), str(scalar_interval_s),
                           str(card_interval_s), loop) if floor else None)
            sim_cpu0_s, t0 = _process_cpu_s(sims[0].pid), time.monotonic()
            result = await _result_of(agent, "agent")
            # the simulator's CPU share of one core while the agent ran (start-up included): is it the limit?
            sim_cpu_s = _process_cpu_s(sims[0].pid) - sim_cpu0_s
            result["sim_cpu_share"] = round(sim_cpu_s / (time.monotonic() - t0), 3)
            if bare is not None:
                result["floor"] = await _result_of(bare, "floor")
            return result
        finally:
            for sim in sims:
                sim.send_signal(signal.SIGTERM)
            for sim in sims:
                await asyncio.to_thread(sim.wait, 30)


async def main(args: argparse.Namespace) -> int:
    """833-well fleet and 100-well stress: agent CPU per 1,000 values, RSS, latency, losses."""
    from agent.cli import event_loop

    loop, _ = event_loop(args.loop)  # what the agent itself would run on
    out: dict[str, object] = {"loop": loop}
    if not args.skip_fleet:
        r = await _case("fleet", wells=args.wells, duration_s=args.duration_s,
                        scalar_interval_s=args.scalar_interval_s, card_interval_s=600.0 / args.speedup,
                        profile=args.profile and f"{args.profile}.fleet", loop=loop,
                        floor=not args.skip_floor)
        print(f"fleet: {r}", flush=True)
        out.update(wells=args.wells, values=int(r["committed"]), cpu_ms_per_1k=r["cpu_ms_per_1k"],
                   rss_mb=r["rss_mb"], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], lost=int(r["lost"]),
                   bad=int(r["bad"]))
        if "floor" in r:
            agent_us = 1e6 * (r["user_s"] + r["sys_s"]) / max(1, r["requests"])
            floor_us = r["floor"]["us_per_request"]
            # the floor's CPU on the agent's requests per 1,000 values: the least this machine can spend
            floor_ms_per_1k = floor_us * r["requests"] / max(1, r["committed"])
            out.update(requests=r["requests"], floor_requests=r["floor"]["requests"],
                       us_per_request=agent_us, floor_us_per_request=floor_us,
                       floor_cpu_ms_per_1k=floor_ms_per_1k, ratio_to_floor=agent_us / floor_us)
    if not args.skip_stress:
        # the RTUs publish a little faster than once a second, so most one-second captures find a new card
        s = await _case("stress", wells=args.stress_wells, duration_s=args.stress_duration_s,
                        scalar_interval_s=3600.0, card_interval_s=1.0, sim_card_interval_s=0.9,
                        profile=args.profile and f"{args.profile}.stress", loop=loop)
        print(f"stress: {s}", flush=True)
        # what a card per well per second carries; a fifth of the simulated wells have no power meter,
        # so their cards hold 428 values, not 828
        per_second = sum(card_values(f"well-{i + 1:03d}") for i in range(args.stress_wells))
        scheduled = per_second * s["wall_s"]
        out.update(stress_wells=args.stress_wells, stress_values_per_s=s["values_per_s"],
                   stress_acquired_share=s["acquired"] / scheduled, stress_cpu_ms_per_1k=s["cpu_ms_per_1k"],
                   stress_cpu_share=s["cpu_share"], stress_rss_mb=s["rss_mb"], stress_p50_ms=s["p50_ms"],
                   stress_p99_ms=s["p99_ms"], stress_lost=int(s["lost"]), stress_bad=int(s["bad"]),
                   stress_sim_cpu_share=s["sim_cpu_share"])
    print(result_line("fleet", **out), flush=True)
    return 0


async def _serve(wells: int, card_interval_s: float) -> None:
    site = Wellsite(wells, port=0, units_per_port=1, card_interval_s=card_interval_s, seed=SIM_SEED)
    await site.start()
    print(json.dumps(site.endpoints), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await site.stop()


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The agent child's event loop: None is asyncio's default; uvloop is imported only when asked for."""
    if loop == "asyncio":
        return None
    if loop == "uvloop":
        import uvloop  # optional: only the uvloop runs need it installed

        return uvloop.new_event_loop
    raise ValueError(f"unknown event loop {loop!r}; expected one of {LOOPS}")


def _child_main(argv: list[str]) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per well
    if argv[0] == "sim":
        asyncio.run(_serve(int(argv[1]), float(argv[2])))
        return 0
    if argv[0] == "floor":
        endpoints_file, duration, scalar_s, card_s, floor_loop = argv[1:6]
        floor_endpoints = [tuple(e) for e in json.loads(Path(endpoints_file).read_text())]
        floor_run = run_floor(floor_endpoints, duration_s=float(duration), scalar_interval_s=float(scalar_s),
                              card_interval_s=float(card_s))
        with asyncio.Runner(loop_factory=_loop_factory(floor_loop)) as runner:
            print(json.dumps(runner.run(floor_run)), flush=True)
        return 0
    label, endpoints_file, duration, scalar_s, card_s, db, profile, loop = argv[1:9]
    endpoints = [tuple(e) for e in json.loads(Path(endpoints_file).read_text())]
    run = run_agent(endpoints, duration_s=float(duration), scalar_interval_s=float(scalar_s),
                    card_interval_s=float(card_s), db_path=Path(db), label=label)
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        if profile:
            import cProfile

            prof = cProfile.Profile(time.thread_time)  # CPU time of the loop thread, not wall time
            result = prof.runcall(runner.run, run)
            prof.dump_stats(profile)
        else:
            result = runner.run(run)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
