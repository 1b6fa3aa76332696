"""Typed, frozen Modbus device configuration (points, cards, devices) and the default A11 beam-pump map.

Addressing (decided here, used everywhere): a point is located EITHER by `address` in Modicon numbering
OR by an explicit `table` plus a 0-based `pdu_address` (the number that goes on the wire):

    address 1..9999          coil            pdu = address - 1       (0xxxx)
    address 10001..19999     discrete input  pdu = address - 10001   (1xxxx)
    address 30001..39999     input register  pdu = address - 30001   (3xxxx)
    address 40001..49999     holding reg.    pdu = address - 40001   (4xxxx)
    address 100001..165536   discrete input  pdu = address - 100001  (6-digit forms, likewise
    address 300001..365536   input register  pdu = address - 300001   for 0xxxxx/4xxxxx)
    address 400001..465536   holding reg.    pdu = address - 400001

So the A11 tubing pressure "40300" is holding register PDU address 299. Devices whose documentation
means "40300 = PDU 300" are configured with `table = "holding", pdu_address = 300` instead.

Types: u16 i16 u32 i32 u64 i64 f32 f64 occupy 1/1/2/2/4/4/2/4 registers; `string` occupies `length`
registers (2 bytes each, NULs stripped); `bits` is one bit (`bit` 0..15, 0 = least significant) of a
register; `bool` is a coil/discrete input, or a register that is non-zero. Decoded value =
raw * scale + offset. `byte_order` orders the two bytes inside each register, `word_order` the
registers of a multi-register value ("big" = most significant first, the Modbus convention).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Table = Literal["coil", "discrete_input", "input", "holding"]
PointType = Literal["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "bool", "string", "bits"]
Order = Literal["big", "little"]

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
# Modbus application protocol v1.1b3 §6: at most 125 registers (FC 03/04) and 2000 bits (FC 01/02).
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
# Merging across a gap of g registers costs 2*g response bytes; a separate request costs its own
# Modbus/TCP overhead (12-byte request + 9-byte response header) plus 40 bytes of TCP/IPv4 headers
# each way, about 101 bytes, i.e. ~50 registers. Past that, a second request is cheaper on the wire.
DEFAULT_MAX_GAP = 50

_WIDTH = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "u64": 4, "i64": 4, "f32": 2, "f64": 4,
          "bool": 1, "bits": 1}

_MODICON_RANGES: tuple[tuple[int, int, Table], ...] = (
    (1, 9999, "coil"),
    (10001, 19999, "discrete_input"),
    (30001, 39999, "input"),
    (40001, 49999, "holding"),
    (100001, 165536, "discrete_input"),
    (300001, 365536, "input"),
    (400001, 465536, "holding"),
)


def modicon_to_pdu(address: int) -> tuple[Table, int]:
    """(table, 0-based PDU address) for a Modicon-numbered address; ValueError when out of every range."""
    for lo, hi, table in _MODICON_RANGES:
        if lo <= address <= hi:
            return table, address - lo
    raise ValueError(f"address {address} is not a Modicon 0xxxx/1xxxx/3xxxx/4xxxx (or 6-digit) address")


class ModbusPoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One named value on a device. Locate it by `address` (Modicon) or by `table` + `pdu_address`."""

    name: str
    address: int | None = None
    table: Table | None = None
    pdu_address: int | None = None
    type: PointType = "u16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    group: str = "default"
    deadband: float | None = None
    length: int | None = None  # registers, for type "string" only
    bit: int | None = None  # bit index 0..15, for type "bits" only
    writable: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if self.address is not None:
            if self.table is not None or self.pdu_address is not None:
                raise ValueError(f"{self.name}: give either address or table + pdu_address, not both")
            table, _ = modicon_to_pdu(self.address)
        else:
            if self.table is None or self.pdu_address is None:
                raise ValueError(f"{self.name}: needs address, or table and pdu_address")
            if not 0 <= self.pdu_address <= 0xFFFF:
                raise ValueError(f"{self.name}: pdu_address {self.pdu_address} outside 0..65535")
            table = self.table
        if table in BIT_TABLES and self.type != "bool":
            raise ValueError(f"{self.name}: {table} points must have type bool, not {self.type}")
        if self.type == "string":
            if self.length is None or not 1 <= self.length <= MAX_REGISTERS_PER_READ:
                raise ValueError(f"{self.name}: string needs length in 1..{MAX_REGISTERS_PER_READ} registers")
        elif self.length is not None:
            raise ValueError(f"{self.name}: length applies to type string only")
        if self.type == "bits":
            if self.bit is None or not 0 <= self.bit <= 15:
                raise ValueError(f"{self.name}: bits needs bit in 0..15")
        elif self.bit is not None:
            raise ValueError(f"{self.name}: bit applies to type bits only")
        if self.scale == 0:
            raise ValueError(f"{self.name}: scale must not be 0")
        if self.deadband is not None and self.deadband < 0:
            raise ValueError(f"{self.name}: deadband must be >= 0")
        _, start = self.location()
        if start + self.register_count() > 0x10000:
            raise ValueError(f"{self.name}: runs past the end of the address space")

    def location(self) -> tuple[Table, int]:
        """(table, 0-based PDU start address)."""
        if self.address is not None:
            return modicon_to_pdu(self.address)
        assert self.table is not None and self.pdu_address is not None  # enforced in __post_init__
        return self.table, self.pdu_address

    def register_count(self) -> int:
        """Registers (or bits, in bit tables) the point occupies."""
        if self.type == "string":
            assert self.length is not None
            return self.length
        return _WIDTH[self.type]


