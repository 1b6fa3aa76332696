"""`edge-hil opcua-station`: an OPC UA server (asyncua) modelling an oil-field gathering station.

Address space, namespace `urn:fieldgate:hil:opcua-station:model` (index 2 on a fresh server):

    Objects/GatheringStation                              ns=2;s=Station
        Heartbeat          UInt32   +1 per update         ns=2;s=Station.Heartbeat
        Well01 .. WellNN                                  ns=2;s=Well01
            TubingPressure   Double  MPa                  ns=2;s=Well01.TubingPressure
            CasingPressure   Double  MPa                  ns=2;s=Well01.CasingPressure
            Temperature      Double  degC                 ns=2;s=Well01.Temperature
            FlowRate         Double  m3/d                 ns=2;s=Well01.FlowRate
            RunStatus        Boolean running or stopped   ns=2;s=Well01.RunStatus
            Setpoint         Double  m3/d, writable       ns=2;s=Well01.Setpoint

Every `update_interval_s` the process values take a seeded random walk: pressures and temperature
wander around their well's operating point, flow follows the setpoint while the well runs and decays
to zero when it stops, and a well occasionally trips and restarts. `update_interval_s=None` freezes
the simulation so tests drive values themselves (`set_value`, with any StatusCode and timestamp).

Security: `security` lists the endpoints offered ("None", "Basic256Sha256_Sign",
"Basic256Sha256_SignAndEncrypt"); a server certificate is generated into `cert_dir` (a temporary
directory when not given). `users` ({name: password}) turns anonymous access off and admits only
those users. `max_subscriptions=0` emulates a Nano/Micro embedded server that refuses subscriptions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import random
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.status_codes import StatusCodes

from drivers.opcua.certs import ensure_certificate

NAMESPACE = "urn:fieldgate:hil:opcua-station:model"  # distinct from the ApplicationUri (index 1)
APPLICATION_URI = "urn:fieldgate:hil:opcua-station"
SECURITY_CHOICES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
VARIABLES = ("TubingPressure", "CasingPressure", "Temperature", "FlowRate", "RunStatus", "Setpoint")

_log = logging.getLogger(__name__)


def _nid(identifier: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(identifier), ua.Int16(ns))


def _data_value(
    value: Any, vtype: ua.VariantType, *, code: int = 0, source_ts: dt.datetime | None = None
) -> ua.DataValue:
    dv = ua.DataValue(Value=ua.Variant(value, vtype), StatusCode=ua.StatusCode(ua.UInt32(code)))
    # asyncua annotates timestamps with its DateTime subclass; any aware datetime encodes the same.
    dv.SourceTimestamp = source_ts  # type: ignore[assignment]
    dv.ServerTimestamp = dt.datetime.now(dt.UTC)  # type: ignore[assignment]
    return dv


class _PasswordUsers(UserManager):
    """asyncua user manager: only the configured users, with their passwords, get in."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)
        self.refused = 0  # logins turned away, so rigs can watch a client retrying
        self.refusal = asyncio.Event()  # set on each refusal (get_user runs on the server's loop)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        self.refused += 1
        self.refusal.set()
        return None


@dataclass
class _Well:
    """Operating point and live state of one simulated well."""

    tubing_mpa: float
    casing_mpa: float
    temperature_c: float
    flow_m3d: float
    running: bool
    setpoint_m3d: float


