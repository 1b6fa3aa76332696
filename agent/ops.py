"""The agent's command handlers: transactional config apply with health gate and rollback, writes, status.

Theory of operation of `config.apply` (one at a time; a second one while the first runs is answered BUSY):

1. Validate the pushed TOML into an AgentConfig (path-named errors). Refuse what cannot change over the air
   (agent.id, agent.data_dir, queue.*): those need a local edit and a restart. A config needs a `version`.
2. Optionally (`check_devices`/`dry_run`) read every new or changed Modbus device once with the new
   settings; a point that cannot be read GOOD fails the command with the point named. `dry_run` stops here.
3. Persist it as pending (agent.configstore: temp + fsync + rename), then apply only what changed: restart
   the drivers of the buses whose devices changed, replace the uplink if its section changed (break before
   make: the broker allows one connection per client id), restart the metrics server if its section
   changed; pipeline and log level change in place.
4. Health gate, up to `commands.health_gate_s` (or `gate_s`): every new or changed device must produce a
   GOOD reading and, if the uplink changed, the new link must connect.
5. Pass: commit (pending -> current, the last-known-good), adopt the new trust settings, republish the
   birth with the new version, answer OK. Fail: apply the old config the same way (the same parts restart),
   keep the new one as rejected.toml, answer ROLLED_BACK naming what failed. A crash inside 3-5 leaves
   pending.toml behind, which the next start rejects: the agent comes back on last-known-good.

The answer of a config that changed the uplink goes out on whichever link is current at the end, so the
operator hears the verdict even when the new settings could not reach the broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from agent.commands import Handler, Outcome, Progress
from agent.config import AgentConfig, ConfigError, parse_toml
from agent.configstore import ConfigStore, StoredConfig
from agent.runtime import settle_gc
from drivers.base import CardReading, Quality, Reading
from drivers.modbus.driver import ModbusDriver, poll_once
from drivers.serial.driver import SerialDriver
from uplink.schema.commands import Command, CommandError, ResultCode

if TYPE_CHECKING:
    from agent.app import Agent, BusKey

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 15.0
MAX_LOG_LINES = 1000
FROZEN_SECTIONS: tuple[tuple[str, Callable[[AgentConfig], object]], ...] = (
    ("agent.id", lambda c: c.agent.id),
    ("agent.data_dir", lambda c: c.agent.data_dir),
    ("queue", lambda c: c.queue),
)


class RingLog(logging.Handler):
    """The last `capacity` formatted log lines, for logs.fetch (logs also go to stdout/journald)."""

    def __init__(self, capacity: int = MAX_LOG_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def resolve_startup_config(base: AgentConfig, base_text: str | None) -> tuple[AgentConfig, str | None, str]:
    """The config to start with: the committed pushed config if there is one for this agent, else the base.

    Blocking (reads files): call before the event loop starts. Returns (config, its TOML text, source).
    """
    store = ConfigStore(base.agent.data_dir)
    store.recover()
    stored: StoredConfig | None = store.load_committed()
    if stored is None:
        return base, base_text, "base"
    pushed = stored.config
    if pushed.agent.id != base.agent.id or pushed.agent.data_dir != base.agent.data_dir:
        log.error(
            "config store: %s belongs to agent %s / %s; using the base config",
            store.current,
            pushed.agent.id,
            pushed.agent.data_dir,
        )
        return base, base_text, "base"
    return pushed, stored.text, "pushed"


def _arg(cmd: Command, key: str, kind: type, default: Any = ...) -> Any:
    if key not in cmd.args:
        if default is ...:
            raise CommandError(ResultCode.INVALID, f"args.{key}: required")
        return default
    value = cmd.args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandError(ResultCode.INVALID, f"args.{key}: expected {kind.__name__}")
    return value


class Operations:
    """Command handlers bound to a running Agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store = ConfigStore(agent.cfg.agent.data_dir)
        self._applying = False
        self.extra: dict[str, Handler] = {}  # e.g. file.upload from agent.files when present

    def handlers(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {
            "config.apply": self.config_apply,
            "config.get": self.config_get,
            "point.write": self.point_write,
            "card.capture": self.card_capture,
            "logs.fetch": self.logs_fetch,
            "agent.status": self.agent_status,
            "agent.restart": self.agent_restart,
        }
        out.update(self._file_handlers())
        out.update(self.extra)
        return out

    def _file_handlers(self) -> dict[str, Handler]:
        from agent.files.service import command_handlers

        return command_handlers(self.agent)

    def file_transfer_stats(self) -> dict[str, int]:
        stats = getattr(self.agent, "file_stats", None)
        return dict(stats) if isinstance(stats, dict) else {}

    # -- config ------------------------------------------------------------------------------

    async def config_get(self, cmd: Command, progress: Progress) -> Outcome:
        a = self.agent
        return Outcome(
            ResultCode.OK,
            f"running config version {a.cfg.version or '(unversioned)'}",
            {"version": a.cfg.version, "source": a.config_source, "config": a.config_text},
        )

    async def config_apply(self, cmd: Command, progress: Progress) -> Outcome:
        text = _arg(cmd, "config", str)
        dry_run = _arg(cmd, "dry_run", bool, False)
        check_devices = _arg(cmd, "check_devices", bool, False) or dry_run
        gate_s = _arg(cmd, "gate_s", float, self.agent.cfg.commands.health_gate_s)
        if self._applying:
            raise CommandError(ResultCode.BUSY, "another config.apply is in progress; retry when it answers")
        self._applying = True
        try:
            return await self._apply(
                text, dry_run=dry_run, check_devices=check_devices, gate_s=gate_s, progress=progress
            )
        finally:
            self._applying = False

    async def _apply(
        self, text: str, *, dry_run: bool, check_devices: bool, gate_s: float, progress: Progress
    ) -> Outcome:
        a = self.agent
        old = a.cfg
        try:
            new = parse_toml(text, source="pushed config")
            if new.version is None:
                raise ConfigError("version", 'a pushed config needs a version (top-level `version = "..."`)')
            for path, get in FROZEN_SECTIONS:
                if get(new) != get(old):
                    raise ConfigError(
                        path,
                        "cannot be changed by config.apply (edit the local config and restart the agent)",
                    )
        except ConfigError as exc:
            await asyncio.to_thread(self.store.reject, text)
            return Outcome(
                ResultCode.INVALID,
                f"config rejected: {exc}; still running version {old.version or '(unversioned)'}",
                {"path": exc.path, "running_version": old.version},
            )
        if new == old:
            return Outcome(
                ResultCode.OK,
                f"version {new.version} is already running",
                {"version": new.version, "changed": []},
            )
        changed_devices = _changed_devices(old, new)
        changes = _changed_parts(old, new)
        await progress(f"validated version {new.version}; changes: {', '.join(changes) or 'none'}")
        if check_devices and changed_devices:
            await progress(f"reading {len(changed_devices)} new/changed device(s) once")
            problems = await _check_devices(new, changed_devices)
            if problems:
                return Outcome(
                    ResultCode.FAILED,
                    "device check failed: " + "; ".join(problems[:20]),
                    {"problems": problems, "running_version": old.version},
                )
        if dry_run:
            return Outcome(
                ResultCode.OK,
                f"dry run: version {new.version} is valid"
                + (" and its devices read GOOD" if check_devices else ""),
                {"version": new.version, "changed": changes, "dry_run": True},
            )
        await asyncio.to_thread(self.store.begin, text)
        gate = _Gate(a, changed_devices, uplink_changed="uplink" in changes, transport=new.uplink.transport)
        await self._switch(old, new, changes, gate)
        await progress(f"applied; health gate up to {gate_s:g} s")
        ok, why = await gate.wait(gate_s)
        if ok:
            await asyncio.to_thread(self.store.commit)
            a.cfg, a.config_text, a.config_source = new, text, "pushed"
            if a.processor is not None:
                a.processor.reconfigure(new.commands)
            await a.refresh_status()
            log.info("config: version %s committed (changed: %s)", new.version, ", ".join(changes))
            details: dict[str, Any] = {"version": new.version, "changed": changes}
            note = ""
            if gate.uplink_changed:
                details["transport"] = gate.transport_seen
                note = f"; uplink connected over {gate.transport_seen}"
            return Outcome(
                ResultCode.OK,
                f"applied version {new.version} (changed: {', '.join(changes)}){note}",
                details,
            )
        log.warning(
            "config: version %s failed its health gate (%s); rolling back to %s",
            new.version,
            why,
            old.version,
        )
        await progress(f"health gate failed: {why}; rolling back")
        await self._switch(new, old, changes, None)
        await asyncio.to_thread(self.store.abandon)
        return Outcome(
            ResultCode.ROLLED_BACK,
            f"version {new.version} failed its health gate ({why}); rolled back to version "
            f"{old.version or '(unversioned)'}",
            {"version": old.version, "rejected_version": new.version, "reason": why},
        )

    async def _switch(
        self, old: AgentConfig, new: AgentConfig, changes: list[str], gate: _Gate | None
    ) -> None:
        """Make the running parts match `new`, restarting only what differs from `old`."""
        a = self.agent
        if gate is not None:
            gate.arm()
        logging.getLogger().setLevel(new.agent.log_level.upper())
        if a.pipeline is not None and ("pipeline" in changes or "modbus" in changes):
            from agent.app import deadbands_of

            a.pipeline.reconfigure(
                deadbands=deadbands_of(new),
                flush_interval_s=new.pipeline.flush_interval_s,
                max_pending=new.pipeline.max_pending_readings,
            )
        buses = _changed_buses(old, new)
        if buses:
            await a.stop_buses(buses)
            a.start_buses(new, buses)
        for kind, start in (("opcua", a.start_opcua), ("serial", a.start_serial)):
            names = _changed_named(getattr(old, kind), getattr(new, kind))
            if names:
                await a.stop_named(kind, names)
                start(new, names)
        if "files" in changes:
            await a.stop_files()
            a.start_files(new)
        if "uplink" in changes:
            await a.stop_link()
            # During a trial the agent's config is still `old`: the link's own settings come from `new`.
            a.start_link(new)
        if "metrics" in changes:
            await a.stop_metrics()
            a.start_metrics(new)
        settle_gc()  # the replaced parts become collectable, the new ones are frozen (agent.runtime)

    # -- devices -----------------------------------------------------------------------------

    async def point_write(self, cmd: Command, progress: Progress) -> Outcome:
        point = _arg(cmd, "point", str)
        if "value" not in cmd.args:
            raise CommandError(ResultCode.INVALID, "args.value: required")
        value = cmd.args["value"]
        if not isinstance(value, (int, float, bool, str)):
            raise CommandError(ResultCode.INVALID, "args.value: expected a number, boolean or string")
        device, sep, _ = point.partition("/")
        if not sep:
            raise CommandError(ResultCode.INVALID, "args.point: expected 'device/point'")
        driver = self.agent.driver_for(device)
        if driver is None:
            raise CommandError(ResultCode.INVALID, f"args.point: no device {device!r} on this agent")
        if isinstance(driver, SerialDriver):
            raise CommandError(
                ResultCode.INVALID, f"args.point: {device} is a serial line; its points are read-only"
            )
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                back = await driver.write(point, value)
        except KeyError as exc:
            raise CommandError(ResultCode.INVALID, f"args.point: {exc.args[0]}") from None
        except (PermissionError, ValueError) as exc:  # Modbus / OPC UA: the point is not writable
            raise CommandError(ResultCode.INVALID, f"args.point: {exc}") from None
        except TimeoutError:
            return Outcome(
                ResultCode.FAILED, f"write to {point} did not complete within {WRITE_TIMEOUT_S:g} s"
            )
        self.agent.emit(back)  # the read-back is a reading like any other: recorded and forwarded
        result = {
            "point": point,
            "written": value,
            "read_back": back.value,
            "quality": str(back.quality),
            "reason": back.reason,
        }
        if back.quality == Quality.GOOD:
            return Outcome(ResultCode.OK, f"wrote {value!r} to {point}; read back {back.value!r}", result)
        return Outcome(
            ResultCode.FAILED,
            f"write to {point} not confirmed: {back.quality} {back.reason or ''}".strip(),
            result,
        )

    async def card_capture(self, cmd: Command, progress: Progress) -> Outcome:
        """A dynamometer card now, through the device's running driver (its bus, its turn).

        args: `device`; `trigger` (default true when the card has a trigger register): write the
        trigger register and wait for the RTU's next card, else take the card it holds. A card the
        schedule already queued is reported, not queued twice.
        """
        name = _arg(cmd, "device", str)
        driver = self.agent.driver_for(name)
        if driver is None:
            raise CommandError(ResultCode.INVALID, f"args.device: no device {name!r} on this agent")
        spec = None
        if isinstance(driver, ModbusDriver):
            spec = next((d.card for d in driver.devices if d.name == name), None)
        if not isinstance(driver, ModbusDriver) or spec is None:
            raise CommandError(ResultCode.INVALID, f"args.device: device {name!r} has no card configured")
        trigger = _arg(cmd, "trigger", bool, spec.trigger_register is not None)
        if trigger and spec.trigger_register is None:
            raise CommandError(ResultCode.INVALID, f"args.trigger: device {name!r} has no trigger register")
        if trigger:
            await progress(f"triggering a card on {name}; waiting up to {spec.trigger_timeout_s:g} s for it")
        try:
            card, new = await driver.card_now(name, trigger=trigger)
        except (KeyError, ValueError) as exc:  # the device or its card went away in a config change
            why = exc.args[0] if exc.args else exc
            raise CommandError(ResultCode.INVALID, f"args.device: {why}") from None
        if card is None:
            return Outcome(ResultCode.FAILED, f"{name} holds no card yet (point count 0)")
        if new:
            self.agent.emit(card)
        result = {
            "device": name,
            "quality": str(card.quality),
            "reason": card.reason,
            "acquired_at_ns": card.acquired_at_ns,
            "n_points": card.n_points,
            "triggered": trigger,
            "queued": new,
        }
        if card.quality != Quality.GOOD:
            return Outcome(ResultCode.FAILED, f"card from {name} is {card.quality}: {card.reason}", result)
        queued = "queued for upload" if new else "already queued by the schedule"
        return Outcome(ResultCode.OK, f"card captured from {name} ({card.n_points} points); {queued}", result)

    # -- agent -------------------------------------------------------------------------------

    async def logs_fetch(self, cmd: Command, progress: Progress) -> Outcome:
        lines = _arg(cmd, "lines", int, 100)
        if not 1 <= lines <= MAX_LOG_LINES:
            raise CommandError(ResultCode.INVALID, f"args.lines: must be within 1..{MAX_LOG_LINES}")
        contains = _arg(cmd, "contains", str, "")
        ring = self.agent.ring_log
        if ring is None:
            return Outcome(ResultCode.UNSUPPORTED, "log capture is off in this process (see journald)")
        picked = [ln for ln in ring.lines if contains in ln][-lines:]
        return Outcome(ResultCode.OK, f"{len(picked)} line(s)", {"lines": picked})

    async def agent_status(self, cmd: Command, progress: Progress) -> Outcome:
        a = self.agent
        status = msgspec.to_builtins(await a.status())
        status["uplink"] = {
            "configured_transport": a.cfg.uplink.transport,
            "transport": a.link.transport,
            "quic_migrations": a.link.migrations,
        }
        status["devices"] = {
            name: {"quality": str(q), "reason": r}
            for driver, _ in a.bus_drivers.values()
            for name, (q, r) in driver.status().items()
        }
        return Outcome(ResultCode.OK, f"{status['state']}, config {a.cfg.version or '(unversioned)'}", status)

    async def agent_restart(self, cmd: Command, progress: Progress) -> Outcome:
        from agent.app import EX_RESTART

        # The answer goes out first (Outcome.after runs once it was acknowledged); then a clean stop and
        # a non-zero exit that the unit's Restart=on-failure turns into a start.
        return Outcome(
            ResultCode.OK,
            "restarting (clean stop, then the service manager starts the agent)",
            after=lambda: self.agent.stop(EX_RESTART),
        )


class _Gate:
    """Watches the parts a config change restarted: GOOD readings from changed devices, the new link."""

    def __init__(
        self, agent: Agent, devices: set[str], *, uplink_changed: bool, transport: str = "tcp"
    ) -> None:
        self.agent = agent
        self.devices = devices
        self.uplink_changed = uplink_changed
        self.transport = transport  # the new [uplink] transport: "tcp", "quic" or "auto"
        self.transport_seen: str | None = None
        self.good: set[str] = set()
        self.last_bad: dict[str, str] = {}
        self._event = asyncio.Event()
        self._untap: Callable[[], None] | None = None

    def arm(self) -> None:
        self._untap = self.agent.add_tap(self._seen)

    def _seen(self, item: Reading | CardReading) -> None:
        if item.device not in self.devices:
            return
        if item.quality == Quality.GOOD:
            self.good.add(item.device)
            self._event.set()
        else:
            self.last_bad[item.device] = item.reason or str(item.quality)

    def _problem(self) -> str | None:
        missing = sorted(self.devices - self.good)
        if missing:
            return "; ".join(
                f"device {d} produced no GOOD reading (last: {self.last_bad.get(d, 'nothing')})"
                for d in missing
            )
        if self.uplink_changed:
            # The new link must carry the MQTT session over a transport the new config allows: "quic"
            # only over QUIC; "auto" over QUIC or (when QUIC cannot be had) its TCP/TLS fallback.
            active = self.agent.link.transport
            allowed = {"tcp": ("tcp",), "quic": ("quic",), "auto": ("quic", "tcp")}[self.transport]
            if active not in allowed:
                how = {"tcp": "over TCP/TLS", "quic": "over QUIC", "auto": "over QUIC or TCP/TLS"}
                return f"the uplink did not connect to the broker {how[self.transport]} with the new settings"
            self.transport_seen = active
        return None

    async def wait(self, gate_s: float) -> tuple[bool, str]:
        deadline = time.monotonic() + gate_s
        try:
            while (problem := self._problem()) is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False, problem
                self._event.clear()
                # Poll the link at a short period: there is no event for "connected" across swaps.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.1)):
                        await self._event.wait()
            return True, "healthy"
        finally:
            if self._untap is not None:
                self._untap()


def _changed_parts(old: AgentConfig, new: AgentConfig) -> list[str]:
    parts = []
    for name in (
        "version", "agent", "uplink", "pipeline", "commands", "status", "metrics", "files", "modbus", "opcua",
        "serial",
    ):
        if getattr(old, name) != getattr(new, name):
            parts.append(name)
    return [p for p in parts if p != "version"]


def _changed_devices(old: AgentConfig, new: AgentConfig) -> set[str]:
    """Devices (Modbus devices, OPC UA servers, serial ports) that are new or changed in `new`."""
    out: set[str] = set()
    for kind in ("modbus", "opcua", "serial"):
        before = {d.name: d for d in getattr(old, kind)}
        out |= {d.name for d in getattr(new, kind) if before.get(d.name) != d}
    return out


def _changed_named(old: tuple[Any, ...], new: tuple[Any, ...]) -> set[str]:
    """Names of OPC UA servers / serial ports added, removed or changed: each is its own driver."""
    a, b = {x.name: x for x in old}, {x.name: x for x in new}
    return {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}


def _changed_buses(old: AgentConfig, new: AgentConfig) -> set[BusKey]:
    from agent.app import bus_groups

    a, b = bus_groups(old.modbus), bus_groups(new.modbus)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


async def _check_devices(cfg: AgentConfig, names: set[str]) -> list[str]:
    """Read the named Modbus devices once (OPC UA servers and serial ports are judged by the gate)."""
    devices = [d for d in cfg.modbus if d.name in names]
    index = {d.name: i for i, d in enumerate(cfg.modbus)}
    problems = []
    for item in await poll_once(devices):
        if item.quality != Quality.GOOD:
            what = item.point if isinstance(item, Reading) else "card"
            problems.append(
                f"modbus[{index[item.device]}] {item.device}/{what}: {item.quality} "
                f"{item.reason or ''}".strip()
            )
    return problems
