"""Deterministic parametric dynamometer-card generator for simulated beam-pump wells.

Model (domain.md §1.8, simplified): crank angle theta runs 0..pi on the upstroke and pi..2pi on the
downstroke; polished-rod position = S/2 * (1 - cos theta). The pump-card load sits at the buoyant rod
weight W on the downstroke and at W + F (fluid load) on the upstroke, with smoothstep transfers at
the turnarounds. Where the downstroke transfer happens encodes the working condition:
  1202 normal              transfer right after the top (fill ~0.95)
  1203 incomplete fillage  abrupt drop (< 1/5 stroke) at fill 0.55..0.85 of the stroke
  1206 pumped off          abrupt drop at fill 0.25..0.5
  1209 gas interference    gradual transfer spread over > 0.4 of the stroke
  1302 stopped             zero-length stroke, constant static load, no current or power
The surface load adds an inertia term proportional to SPM^2, a damped rod oscillation and 1 % noise,
then is quantised to the A11 register scaling (0.01 m, 0.01 kN, 0.01 A, 0.01 kW). Motor current and
power follow the net torque (load minus counterbalance times rod velocity); power goes negative where
the rods drive the motor. Wells without a power meter have no current/power curves.

Everything is a pure function of (well id, seed, timestamp, condition): a SHA-256 of those seeds a
private `random.Random`, so the same inputs give byte-identical cards on every platform.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

CONDITIONS: dict[int, str] = {
    1202: "normal",
    1203: "incomplete fillage",
    1206: "pumped off",
    1209: "gas interference",
    1302: "stopped",
}
G_M_S2 = 9.81


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True, slots=True)
class WellProfile:
    """Fixed properties of one simulated well (a pure function of well id and seed)."""

    well_id: str
    spm: float  # strokes per minute at 50 Hz
    stroke_m: float
    rod_weight_kn: float  # buoyant rod weight
    fluid_load_kn: float
    has_power_meter: bool
    motor_no_load_a: float


def well_profile(well_id: str, seed: int) -> WellProfile:
    r = _rng("profile", well_id, seed)
    return WellProfile(
        well_id=well_id,
        spm=round(r.uniform(2.2, 4.2), 2),
        stroke_m=round(r.uniform(1.5, 5.0), 2),
        rod_weight_kn=round(r.uniform(10.0, 24.0), 2),
        fluid_load_kn=round(r.uniform(6.0, 20.0), 2),
        has_power_meter=r.random() < 0.8,
        motor_no_load_a=round(r.uniform(3.0, 6.0), 2),
    )


@dataclass(frozen=True, slots=True)
class Card:
    well_id: str
    condition: int
    ts_ns: int
    n_points: int
    spm: float
    stroke_m: float
    fill: float  # the fillage the card was generated with (0..1)
    position_m: tuple[float, ...]
    load_kn: tuple[float, ...]
    current_a: tuple[float, ...] | None
    power_kw: tuple[float, ...] | None


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


def generate_card(well_id: str, seed: int, ts_ns: int, condition: int = 1202, *, n_points: int = 200,
                  spm_factor: float = 1.0, noise: float = 0.01) -> Card:
    """One card of n_points; ValueError for an unknown condition or n_points outside 50..250."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition}; known: {sorted(CONDITIONS)}")
    if not 50 <= n_points <= 250:
        raise ValueError("n_points must be in 50..250")
    prof = well_profile(well_id, seed)
    r = _rng("card", well_id, seed, ts_ns, condition, n_points)
    w, f = prof.rod_weight_kn, prof.fluid_load_kn
    if condition == 1302:
        static = round(w + f + r.uniform(-0.2, 0.2), 2)
        zeros = tuple(0.0 for _ in range(n_points))
        meter = zeros if prof.has_power_meter else None
        return Card(well_id, condition, ts_ns, n_points, 0.0, 0.0, 0.0, zeros,
                    tuple(static for _ in range(n_points)), meter, meter)
    spm = round(max(2.0, min(6.0, prof.spm * spm_factor * r.uniform(0.99, 1.01))), 2)
    stroke = prof.stroke_m
    if condition == 1202:
        fill, width = r.uniform(0.92, 0.98), 0.08
    elif condition == 1203:
        fill, width = r.uniform(0.55, 0.85), 0.1
    elif condition == 1206:
        fill, width = r.uniform(0.25, 0.5), 0.1
    else:  # 1209: gas compresses first, so the load comes off over a long part of the stroke
        fill, width = r.uniform(0.55, 0.8), r.uniform(0.45, 0.6)
    omega = 2 * math.pi * spm / 60.0
    rod_mass_t = w / G_M_S2  # kN / (m/s^2) = tonnes
    counterbalance = w + f / 2
    osc_amp, osc_phase = r.uniform(0.02, 0.05) * f, r.uniform(0, 2 * math.pi)
    pos, load, cur, pwr = [], [], [], []
    for k in range(n_points):
        theta = 2 * math.pi * k / n_points
        x = stroke / 2 * (1 - math.cos(theta))  # 0 at bottom, stroke at top
        if theta < math.pi:  # upstroke: fluid load picked up over the first 8 % of travel
            frac = _smoothstep((x / stroke) / 0.08)
        else:  # downstroke: the fluid load comes off around the fill position, over `width`
            top_gap = (stroke - x) / stroke  # travel since the top, 0..1
            frac = 1.0 - _smoothstep((top_gap - (1 - fill) + width / 2) / width)
        pump = w + f * frac
        inertia = rod_mass_t * (stroke / 2) * omega**2 * math.cos(theta)
        ringing = osc_amp * math.exp(-1.5 * (theta % math.pi)) * math.sin(6 * theta + osc_phase)
        surface = pump + inertia + ringing
        surface *= 1 + r.gauss(0.0, noise)
        surface = min(60.0, max(5.0, surface))
        velocity = stroke / 2 * omega * math.sin(theta)  # m/s
        power_kw = (surface - counterbalance) * velocity / 0.85 + 0.4
        current = prof.motor_no_load_a + abs(power_kw) * 2.2
        pos.append(round(x, 2))
        load.append(round(surface, 2))
        pwr.append(round(max(-30.0, min(60.0, power_kw)), 2))
        cur.append(round(min(40.0, current), 2))
    return Card(well_id, condition, ts_ns, n_points, spm, stroke, fill, tuple(pos), tuple(load),
                tuple(cur) if prof.has_power_meter else None, tuple(pwr) if prof.has_power_meter else None)


def fill_coefficient(position_m: tuple[float, ...], load_kn: tuple[float, ...]) -> float:
    """A classifier feature from the card alone: the share of the downstroke travelled before the load
    falls below the midpoint of its range (1 = full pump, lower = incomplete fillage / pump-off).

    The downstroke is found from the maximum-position index (domain.md §7 item 15), not array order.
    """
    if not position_m or max(position_m) - min(position_m) <= 0:
        return 0.0
    top = max(range(len(position_m)), key=lambda i: position_m[i])
    bottom_pos, top_pos = min(position_m), position_m[top]
    mid = (max(load_kn) + min(load_kn)) / 2
    n = len(position_m)
    for step in range(n):
        i = (top + step) % n
        if load_kn[i] < mid:
            travelled = (top_pos - position_m[i]) / (top_pos - bottom_pos)
            return round(1.0 - travelled, 3)
    return 0.0
