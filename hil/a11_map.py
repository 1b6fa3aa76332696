"""The A11 holding-register layout the wellsite simulator serves, derived from the driver's default map.

One source of truth: the simulator encodes with the same `ModbusPoint`s and `CardSpec` the agent
decodes with (drivers.modbus.config), so a vendor variant is a different `A11Map`, not new code.
Addresses here are 0-based PDU addresses of the holding table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from drivers.modbus.config import (
    CardSpec,
    ModbusDevice,
    ModbusPoint,
    a11_card_spec,
    a11_points,
    modicon_to_pdu,
)


def _pdu(address: int) -> int:
    return modicon_to_pdu(address)[1]


@dataclass(frozen=True, slots=True)
class A11Map:
    """Points (holding registers and coils) and card layout of one RTU model."""

    points: tuple[ModbusPoint, ...] = field(default_factory=a11_points)
    card: CardSpec = field(default_factory=a11_card_spec)

    def holding_points(self) -> tuple[ModbusPoint, ...]:
        return tuple(p for p in self.points if p.location()[0] == "holding")

    def coil_points(self) -> tuple[ModbusPoint, ...]:
        return tuple(p for p in self.points if p.location()[0] == "coil")

    def mapped_pdus(self) -> set[int]:
        """Holding registers a strict device answers: points, acquisition time and the curve blocks."""
        out: set[int] = set()
        for p in self.holding_points():
            start = p.location()[1]
            out.update(range(start, start + p.register_count()))
        out.update(range(self.time_pdu, self.time_pdu + 6))
        out.add(self.n_points_pdu)
        for start, _ in self.curve_pdus().values():
            out.update(range(start, start + self.card.block_registers))
        return out

    def device(self, name: str, **settings: object) -> ModbusDevice:
        """The agent-side device config that reads this map (settings: transport, host, unit_id, ...)."""
        return ModbusDevice(name=name, points=self.points, card=self.card, **settings)  # type: ignore[arg-type]

    def point(self, name: str) -> ModbusPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def pdu(self, name: str) -> int:
        return self.point(name).location()[1]

    @property
    def time_pdu(self) -> int:
        return _pdu(self.card.acquisition_time_register)

    @property
    def n_points_pdu(self) -> int:
        return _pdu(self.card.n_points_register)

    def curve_pdus(self) -> dict[str, tuple[int, float]]:
        """Curve name -> (PDU start, scale)."""
        return {name: (_pdu(addr), scale) for name, (addr, scale) in self.card.curves().items()}

    @property
    def size(self) -> int:
        """Registers from PDU 0 to the end of the last curve block: the simulator's image size."""
        ends = [start + self.card.block_registers for start, _ in self.curve_pdus().values()]
        ends += [p.location()[1] + p.register_count() for p in self.holding_points()]
        ends.append(self.time_pdu + 6)
        return max(ends)

    def writable_pdus(self) -> set[int]:
        out: set[int] = set()
        for p in self.holding_points():
            if p.writable:
                start = p.location()[1]
                out.update(range(start, start + p.register_count()))
        return out


def vendor_variant_map(*, position_scale: float = 0.001, extras: bool = True) -> A11Map:
    """A vendor variant of the A11 map, by configuration only (domain.md §1.3, §7 item 2).

    The cosog variant scales displacement x0.001 m and some RTUs add vendor scalars at 40006-40021
    and 47002-47024 [C2][C8]; here they are eight float32 at 40006.., eleven float32 at 47002.. and a
    status word at 47024. The card layout is otherwise the default one.
    """
    base = a11_card_spec()
    card = msgspec.structs.replace(base, position_scale=position_scale)
    points = a11_points()
    if extras:
        points += tuple(ModbusPoint(name=f"vendor_a{k}", address=40006 + 2 * k, type="f32") for k in range(8))
        points += tuple(ModbusPoint(name=f"vendor_b{k}", address=47002 + 2 * k, type="f32")
                        for k in range(11))
        points += (ModbusPoint(name="vendor_status", address=47024),)
    return A11Map(points=points, card=card)
