"""Deterministic parametric dynamometer-card generator for simulated beam-pump wells.

Model (domain.md §1.8, simplified): crank angle theta runs 0..pi on the upstroke and pi..2pi on the
downstroke; polished-rod position = S/2 * (1 - cos theta). The pump-card load sits at the buoyant rod
weight W on the downstroke and at W + F (fluid load) on the upstroke, with smoothstep transfers at
the turnarounds. How and where the transfers happen encodes the working condition (cosog codes,
domain.md §1.7), each with the feature of `card_features` it moves relative to 1202 normal:
  1202 normal                 transfer right after the top (fill ~0.95)
  1203 incomplete fillage     abrupt drop (< 1/5 stroke) at fill 0.72..0.88      fill lower
  1204 insufficient supply    abrupt drop at fill 0.5..0.7                       fill lower still
  1206 pumped off             abrupt drop at fill 0.25..0.45                     fill lowest
  1208 gas lock               gas only compresses: 10-20 % of F picked up        load range small
  1209 gas interference       gradual transfer spread over > 0.4 of the stroke   fill lower
  1212 travelling valve leak  slow pick-up, load leaks off during the upstroke   upstroke loss high
  1213 standing valve leak    load comes off slowly over 0.3-0.4 of the stroke   downstroke load high
  1219 pump tagging           plunger hits bottom: sharp load drop near bottom   minimum load low
  1222 rod parted             only the rods above the break: 25-50 % of W, no F  maximum load < W
  1223 stuck pump             rods stretch elastically, load follows position    area ~0, corr ~1
  1232 acquisition fault      load cell dead: load curve reads 0                 load range 0
  1302 stopped                zero-length stroke, constant static load, no current or power

Field artefacts (domain.md §1.1, §7 item 10) are added on request (`Artefacts`): extra load noise,
duplicated samples (a sample repeats its predecessor), reversed samples (two neighbours swapped),
gaps (a sample drops out and reads 0) and a frozen load sensor (the whole load curve repeats its
first value). Each card counts what was injected in `Card.artefacts`.
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
    1204: "insufficient supply",
    1206: "pumped off",
    1208: "gas lock",
    1209: "gas interference",
    1212: "travelling valve leak",
    1213: "standing valve leak",
    1219: "pump tagging",
    1222: "rod parted",
    1223: "stuck pump",
    1232: "acquisition fault",
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
class Artefacts:
    """Field artefacts to inject: per-sample rates (0..1) and a per-card frozen-sensor rate."""

    noise: float = 0.0  # extra relative load noise (sigma), e.g. 0.01..0.03
    duplicate_rate: float = 0.0
    reverse_rate: float = 0.0
    gap_rate: float = 0.0
    frozen_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise", "duplicate_rate", "reverse_rate", "gap_rate", "frozen_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in 0..1")

    @property
    def any(self) -> bool:
        return any((self.noise, self.duplicate_rate, self.reverse_rate, self.gap_rate, self.frozen_rate))


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
    artefacts: tuple[tuple[str, int], ...] = ()  # (kind, count) injected into this card


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


def generate_card(well_id: str, seed: int, ts_ns: int, condition: int = 1202, *, n_points: int = 200,
                  spm_factor: float = 1.0, noise: float = 0.01, artefacts: Artefacts | None = None) -> Card:
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
    pickup, pick_share, tv_leak, tag_kn = 0.08, 1.0, 0.0, 0.0
    if condition in (1202, 1219):
        fill, width = r.uniform(0.92, 0.98), 0.08
        if condition == 1219:  # the plunger hits the pump bottom at the end of the downstroke
            tag_kn = r.uniform(0.35, 0.55) * w
    elif condition == 1203:
        fill, width = r.uniform(0.72, 0.88), 0.1
    elif condition == 1204:
        fill, width = r.uniform(0.5, 0.7), 0.1
    elif condition == 1206:
        fill, width = r.uniform(0.25, 0.45), 0.1
    elif condition == 1208:  # gas lock: the gas only compresses and expands, the valves barely open
        fill, width, pick_share = 0.5, 0.5, r.uniform(0.1, 0.2)
    elif condition == 1212:  # travelling valve leak: fluid slips back while the plunger rises
        fill, width, pickup, tv_leak = r.uniform(0.9, 0.96), 0.08, 0.3, r.uniform(0.3, 0.5)
    elif condition == 1213:  # standing valve leak: the barrel refills through the SV, load comes off late
        fill, width = r.uniform(0.7, 0.8), r.uniform(0.3, 0.4)
    elif condition == 1222:  # rod parted: only the rods above the break hang on the polished rod
        w, f = w * r.uniform(0.25, 0.5), 0.0
        fill, width = 0.95, 0.08
    elif condition == 1223:  # stuck pump: handled below (load follows position)
        fill, width = 0.0, 0.1
    elif condition == 1232:  # acquisition fault: the card's shape is normal, the load cell is dead
        fill, width = r.uniform(0.92, 0.98), 0.08
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
        if theta < math.pi:  # upstroke: fluid load picked up over the first `pickup` of travel
            frac = _smoothstep((x / stroke) / pickup) * (1 - tv_leak * x / stroke)
        else:  # downstroke: the fluid load comes off around the fill position, over `width`
            top_gap = (stroke - x) / stroke  # travel since the top, 0..1
            frac = 1.0 - _smoothstep((top_gap - (1 - fill) + width / 2) / width)
        pump = w + f * frac * pick_share
        if condition == 1223:
            pump = w + 1.5 * f * x / stroke  # elastic stretch against a stuck plunger: no loop
        if tag_kn and theta > 1.9 * math.pi:
            pump -= tag_kn * math.sin((theta - 1.9 * math.pi) / (0.1 * math.pi) * math.pi)
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
    if condition == 1232:
        load = [0.0] * n_points
    counts: tuple[tuple[str, int], ...] = ()
    if artefacts is not None and artefacts.any:
        counts = _inject(artefacts, _rng("artefacts", well_id, seed, ts_ns, n_points), pos, load)
    return Card(well_id, condition, ts_ns, n_points, spm, stroke, fill, tuple(pos), tuple(load),
                tuple(cur) if prof.has_power_meter else None, tuple(pwr) if prof.has_power_meter else None,
                counts)


def _inject(a: Artefacts, r: random.Random, pos: list[float],
            load: list[float]) -> tuple[tuple[str, int], ...]:
    """Apply artefacts in place (noise, then per-sample faults, then a frozen sensor); return counts."""
    n = len(pos)
    dup = rev = gap = 0
    if a.noise:
        for i in range(n):
            load[i] = round(min(60.0, max(0.0, load[i] * (1 + r.gauss(0.0, a.noise)))), 2)
    for i in range(1, n):
        u = r.random()
        if u < a.duplicate_rate:
            pos[i], load[i] = pos[i - 1], load[i - 1]
            dup += 1
        elif u < a.duplicate_rate + a.reverse_rate:
            pos[i], pos[i - 1] = pos[i - 1], pos[i]
            load[i], load[i - 1] = load[i - 1], load[i]
            rev += 1
        elif u < a.duplicate_rate + a.reverse_rate + a.gap_rate:
            pos[i] = load[i] = 0.0
            gap += 1
    frozen = int(r.random() < a.frozen_rate)
    if frozen:
        load[:] = [load[0]] * n
    return (("duplicated", dup), ("reversed", rev), ("gap", gap), ("frozen", frozen))


@dataclass(frozen=True, slots=True)
class CardFeatures:
    """Simple classifier features of a surface card (all derived from the arrays alone)."""

    fill: float  # see fill_coefficient
    area_kn_m: float  # enclosed area (shoelace), ~ work per stroke
    load_range_kn: float
    min_load_kn: float
    max_load_kn: float
    upstroke_loss: float  # (peak upstroke load - load at the top) / load range
    downstroke_mean_kn: float
    corr: float  # Pearson correlation of load with position (1 = load just follows position)


def card_features(position_m: tuple[float, ...], load_kn: tuple[float, ...]) -> CardFeatures:
    n = len(position_m)
    area = abs(sum(position_m[i] * load_kn[(i + 1) % n] - position_m[(i + 1) % n] * load_kn[i]
                   for i in range(n))) / 2 if n else 0.0
    lo, hi = (min(load_kn), max(load_kn)) if n else (0.0, 0.0)
    top = max(range(n), key=lambda i: position_m[i]) if n else 0
    up = load_kn[: top + 1]
    loss = (max(up) - load_kn[top]) / (hi - lo) if n and hi > lo else 0.0
    down = load_kn[top:]
    mp, ml = (sum(position_m) / n, sum(load_kn) / n) if n else (0.0, 0.0)
    sp = math.sqrt(sum((p - mp) ** 2 for p in position_m))
    sl = math.sqrt(sum((v - ml) ** 2 for v in load_kn))
    cov = sum((p - mp) * (v - ml) for p, v in zip(position_m, load_kn, strict=True))
    return CardFeatures(fill=fill_coefficient(position_m, load_kn), area_kn_m=round(area, 3),
                        load_range_kn=round(hi - lo, 3), min_load_kn=lo, max_load_kn=hi,
                        upstroke_loss=round(loss, 3),
                        downstroke_mean_kn=round(sum(down) / len(down), 3) if down else 0.0,
                        corr=round(cov / (sp * sl), 4) if sp and sl else 0.0)


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