class OpcUaStation:
    """A gathering station OPC UA server on host:port; `start()`/`stop()` or `async with`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        wells: int = 4,
        security: Sequence[str] = ("None",),
        users: Mapping[str, str] | None = None,
        cert_dir: str | Path | None = None,
        update_interval_s: float | None = 1.0,
        seed: int = 1,
        max_subscriptions: int | None = None,
    ) -> None:
        if not 1 <= wells <= 999:
            raise ValueError("wells must be in 1..999")
        unknown = set(security) - set(SECURITY_CHOICES)
        if unknown or not security:
            raise ValueError(f"security must be a non-empty subset of {sorted(SECURITY_CHOICES)}")
        if update_interval_s is not None and update_interval_s <= 0:
            raise ValueError("update_interval_s must be > 0 (or None to freeze the simulation)")
        self.host, self.port, self.wells = host, port, wells
        self.endpoint = f"opc.tcp://{host}:{port}/fieldgate/station"
        self._security = tuple(security)
        self._users = dict(users or {})
        self._cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._update_interval_s = update_interval_s
        self._rng = random.Random(seed)
        self._max_subscriptions = max_subscriptions
        self._server: Server | None = None
        self._user_manager: _PasswordUsers | None = None
        self._ns = 0
        self._state: dict[int, _Well] = {}
        self._heartbeat = 0
        self._task: asyncio.Task[None] | None = None
        self.server_certificate: Path | None = None  # DER file clients may pin

    # -- addressing (what clients configure) ---------------------------------------------------

    @property
    def refused_logins(self) -> int:
        """How many sessions were refused for a wrong user name or password since start."""
        return self._user_manager.refused if self._user_manager is not None else 0

    async def wait_refused_logins(self, count: int) -> None:
        """Return once `refused_logins` has reached count (wrap in asyncio.timeout)."""
        manager = self._user_manager
        if manager is None:
            raise RuntimeError("station has no users, so it refuses no logins")
        while manager.refused < count:
            manager.refusal.clear()
            await manager.refusal.wait()

    @property
    def namespace_index(self) -> int:
        return self._ns

    def node_id(self, well: int, variable: str) -> str:
        """NodeId string of a well variable, e.g. node_id(1, "Setpoint") -> "ns=2;s=Well01.Setpoint"."""
        if variable not in VARIABLES:
            raise KeyError(f"unknown variable {variable!r}; one of {VARIABLES}")
        return f"ns={self._ns};s={self.well_name(well)}.{variable}"

    def browse_path(self, well: int, variable: str) -> str:
        """Browse path from the Objects folder, e.g. "2:GatheringStation/2:Well01/2:Setpoint"."""
        if variable not in VARIABLES:
            raise KeyError(f"unknown variable {variable!r}; one of {VARIABLES}")
        ns = self._ns
        return f"{ns}:GatheringStation/{ns}:{self.well_name(well)}/{ns}:{variable}"

    def well_name(self, well: int) -> str:
        if not 1 <= well <= self.wells:
            raise KeyError(f"well {well} outside 1..{self.wells}")
        return f"Well{well:02d}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> OpcUaStation:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Build the address space and listen; returns once clients can connect."""
        user_manager = _PasswordUsers(self._users) if self._users else None
        self._user_manager = user_manager
        server = Server(user_manager=user_manager)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("fieldgate HIL gathering station")
        await server.set_application_uri(APPLICATION_URI)
        server.set_security_policy([SECURITY_CHOICES[s] for s in self._security])
        if self._users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if any(s != "None" for s in self._security):
            if self._cert_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="opcua-station-")
                self._cert_dir = Path(self._tmp.name)
            cert, key = await asyncio.to_thread(
                ensure_certificate,
                self._cert_dir,
                APPLICATION_URI,
                self.host,
                server=True,
                common_name="fieldgate HIL station",
            )
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            self.server_certificate = cert
        if self._max_subscriptions is not None:
            server.iserver.max_subscriptions = self._max_subscriptions
        self._ns = await server.register_namespace(NAMESPACE)
        await self._build(server)
        await server.start()
        self._server = server
        if self._update_interval_s is not None:
            self._task = asyncio.create_task(
                self._simulate(self._update_interval_s), name=f"opcua-station:{self.port}:simulate"
            )

    async def stop(self) -> None:
        """Stop simulating and listening; connected clients see the connection close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._cert_dir = None

    async def _build(self, server: Server) -> None:
        ns = self._ns
        station = await server.nodes.objects.add_object(_nid("Station", ns), f"{ns}:GatheringStation")
        await station.add_variable(
            _nid("Station.Heartbeat", ns), f"{ns}:Heartbeat", ua.Variant(0, ua.VariantType.UInt32)
        )
        for well in range(1, self.wells + 1):
            name = self.well_name(well)
            obj = await station.add_object(_nid(name, ns), f"{ns}:{name}")
            state = _Well(
                tubing_mpa=round(self._rng.uniform(1.5, 3.5), 3),
                casing_mpa=round(self._rng.uniform(2.5, 5.0), 3),
                temperature_c=round(self._rng.uniform(30.0, 60.0), 2),
                flow_m3d=0.0,
                running=True,
                setpoint_m3d=round(self._rng.uniform(20.0, 60.0), 1),
            )
            state.flow_m3d = state.setpoint_m3d
            self._state[well] = state
            initial: dict[str, ua.Variant] = {
                "TubingPressure": ua.Variant(state.tubing_mpa, ua.VariantType.Double),
                "CasingPressure": ua.Variant(state.casing_mpa, ua.VariantType.Double),
                "Temperature": ua.Variant(state.temperature_c, ua.VariantType.Double),
                "FlowRate": ua.Variant(state.flow_m3d, ua.VariantType.Double),
                "RunStatus": ua.Variant(state.running, ua.VariantType.Boolean),
                "Setpoint": ua.Variant(state.setpoint_m3d, ua.VariantType.Double),
            }
            for variable, variant in initial.items():
                node = await obj.add_variable(_nid(f"{name}.{variable}", ns), f"{ns}:{variable}", variant)
                if variable == "Setpoint":
                    await node.set_writable()

    # -- values --------------------------------------------------------------------------------

    def _server_or_raise(self) -> Server:
        if self._server is None:
            raise RuntimeError("station is not started")
        return self._server

    async def set_value(
        self,
        well: int,
        variable: str,
        value: float | bool | int,
        *,
        status: str | int = "Good",
        source_ts: dt.datetime | None = None,
    ) -> None:
        """Set a variable as the device would: any StatusCode (name or number), optional timestamp."""
        server = self._server_or_raise()
        node = server.get_node(self.node_id(well, variable))
        vtype = await node.read_data_type_as_variant_type()
        code = getattr(StatusCodes, status) if isinstance(status, str) else status
        await server.write_attribute_value(
            node.nodeid, _data_value(value, vtype, code=code, source_ts=source_ts or dt.datetime.now(dt.UTC))
        )

    async def read_value(self, well: int, variable: str) -> Any:
        server = self._server_or_raise()
        return await server.get_node(self.node_id(well, variable)).read_value()

    async def _simulate(self, interval_s: float) -> None:
        server = self._server_or_raise()
        while True:
            await asyncio.sleep(interval_s)
            self._heartbeat += 1
            now = dt.datetime.now(dt.UTC)
            await server.write_attribute_value(
                _nid("Station.Heartbeat", self._ns),
                _data_value(self._heartbeat, ua.VariantType.UInt32, source_ts=now),
            )
            for well, s in self._state.items():
                await self._step(server, well, s, now)

    async def _step(self, server: Server, well: int, s: _Well, now: dt.datetime) -> None:
        rng = self._rng
        name = self.well_name(well)
        # Setpoint may have been written by a client since the last step.
        setpoint = await server.get_node(_nid(f"{name}.Setpoint", self._ns)).read_value()
        s.setpoint_m3d = float(setpoint)
        if s.running and rng.random() < 0.002:  # a trip every ~500 updates per well
            s.running = False
        elif not s.running and rng.random() < 0.05:
            s.running = True
        target = s.setpoint_m3d if s.running else 0.0
        noise = rng.gauss(0.0, 0.3) if s.running else 0.0
        s.flow_m3d = max(0.0, s.flow_m3d + 0.2 * (target - s.flow_m3d) + noise)
        s.tubing_mpa = max(0.1, s.tubing_mpa + rng.gauss(0.0, 0.01))
        s.casing_mpa = max(0.1, s.casing_mpa + rng.gauss(0.0, 0.01))
        s.temperature_c += rng.gauss(0.0, 0.05)
        for variable, value, vtype in (
            ("TubingPressure", round(s.tubing_mpa, 3), ua.VariantType.Double),
            ("CasingPressure", round(s.casing_mpa, 3), ua.VariantType.Double),
            ("Temperature", round(s.temperature_c, 2), ua.VariantType.Double),
            ("FlowRate", round(s.flow_m3d, 2), ua.VariantType.Double),
            ("RunStatus", s.running, ua.VariantType.Boolean),
        ):
            await server.write_attribute_value(
                _nid(f"{name}.{variable}", self._ns), _data_value(value, vtype, source_ts=now)
            )


# -- CLI ---------------------------------------------------------------------------------------


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return name, password


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("opcua-station", help="run a simulated OPC UA gathering station (asyncua server)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4840, help="TCP port (default 4840)")
    p.add_argument("--wells", type=int, default=4, help="wells in the station (default 4)")
    p.add_argument(
        "--security",
        action="append",
        choices=sorted(SECURITY_CHOICES),
        help="endpoint to offer; repeat for several (default: None only)",
    )
    p.add_argument(
        "--user",
        action="append",
        type=_user,
        default=[],
        metavar="NAME:PASSWORD",
        help="admit this user (repeatable); disables anonymous access",
    )
    p.add_argument("--cert-dir", help="server certificate directory (default: a temp dir)")
    p.add_argument("--update-interval-s", type=float, default=1.0, help="simulation step (default 1 s)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    p.set_defaults(main=main)


async def main(args: argparse.Namespace) -> int:
    station = OpcUaStation(
        args.host,
        args.port,
        wells=args.wells,
        security=args.security or ("None",),
        users=dict(args.user),
        cert_dir=args.cert_dir,
        update_interval_s=args.update_interval_s,
        seed=args.seed,
    )
    async with station:
        print(
            f"opcua-station listening on {station.endpoint} (namespace {station.namespace_index}, "
            f"{station.wells} wells)",
            flush=True,
        )
        if station.server_certificate is not None:
            print(f"opcua-station server certificate: {station.server_certificate}", flush=True)
        await asyncio.Event().wait()  # until cancelled (Ctrl-C)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="opcua-station")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["opcua-station", *sys.argv[1:]])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(ns))
