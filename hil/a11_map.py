"""The A11 holding-register layout the wellsite simulator serves, derived from the driver's default map.

One source of truth: the simulator encodes with the same `ModbusPoint`s and `CardSpec` the agent
decodes with (drivers.modbus.config), so a vendor variant is a different `A11Map`, not new code.
Addresses here are 0-based PDU addresses of the holding table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.modbus.config import CardSpec, ModbusPoint, a11_card_spec, a11_points, modicon_to_pdu


def _pdu(address: int) -> int:
    return modicon_to_pdu(address)[1]


@dataclass(frozen=True, slots=True)
class A11Map:
    points: tuple[ModbusPoint, ...] = field(default_factory=a11_points)
    card: CardSpec = field(default_factory=a11_card_spec)

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
        ends += [p.location()[1] + p.register_count() for p in self.points]
        ends.append(self.time_pdu + 6)
        return max(ends)

    def writable_pdus(self) -> set[int]:
        out: set[int] = set()
        for p in self.points:
            if p.writable:
                start = p.location()[1]
                out.update(range(start, start + p.register_count()))
        return out