class PollGroup(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A poll interval for the points whose `group` is `name`."""

    name: str
    interval_s: float

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"group {self.name}: interval_s must be > 0")


class CardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a dynamometer card lives (holding registers, Modicon numbering) and how to decode it.

    Curves are int16 words; value = word * scale. `*_curve = None` means the device has no such curve.
    The acquisition time is 6 registers YYYY, MM, DD, hh, mm, ss, each either a plain decimal number
    ("decimal", e.g. 2024) or packed BCD ("bcd", e.g. 0x2024), in local time at `utc_offset_h`.
    """

    profile: Literal["a11"] = "a11"
    interval_s: float = 1800.0  # how often the agent captures a card (A11 default: 30 min)
    interval_register: int | None = 40981
    trigger_register: int | None = 40982
    set_points_register: int | None = 40983
    n_points_register: int = 40984
    acquisition_time_register: int = 40985
    time_encoding: Literal["decimal", "bcd"] = "decimal"
    utc_offset_h: float = 8.0
    position_curve: int = 41001
    load_curve: int = 41251
    current_curve: int | None = 41501
    power_curve: int | None = 41751
    block_registers: int = 250  # registers reserved per curve block
    position_scale: float = 0.01  # m per count
    load_scale: float = 0.01  # kN per count
    current_scale: float = 0.01  # A per count
    power_scale: float = 0.01  # kW per count
    max_points: int = 250
    scalars: tuple[str, ...] = ()  # names of device points captured with (and stored in) the card
    consistency_attempts: int = 3  # captures tried before a torn card is reported BAD
    trigger_timeout_s: float = 60.0  # after a trigger write, how long to wait for a new acquisition time

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if not 1 <= self.max_points <= self.block_registers:
            raise ValueError(f"max_points must be in 1..block_registers ({self.block_registers})")
        if not -14 <= self.utc_offset_h <= 14:
            raise ValueError("utc_offset_h must be in -14..14")
        if self.consistency_attempts < 1:
            raise ValueError("consistency_attempts must be >= 1")
        if not 0 < self.trigger_timeout_s <= 3600:
            raise ValueError("trigger_timeout_s must be within (0, 3600] s")
        for name in ("interval_register", "trigger_register", "set_points_register", "n_points_register",
                     "acquisition_time_register", "position_curve", "load_curve", "current_curve",
                     "power_curve"):
            reg = getattr(self, name)
            if reg is not None and modicon_to_pdu(reg)[0] != "holding":
                raise ValueError(f"{name}: {reg} is not a holding register (4xxxx)")

    def curves(self) -> dict[str, tuple[int, float]]:
        """Curve name -> (Modicon start address, scale) for the curves the device has."""
        out = {"position_m": (self.position_curve, self.position_scale),
               "load_kn": (self.load_curve, self.load_scale)}
        if self.current_curve is not None:
            out["current_a"] = (self.current_curve, self.current_scale)
        if self.power_curve is not None:
            out["power_kw"] = (self.power_curve, self.power_scale)
        return out


Transport = Literal["tcp", "rtu"]
Parity = Literal["N", "E", "O"]


class ModbusDevice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One Modbus slave with its points and optional card.

    `transport = "tcp"` (default): Modbus/TCP at host:port; devices behind one host:port (a gateway
    serving many unit ids) share one connection. `transport = "rtu"`: Modbus RTU on the serial line
    `serial_port` at baudrate/parity/stopbits/bytesize; devices on one serial port are one bus and must
    agree on those settings. Either way one request is in flight per connection or bus at a time.
    The serial default is 19200 8E1, the Modbus serial line specification's default (v1.02 §2.5.1).
    """

    name: str
    transport: Transport = "tcp"
    host: str = ""
    port: int = 502
    serial_port: str = ""
    baudrate: int = 19200
    parity: Parity = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit_id: int = 1
    timeout_s: float = 1.0
    retries: int = 1  # extra attempts per request after a timeout
    max_registers_per_read: int = MAX_REGISTERS_PER_READ
    max_bits_per_read: int = MAX_BITS_PER_READ
    max_gap: int = DEFAULT_MAX_GAP
    poll_interval_s: float = 10.0
    groups: tuple[PollGroup, ...] = ()  # per-group intervals; other groups use poll_interval_s
    quarantine_s: float = 5.0  # first back-off after a device failure; doubles up to quarantine_max_s
    quarantine_max_s: float = 300.0
    points: tuple[ModbusPoint, ...] = ()
    card: CardSpec | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if self.transport == "tcp":
            if not self.host:
                raise ValueError("host must be set for transport tcp")
            if not 1 <= self.port <= 65535:
                raise ValueError("port must be in 1..65535")
            if not 0 <= self.unit_id <= 255:
                raise ValueError("unit_id must be in 0..255")
        else:
            if not self.serial_port:
                raise ValueError("serial_port must be set for transport rtu")
            if self.baudrate <= 0:
                raise ValueError("baudrate must be > 0")
            # 0 is broadcast (no answer) and 248..255 are reserved (serial line v1.02 §2.2)
            if not 1 <= self.unit_id <= 247:
                raise ValueError("unit_id must be in 1..247 for transport rtu")
        if self.timeout_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("timeout_s and poll_interval_s must be > 0")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if not 1 <= self.max_registers_per_read <= MAX_REGISTERS_PER_READ:
            raise ValueError(f"max_registers_per_read must be in 1..{MAX_REGISTERS_PER_READ}")
        if not 1 <= self.max_bits_per_read <= MAX_BITS_PER_READ:
            raise ValueError(f"max_bits_per_read must be in 1..{MAX_BITS_PER_READ}")
        if self.max_gap < 0:
            raise ValueError("max_gap must be >= 0")
        if self.quarantine_s <= 0 or self.quarantine_max_s < self.quarantine_s:
            raise ValueError("need 0 < quarantine_s <= quarantine_max_s")
        names = [p.name for p in self.points]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate point names: {sorted(dup)}")
        for p in self.points:
            if p.register_count() > self.max_registers_per_read:
                raise ValueError(f"point {p.name} is longer than max_registers_per_read")
        if self.card is not None:
            missing = set(self.card.scalars) - set(names)
            if missing:
                raise ValueError(f"card.scalars name unknown points: {sorted(missing)}")
            not_holding = [n for n in self.card.scalars if self.point(n).location()[0] != "holding"]
            if not_holding:
                raise ValueError(f"card.scalars must be holding registers: {not_holding}")
        group_names = [g.name for g in self.groups]
        if len(set(group_names)) != len(group_names):
            raise ValueError("duplicate group names")

    def bus_key(self) -> tuple[str, str, int]:
        """Devices with the same key share one connection (TCP) or one serial line (RTU)."""
        if self.transport == "rtu":
            return ("rtu", self.serial_port, 0)
        return ("tcp", self.host, self.port)

    def line_settings(self) -> tuple[int, str, int, int]:
        """(baudrate, parity, stopbits, bytesize): what every device on one serial bus must agree on."""
        return (self.baudrate, self.parity, self.stopbits, self.bytesize)

    def interval_of(self, group: str) -> float:
        """Poll interval of a group in seconds."""
        for g in self.groups:
            if g.name == group:
                return g.interval_s
        return self.poll_interval_s

    def point(self, name: str) -> ModbusPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"device {self.name} has no point {name!r}")


def _f32(name: str, address: int, unit: str, *, writable: bool = False) -> ModbusPoint:
    return ModbusPoint(name=name, address=address, type="f32", unit=unit, writable=writable)


def _u16(name: str, address: int, unit: str = "", *, writable: bool = False,
         type: PointType = "u16") -> ModbusPoint:
    return ModbusPoint(name=name, address=address, type=type, unit=unit, writable=writable)


def a11_points() -> tuple[ModbusPoint, ...]:
    """The beam-pump scalars of the A11 map (domain.md §1.3; screw-pump 40430/40432 left out).

    §1.3 lists 29 items for a beam pump; 28 are points here. The 29th, the card acquisition time
    (40985, 6 registers), is not a single-typed value: the card capture decodes it into
    `CardReading.acquired_at_ns` (see `CardSpec`).
    """
    return (
        _f32("tubing_pressure", 40300, "MPa"),
        _f32("casing_pressure", 40302, "MPa"),
        _f32("back_pressure", 40304, "MPa"),
        _f32("wellhead_temperature", 40306, "degC"),
        _u16("run_status", 40317),
        _u16("start_stop", 40320, writable=True),
        _f32("water_cut", 40327, "%"),
        _f32("dynamic_fluid_level", 40329, "m"),
        _f32("current_a_phase", 40351, "A"),
        _f32("current_b_phase", 40353, "A"),
        _f32("current_c_phase", 40355, "A"),
        _f32("voltage_a_phase", 40357, "V"),
        _f32("voltage_b_phase", 40359, "V"),
        _f32("voltage_c_phase", 40361, "V"),
        _f32("active_energy", 40363, "kWh"),
        _f32("reactive_energy", 40365, "kvarh"),
        _f32("active_power", 40367, "kW"),
        _f32("reactive_power", 40369, "kvar"),
        _f32("reverse_power", 40371, "kW"),
        _f32("power_factor", 40373, ""),
        _f32("vfd_set_frequency", 40402, "Hz", writable=True),
        _f32("vfd_running_frequency", 40404, "Hz"),
        _u16("card_interval", 40981, "min", writable=True),
        _u16("card_trigger", 40982, writable=True, type="i16"),
        _u16("card_set_points", 40983, writable=True),
        _u16("card_measured_points", 40984),
        _f32("spm", 40991, "1/min"),
        _f32("stroke_length", 40993, "m"),
    )


A11_CARD_SCALARS: tuple[str, ...] = tuple(p.name for p in a11_points())


def a11_card_spec(*, interval_s: float = 1800.0, utc_offset_h: float = 8.0) -> CardSpec:
    """The default A11 card: curves at 41001/41251/41501/41751 (250 x int16, x0.01), n at 40984."""
    return CardSpec(interval_s=interval_s, utc_offset_h=utc_offset_h, scalars=A11_CARD_SCALARS)


def a11_device(name: str, host: str, port: int = 502, unit_id: int = 1, *,
               poll_interval_s: float = 10.0, card_interval_s: float = 1800.0,
               timeout_s: float = 1.0) -> ModbusDevice:
    """A device with the default A11 map and card."""
    return ModbusDevice(name=name, host=host, port=port, unit_id=unit_id, timeout_s=timeout_s,
                        poll_interval_s=poll_interval_s, points=a11_points(),
                        card=a11_card_spec(interval_s=card_interval_s))
