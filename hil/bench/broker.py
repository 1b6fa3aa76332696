"""`edge-hil bench broker`: our cloud broker and Mosquitto side by side under the same client load.

Both brokers run as their own processes on 127.0.0.1 (Mosquitto is installed with apt-get when it is
missing and we are root). The load comes from separate generator processes (this file run as a
script) that speak MQTT 3.1.1 over raw non-blocking sockets with pre-encoded packets from our codec,
so the generator is not the bottleneck a full client library would be. Cases:

    qos0_1to1, qos1_1to1          one publisher, one subscriber
    qos0_fanin_50to1, qos1_...    50 publishers on their own topics, one wildcard subscriber
    qos0_fanout_1to50, qos1_...   one publisher, 50 subscribers of the same topic
    connect_rate                  sequential CONNECT/CONNACK/DISCONNECT on fresh TCP connections

Throughput is messages delivered to subscribers per second, from the publishers' start to the last
delivery (QoS 1: publishers keep a window of unacknowledged PUBLISHes, subscribers acknowledge each
delivery). Broker CPU per message is the broker process's own utime+stime delta (/proc/PID/stat)
over the case divided by the messages delivered (connections for connect_rate). One line per case:

    bench broker: case=... ours_msgs_per_s=... mosquitto_msgs_per_s=... ours_cpu_us=... mosquitto_cpu_us=...

Targets (issue 6): <= 25 us of broker CPU per QoS 0 message routed 1->1; QoS 1 throughput >= 0.8x
Mosquitto's in the same run. `--profile FILE` runs our broker under cProfile and writes the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    qos: int
    publishers: int
    subscribers: int
    messages_per_publisher: int

    @property
    def deliveries(self) -> int:
        return self.publishers * self.messages_per_publisher * self.subscribers


def cases(scale: float, fan: int) -> list[Case]:
    def n(x: int) -> int:
        return max(1, int(x * scale))

    return [
        Case("qos0_1to1", 0, 1, 1, n(100_000)),
        Case("qos1_1to1", 1, 1, 1, n(40_000)),
        Case(f"qos0_fanin_{fan}to1", 0, fan, 1, n(2_000)),
        Case(f"qos1_fanin_{fan}to1", 1, fan, 1, n(800)),
        Case(f"qos0_fanout_1to{fan}", 0, 1, fan, n(2_000)),
        Case(f"qos1_fanout_1to{fan}", 1, 1, fan, n(800)),
    ]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=2.0,
                        help="multiply every case's message count (default 2.0: under a minute in all on 2 "
                             "cores; /proc CPU times tick at 10 ms, so much smaller runs get coarse)")
    parser.add_argument("--fan", type=int, default=50, help="clients on the wide side of fan-in/fan-out")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--window", type=int, default=100,
                        help="unacknowledged QoS 1 PUBLISHes per publisher (both brokers accept it)")
    parser.add_argument("--connections", type=int, default=2000, help="connections for connect_rate")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--no-mosquitto", action="store_true", help="measure our broker only")
    parser.add_argument("--profile", metavar="FILE", help="run our broker under cProfile, stats to FILE")


# ------------------------------------------------------------------------------------------ brokers


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _mosquitto_path() -> str | None:
    sbin = "/usr/sbin/mosquitto"  # Debian installs the daemon outside a normal user's PATH
    return shutil.which("mosquitto") or (sbin if os.path.exists(sbin) else None)


def find_mosquitto(install: bool = True) -> str | None:
    """The mosquitto binary; installs the Debian package when missing and we are root."""
    path = _mosquitto_path()
    if path is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench broker: installing mosquitto (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "mosquitto"],
                       check=False, capture_output=True, env=env)
        path = _mosquitto_path()
    return path


@contextlib.contextmanager
def run_ours(profile: str | None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "broker.toml"
        # Same limits as the Mosquitto side: deep queues, a 1000-message in-flight window, no disk, and
        # (like Mosquitto, which buffers QoS 0 for a connected reader without limit) a write-buffer
        # high-water mark high enough that a reader briefly starved of CPU by the generators on a small
        # host is not treated as a slow consumer: the case measures routing, not the drop policy.
        cfg.write_text(f'allow_anonymous = true\nlog_level = "warning"\n[[listeners]]\nhost = "127.0.0.1"\n'
                       f"port = {port}\n[limits]\nmax_queued_messages = 1000000\n"
                       "max_inflight_messages = 1000\n[persistence]\nbackend = \"memory\"\n"
                       "[backpressure]\nhigh_water_bytes = 268435456\nlow_water_bytes = 67108864\n")
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += ["-m", "cloud_broker.cli", "run", "--config", str(cfg)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT)
        try:
            _wait_listening(port, proc)
            yield port, proc
        finally:
            proc.send_signal(2 if profile else 15)  # SIGINT lets cProfile write its stats
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def run_mosquitto(binary: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "mosquitto.conf"
        cfg.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                       "max_queued_messages 1000000\nmax_inflight_messages 1000\nlog_type none\n")
        proc = subprocess.Popen([binary, "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_listening(port, proc)
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------------ load


def _spawn(role: str, spec: dict[str, object]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, role, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{role} generator failed to start: {line!r}")
    return proc


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, float]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError("generator gave no result")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def run_case(port: int, pid: int, case: Case, payload_bytes: int, window: int) -> tuple[float, float, int]:
    """(deliveries per second, broker CPU us per delivery, deliveries) for one case on one broker."""
    sub = _spawn("sub", {"port": port, "clients": case.subscribers, "qos": case.qos,
                         "filter": "bench/#" if case.publishers > 1 else "bench/0",
                         "expected": case.deliveries})
    pub = _spawn("pub", {"port": port, "clients": case.publishers, "qos": case.qos, "window": window,
                         "messages": case.messages_per_publisher, "payload_bytes": payload_bytes})
    cpu0 = _cpu_s(pid)
    assert pub.stdin is not None and sub.stdin is not None
    pub.stdin.write("go\n")
    pub.stdin.flush()
    pub_result = _finish(pub, 300)
    sub_result = _finish(sub, 300)
    cpu1 = _cpu_s(pid)
    received = int(sub_result["received"])
    if received < case.deliveries:
        print(f"bench broker:   {case.deliveries - received} of {case.deliveries} deliveries dropped "
              "(QoS 0 to a congested reader)", flush=True)
    elapsed = max(sub_result["t_last"] - pub_result["t_start"], 1e-6)
    return received / elapsed, (cpu1 - cpu0) * 1e6 / max(received, 1), received


def run_connect_rate(port: int, pid: int, count: int) -> tuple[float, float, int]:
    conn = _spawn("conn", {"port": port, "count": count})
    cpu0 = _cpu_s(pid)
    assert conn.stdin is not None
    conn.stdin.write("go\n")
    conn.stdin.flush()
    result = _finish(conn, 300)
    cpu1 = _cpu_s(pid)
    done = int(result["connections"])
    return done / max(result["elapsed_s"], 1e-6), (cpu1 - cpu0) * 1e6 / max(done, 1), done


# ------------------------------------------------------------------------------------------ main


async def main(args: argparse.Namespace) -> int:
    """Run every case on both brokers, print one line per case. 0 on success, 1 if a broker failed."""
    return await asyncio.to_thread(_main_sync, args)


def _measure(name: str, port: int, pid: int, selected: Sequence[Case], args: argparse.Namespace,
             results: dict[str, dict[str, tuple[float, float, int]]]) -> None:
    for case in selected:
        print(f"bench broker: {name}: {case.name} ({case.deliveries} deliveries)...", flush=True)
        results.setdefault(case.name, {})[name] = run_case(port, pid, case, args.payload_bytes, args.window)
    if not args.cases or "connect_rate" in args.cases.split(","):
        print(f"bench broker: {name}: connect_rate ({args.connections} connections)...", flush=True)
        results.setdefault("connect_rate", {})[name] = run_connect_rate(port, pid, args.connections)


def _main_sync(args: argparse.Namespace) -> int:
    wanted = set(filter(None, args.cases.split(",")))
    selected = [c for c in cases(args.scale, args.fan) if not wanted or c.name in wanted]
    results: dict[str, dict[str, tuple[float, float, int]]] = {}
    with run_ours(args.profile) as (port, proc):
        _measure("ours", port, proc.pid, selected, args, results)
    if not args.no_mosquitto:
        binary = find_mosquitto()
        if binary is None:
            print("bench broker: mosquitto is not installed and cannot be installed here; use --no-mosquitto",
                  file=sys.stderr)
            return 1
        with run_mosquitto(binary) as (port, proc):
            _measure("mosquitto", port, proc.pid, selected, args, results)
    for name, by in results.items():
        ours = by.get("ours", (0.0, 0.0, 0))
        theirs = by.get("mosquitto", (0.0, 0.0, 0))
        unit = "conns" if name == "connect_rate" else "msgs"
        line = (f"bench broker: case={name} ours_{unit}_per_s={ours[0]:.0f} "
                f"mosquitto_{unit}_per_s={theirs[0]:.0f} ours_cpu_us={ours[1]:.1f} "
                f"mosquitto_cpu_us={theirs[1]:.1f}")
        if theirs[0]:
            line += f" ratio={ours[0] / theirs[0]:.2f}"
        print(line, flush=True)
    for name, by in results.items():
        if name.startswith("qos0_1to1") and "ours" in by:
            verdict = "met" if by["ours"][1] <= 25 else "MISSED"
            print(f"bench broker: target qos0 1->1 cpu <= 25 us: {verdict} ({by['ours'][1]:.1f} us)",
                  flush=True)
        if name.startswith("qos1_1to1") and "mosquitto" in by and by["mosquitto"][0]:
            ratio = by["ours"][0] / by["mosquitto"][0]
            print(f"bench broker: target qos1 1->1 throughput >= 0.8x mosquitto: "
                  f"{'met' if ratio >= 0.8 else 'MISSED'} ({ratio:.2f}x)", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ generators
# Run as `python hil/bench/broker.py ROLE JSON`: print "ready", wait for "go" (pub, conn) on stdin,
# print one JSON result line. MQTT 3.1.1 over raw sockets; only fixed headers are parsed on receipt.


def _connect_all(port: int, count: int, prefix: str) -> list[socket.socket]:
    from uplink.mqtt.codec import encode
    from uplink.mqtt.packets import MQTT_311, Connect

    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(encode(Connect(f"{prefix}-{os.getpid()}-{i}", protocol_level=MQTT_311, keep_alive_s=0),
                         MQTT_311))
        socks.append(s)
    for s in socks:
        ack = _recv_exact(s, 4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {ack!r}")
    return socks


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def _scan(buf: bytearray) -> tuple[int, int, list[int]]:
    """(PUBLISH count, bytes consumed, QoS 1 packet ids) of the complete packets at the start of buf."""
    pos, n, count = 0, len(buf), 0
    pids: list[int] = []
    while n - pos >= 2:
        first = buf[pos]
        length, i, shift = 0, pos + 1, 0
        while True:
            if i >= n:
                return count, pos, pids
            b = buf[i]
            length |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                break
            shift += 7
        end = i + length
        if end > n:
            break
        if first >> 4 == 3:
            count += 1
            if first & 0x06:
                tlen = (buf[i] << 8) | buf[i + 1]
                p = i + 2 + tlen
                pids.append((buf[p] << 8) | buf[p + 1])
        pos = end
    return count, pos, pids


def _sub_worker(spec: dict[str, object]) -> None:
    from uplink.mqtt.codec import encode
    from uplink.mqtt.packets import MQTT_311, Subscribe, Subscription

    port, clients, qos = int(spec["port"]), int(spec["clients"]), int(spec["qos"])  # type: ignore[call-overload]
    expected = int(spec["expected"])  # type: ignore[call-overload]
    socks = _connect_all(port, clients, "sub")
    for s in socks:
        s.sendall(encode(Subscribe(1, (Subscription(str(spec["filter"]), qos),)), MQTT_311))
        _recv_exact(s, 5)  # SUBACK
    sel = selectors.DefaultSelector()
    bufs = {}
    by_fd = {s.fileno(): s for s in socks}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = bytearray()
    print("ready", flush=True)
    received = 0
    t_first = t_last = 0.0
    deadline = time.monotonic() + 600
    while received < expected and time.monotonic() < deadline:
        events = sel.select(timeout=2)
        if not events and received:
            break  # QoS 0 may be dropped for a congested reader: quiet for 2 s means the run is over
        for key, _ in events:
            s = by_fd[key.fd]
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(s)
                continue
            buf = bufs[s]
            buf += data
            count, used, pids = _scan(buf)
            del buf[:used]
            if count:
                now = time.monotonic()
                if not received:
                    t_first = now
                t_last = now
                received += count
            if pids:
                s.setblocking(True)
                s.sendall(b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in pids))
                s.setblocking(False)
    print(json.dumps({"received": received, "t_first": t_first, "t_last": t_last}), flush=True)


def _pub_worker(spec: dict[str, object]) -> None:
    from uplink.mqtt.codec import encode_publish
    from uplink.mqtt.packets import MQTT_311

    port, clients, qos = int(spec["port"]), int(spec["clients"]), int(spec["qos"])  # type: ignore[call-overload]
    messages, window = int(spec["messages"]), int(spec["window"])  # type: ignore[call-overload]
    payload = b"x" * int(spec["payload_bytes"])  # type: ignore[call-overload]
    socks = _connect_all(port, clients, "pub")
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t_start = time.monotonic()
    if qos == 0:
        # Pre-encoded, sent in large slices, publishers interleaved so fan-in arrives mixed.
        packets = [encode_publish(f"bench/{i}", payload, 0, False, False, None, MQTT_311)
                   for i in range(clients)]
        chunk = 500
        for start in range(0, messages, chunk):
            k = min(chunk, messages - start)
            for i, s in enumerate(socks):
                s.sendall(packets[i] * k)
    else:
        sel = selectors.DefaultSelector()
        index = {s: i for i, s in enumerate(socks)}
        sent = dict.fromkeys(socks, 0)
        acked = dict.fromkeys(socks, 0)
        pending = {s: bytearray() for s in socks}
        by_fd = {s.fileno(): s for s in socks}

        def top_up(s: socket.socket) -> None:
            n = min(messages - sent[s], window - (sent[s] - acked[s]))
            if n > 0:
                first = sent[s]
                s.sendall(b"".join(encode_publish(f"bench/{index[s]}", payload, 1, False, False,
                                                  (first + j) % 65535 + 1, MQTT_311) for j in range(n)))
                sent[s] += n

        for s in socks:
            sel.register(s, selectors.EVENT_READ)
            top_up(s)
        remaining = len(socks)
        while remaining:
            for key, _ in sel.select(timeout=30):
                s = by_fd[key.fd]
                data = s.recv(1 << 16)
                if not data:
                    raise ConnectionError("broker closed a publisher")
                buf = pending[s]
                buf += data
                acks = len(buf) // 4
                del buf[:acks * 4]  # PUBACKs are 4 bytes each at MQTT 3.1.1
                acked[s] += acks
                if acked[s] >= messages:
                    sel.unregister(s)
                    remaining -= 1
                else:
                    top_up(s)
    t_end = time.monotonic()
    for s in socks:
        s.sendall(b"\xe0\x00")  # DISCONNECT
        s.close()
    print(json.dumps({"t_start": t_start, "t_end": t_end}), flush=True)


def _conn_worker(spec: dict[str, object]) -> None:
    port, count = int(spec["port"]), int(spec["count"])  # type: ignore[call-overload]
    from uplink.mqtt.codec import encode
    from uplink.mqtt.packets import MQTT_311, Connect

    packets = [encode(Connect(f"c{i}", protocol_level=MQTT_311, keep_alive_s=0), MQTT_311) + b"\xe0\x00"
               for i in range(count)]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t0 = time.monotonic()
    done = 0
    for data in packets:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(data)
            if _recv_exact(s, 4)[3] == 0:
                done += 1
    print(json.dumps({"connections": done, "elapsed_s": time.monotonic() - t0}), flush=True)


if __name__ == "__main__":
    # Run as a script, this file's folder leads sys.path, where sibling modules (hil/bench/uplink.py)
    # would shadow the top-level packages of the same name: import from the repository root instead.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO_ROOT)
    role, raw_spec = sys.argv[1], json.loads(sys.argv[2])
    {"sub": _sub_worker, "pub": _pub_worker, "conn": _conn_worker}[role](raw_spec)
