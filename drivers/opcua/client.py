"""The one adapter around asyncua's client: connect securely, resolve, read, write, monitor; our errors only.

Everything asyncua-specific stays here: NodeId parsing, DataValue/Variant conversion, StatusCode names,
subscription plumbing and exception translation. The driver above sees plain Python values, node ids
as strings, `Sample`s and the `OpcUaError` family, and decides what to do:

- `OpcUaConnectionError`: the link is gone or could not be set up (refused, timed out, security or
  identity rejected). Drop the link, mark the points BAD, reconnect after a back-off.
- `OpcUaServiceError`: the server answered one service with a Bad code; the link is fine. Report
  the affected points BAD (or fall back, e.g. from subscribe to poll) and carry on.

Connection loss is detected by asyncua's own supervisor (socket closed, or a ServerStatus probe every
`keepalive_s` unanswered); we run it with auto-reconnect off, so a loss ends this link for good and
the driver builds a fresh one — re-resolving browse paths and re-creating the subscription, which is
what a restarted server needs anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import socket
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent, Subscription
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.base import Value
from drivers.opcua.config import OpcUaServer

_log = logging.getLogger(__name__)

# Service results that mean the session or channel itself is unusable, not just this one request.
_LINK_CODES = frozenset(
    {
        StatusCodes.BadTimeout,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadConnectionClosed,
        StatusCodes.BadSecureChannelClosed,
        StatusCodes.BadSecureChannelIdInvalid,
        StatusCodes.BadSessionClosed,
        StatusCodes.BadSessionIdInvalid,
        StatusCodes.BadSessionNotActivated,
        StatusCodes.BadServerHalted,
        StatusCodes.BadShutdown,
        StatusCodes.BadNotConnected,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadTcpEndpointUrlInvalid,
        StatusCodes.BadIdentityTokenInvalid,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadSecurityPolicyRejected,
        StatusCodes.BadTooManySessions,
    }
)
# A monitored item refused for its filter is retried without one; the driver then applies the deadband.
FILTER_REFUSALS = frozenset(
    {
        "BadFilterNotAllowed",
        "BadMonitoredItemFilterUnsupported",
        "BadMonitoredItemFilterInvalid",
        "BadDeadbandFilterInvalid",
    }
)
_INT_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


class OpcUaError(Exception):
    """Base of our OPC UA errors; `reason` is what goes into a BAD reading."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class OpcUaConnectionError(OpcUaError):
    """No usable session: reconnect after a back-off."""


class OpcUaServiceError(OpcUaError):
    """One service failed with a Bad code; the session is still usable."""


def status_name(code: int) -> str:
    """Symbolic name of a StatusCode, ignoring its info bits (limit, overflow)."""
    return ua.status_codes.get_name_and_doc(code & 0xFFFF0000)[0]


def _translate(exc: BaseException) -> OpcUaError | None:
    """Our error for an asyncua/transport exception, or None when it is not one we know."""
    if isinstance(exc, OpcUaError):
        return exc
    if isinstance(exc, UaStatusCodeError | ServiceError):
        code = int(exc.code)
        cls = OpcUaConnectionError if code in _LINK_CODES else OpcUaServiceError
        return cls(status_name(code), str(exc))
    if isinstance(exc, TimeoutError):
        return OpcUaConnectionError("BadTimeout", "no answer in time")
    if isinstance(exc, ConnectionError | OSError):
        return OpcUaConnectionError("BadNotConnected", str(exc) or type(exc).__name__)
    if isinstance(exc, UaError):
        # asyncua raises plain UaError for protocol violations and endpoint mismatches (e.g. no
        # endpoint with the configured policy): nothing to retry within this link.
        return OpcUaConnectionError("BadCommunicationError", str(exc))
    return None


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (UaError, ConnectionError, OSError, TimeoutError) as exc:
        ours = _translate(exc)
        assert ours is not None  # every listed type translates
        raise ours from exc


@dataclass(frozen=True, slots=True)
class Sample:
    """One value as the server reported it: plain value, StatusCode, device timestamp."""

    value: Value
    status_code: int
    status_name: str
    source_ts_ns: int | None


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """A monitored item to create: key is the caller's name for it."""

    key: str
    node_id: str
    sampling_interval_s: float | None
    deadband_abs: float | None
    queue_size: int


def _ts_ns(ts: dt.datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # asyncua decodes UA DateTime as naive UTC
        ts = ts.replace(tzinfo=dt.UTC)
    # Integer arithmetic: float seconds would lose the 100 ns resolution of UA DateTime.
    delta = ts - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _plain(value: Any) -> tuple[Value, str | None]:
    """(plain value, None) or (None, reason) when the Variant has no plain scalar form."""
    if value is None or isinstance(value, bool | int | float | str):
        return value, None
    if isinstance(value, ua.LocalizedText):
        return value.Text, None
    if isinstance(value, ua.QualifiedName):
        return value.to_string(), None
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return stamp.isoformat(), None
    if isinstance(value, ua.NodeId):
        return value.to_string(), None
    if isinstance(value, bytes):
        return value.hex(), None
    return None, f"unsupported value type {type(value).__name__}"


def sample_of(dv: ua.DataValue) -> Sample:
    """Our Sample for an asyncua DataValue; SourceTimestamp preferred, ServerTimestamp as fallback."""
    code = int(dv.StatusCode.value) if dv.StatusCode is not None else 0
    raw = dv.Value.Value if dv.Value is not None else None
    value, problem = _plain(raw)
    if problem is not None and code & 0xC0000000 == 0:
        # A Good value we cannot represent is not usable downstream: report it as such.
        code = StatusCodes.BadDataEncodingUnsupported
        return Sample(None, code, problem, _ts_ns(dv.SourceTimestamp or dv.ServerTimestamp))
    return Sample(value, code, status_name(code), _ts_ns(dv.SourceTimestamp or dv.ServerTimestamp))


def _coerce(value: Value, vtype: ua.VariantType) -> Any:
    """Python value for a Variant of the node's own type; ValueError when it does not fit."""
    if value is None:
        raise ValueError("cannot write None")
    if vtype == ua.VariantType.Boolean:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{value!r} is not a Boolean")
    if vtype in _INT_RANGES:
        if isinstance(value, str) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        lo, hi = _INT_RANGES[vtype]
        as_int = int(value)
        if not lo <= as_int <= hi:
            raise ValueError(f"{value!r} outside {vtype.name} range {lo}..{hi}")
        return as_int
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, str):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if vtype == ua.VariantType.String:
        return str(value)
    raise ValueError(f"writing {vtype.name} variables is not supported")


def same_written(written: Value, read_back: Value, vtype_name: str) -> bool:
    """Read-back confirms the write; Float nodes store single precision, so compare at that width."""
    if isinstance(written, bool) or isinstance(read_back, bool):
        return bool(written) == bool(read_back) if isinstance(read_back, bool) else written == read_back
    if isinstance(written, int | float) and isinstance(read_back, int | float):
        if vtype_name == "Float":
            narrowed = struct.unpack("<f", struct.pack("<f", float(written)))[0]
            return bool(narrowed == read_back)
        return math.isclose(float(written), float(read_back), rel_tol=1e-12, abs_tol=0.0)
    return written == read_back


def _policy_class(name: str) -> type[security_policies.SecurityPolicy]:
    if name == "Basic256Sha256":
        return security_policies.SecurityPolicyBasic256Sha256
    raise OpcUaConnectionError("BadSecurityPolicyRejected", f"unsupported security policy {name}")


def default_application_uri() -> str:
    return f"urn:{socket.gethostname()}:fieldgate:edge-agent"


class OpcUaLink:
    """One connected session to one server. Use as `async with OpcUaLink(cfg, cert) as link:`.

    `cert` is (certificate path, key path) when the server config has a security policy.
    """

    def __init__(self, cfg: OpcUaServer, cert: tuple[Path, Path] | None = None) -> None:
        self._cfg = cfg
        self._cert = cert
        self._client = Client(cfg.endpoint, timeout=cfg.timeout_s, watchdog_intervall=cfg.keepalive_s)
        self._client.name = "fieldgate edge agent"
        self._client.application_uri = cfg.application_uri or default_application_uri()
        self._client.session_timeout = int(cfg.session_timeout_s * 1000)
        if cfg.username is not None:
            self._client.set_user(cfg.username)
        if cfg.password is not None:
            self._client.set_password(cfg.password)
        self._nodes: dict[str, ua.NodeId] = {}
        self._types: dict[str, ua.VariantType] = {}
        self._namespaces: list[str] | None = None
        self._subscription: Subscription | None = None
        self._handles: dict[int, str] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> OpcUaLink:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        cfg = self._cfg
        with _translated():
            if cfg.security_policy != "None":
                if self._cert is None:
                    raise OpcUaConnectionError("BadSecurityChecksFailed", "no client certificate")
                cert_path, key_path = self._cert
                await self._client.set_security(
                    _policy_class(cfg.security_policy),
                    str(cert_path),
                    str(key_path),
                    server_certificate=cfg.server_certificate,
                    mode=getattr(ua.MessageSecurityMode, cfg.security_mode),
                )
            await self._client.connect(auto_reconnect=False)

    async def close(self) -> None:
        """Close the session politely; a dead peer makes this a no-op, never an error."""
        if self._client.state in (UaClientState.DISCONNECTED, UaClientState.DISCONNECTING):
            # The supervisor already saw the loss; closing the session would wait for a timeout.
            self._client.uaclient.request_disconnect()
            with contextlib.suppress(UaError, ConnectionError, OSError, TimeoutError):
                await self._client.close_session()
            self._client.disconnect_socket()
            return
        with contextlib.suppress(UaError, ConnectionError, OSError, TimeoutError):
            await self._client.disconnect()

    @property
    def connected(self) -> bool:
        return self._client.state is UaClientState.CONNECTED

    async def wait_lost(self) -> None:
        """Return never; raise OpcUaConnectionError once the session is lost."""
        async with self._client.subscribe_state() as states:
            await states.wait_for_state(UaClientState.DISCONNECTED)
        raise OpcUaConnectionError("BadConnectionClosed", "connection to the server lost")

    # -- addressing ----------------------------------------------------------------------------

    async def _namespace_index(self, uri: str) -> int:
        if self._namespaces is None:
            with _translated():
                self._namespaces = list(await self._client.get_namespace_array())
        try:
            return self._namespaces.index(uri)
        except ValueError:
            raise OpcUaServiceError("BadNodeIdUnknown", f"server has no namespace {uri}") from None

    async def node_id(self, text: str) -> str:
        """Canonical `ns=<index>;...` form of a configured node id (namespace URIs resolved now)."""
        try:
            node = ua.NodeId.from_string(text)
        except (ValueError, UaError) as exc:
            raise OpcUaServiceError("BadNodeIdInvalid", str(exc)) from None
        uri = getattr(node, "NamespaceUri", None)
        if uri:
            node = ua.NodeId(node.Identifier, ua.Int16(await self._namespace_index(uri)), node.NodeIdType)
        elif isinstance(node, ua.ExpandedNodeId):
            node = ua.NodeId(node.Identifier, node.NamespaceIndex, node.NodeIdType)
        key = node.to_string()
        self._nodes[key] = node
        return key

    async def resolve_paths(self, paths: Sequence[tuple[tuple[int, str], ...]]) -> list[str | OpcUaError]:
        """TranslateBrowsePathsToNodeIds from the Objects folder, one call for all paths."""
        if not paths:
            return []
        browse_paths = []
        for elements in paths:
            rel = ua.RelativePath()
            for ns, name in elements:
                # asyncua annotates Boolean fields with a placeholder class; it encodes Python bools.
                rel.Elements.append(
                    ua.RelativePathElement(
                        ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences)),
                        IsInverse=False,  # type: ignore[arg-type]
                        IncludeSubtypes=True,  # type: ignore[arg-type]
                        TargetName=ua.QualifiedName(name, ns),
                    )
                )
            browse_paths.append(
                ua.BrowsePath(StartingNode=ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)), RelativePath=rel)
            )
        with _translated():
            results = await self._client.uaclient.translate_browsepaths_to_nodeids(browse_paths)
        out: list[str | OpcUaError] = []
        for result in results:
            code = int(result.StatusCode.value)
            # A complete match has RemainingPathIndex = UInt32 max; anything else stopped short.
            targets = [t for t in result.Targets if t.RemainingPathIndex == 0xFFFFFFFF]
            if code & 0x80000000 or not targets:
                out.append(OpcUaServiceError(status_name(code) if code else "BadNoMatch"))
                continue
            if len(targets) > 1:
                _log.warning("browse path matched %d nodes; using the first", len(targets))
            target = targets[0].TargetId
            if getattr(target, "ServerIndex", 0):  # asyncua decodes local targets as plain NodeIds
                out.append(OpcUaServiceError("BadNodeIdUnknown", "browse path leads to another server"))
                continue
            node = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
            key = node.to_string()
            self._nodes[key] = node
            out.append(key)
        return out

    def _node(self, node_id: str) -> ua.NodeId:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = ua.NodeId.from_string(node_id)
        return node

    # -- read / write --------------------------------------------------------------------------

    async def read(self, node_ids: Sequence[str]) -> list[Sample]:
        """Current values (MaxAge 0: from the device, not a cache), split by max_nodes_per_read."""
        samples: list[Sample] = []
        step = self._cfg.max_nodes_per_read
        for start in range(0, len(node_ids), step):
            params = ua.ReadParameters()
            params.MaxAge = 0
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            for node_id in node_ids[start : start + step]:
                params.NodesToRead.append(
                    ua.ReadValueId(NodeId=self._node(node_id), AttributeId=AttributeIds.Value)
                )
            with _translated():
                values = await self._client.uaclient.read(params)
            samples.extend(sample_of(dv) for dv in values)
        return samples

    async def write(self, node_id: str, value: Value) -> tuple[Sample, bool]:
        """Write value as the variable's own type, then read it back: (read-back sample, confirmed)."""
        node = self._node(node_id)
        vtype = self._types.get(node_id)
        if vtype is None:
            with _translated():
                current = await self._client.uaclient.read_attributes([node], AttributeIds.Value)
            if current[0].Value is None or current[0].Value.VariantType == ua.VariantType.Null:
                raise OpcUaServiceError("BadTypeMismatch", "variable has no value to take the type from")
            vtype = self._types[node_id] = current[0].Value.VariantType
        try:
            coerced = _coerce(value, vtype)
        except ValueError as exc:
            raise OpcUaServiceError("BadTypeMismatch", str(exc)) from None
        # No timestamps: many servers refuse writes that carry them (BadWriteNotSupported).
        dv = ua.DataValue(Value=ua.Variant(coerced, vtype))
        with _translated():
            results = await self._client.uaclient.write_attributes([node], [dv], AttributeIds.Value)
        code = int(results[0].value)
        if code & 0x80000000:
            raise OpcUaServiceError(status_name(code), f"write {node_id}")
        sample = (await self.read([node_id]))[0]
        return sample, same_written(coerced, sample.value, vtype.name)

    # -- subscription --------------------------------------------------------------------------

    async def subscribe(
        self,
        publishing_interval_s: float,
        items: Sequence[MonitorSpec],
    ) -> dict[str, OpcUaError]:
        """Create the subscription and its monitored items; returns the items the server refused.

        Raises OpcUaServiceError when the server refuses the subscription itself. An item refused
        only for its deadband filter is created again without it and reported with a reason in
        FILTER_REFUSALS, so the caller knows to apply the deadband itself.
        """
        with _translated():
            sub = await self._client.create_subscription(
                publishing_interval_s * 1000, handler=None, queue_maxsize=10_000
            )
        self._subscription = sub
        refused = await self._create_items(sub, items, with_filter=True)
        retry = [
            spec for spec in items if spec.key in refused and refused[spec.key].reason in FILTER_REFUSALS
        ]
        if retry:
            again = await self._create_items(sub, retry, with_filter=False)
            for spec in retry:
                if spec.key in again:
                    refused[spec.key] = again[spec.key]
                else:  # monitored now, unfiltered: the reason tells the caller to apply the deadband
                    refused[spec.key] = OpcUaServiceError(refused[spec.key].reason, "deadband by client")
        return refused

    async def _create_items(
        self, sub: Subscription, items: Sequence[MonitorSpec], *, with_filter: bool
    ) -> dict[str, OpcUaError]:
        requests = []
        for spec in items:
            handle = len(self._handles) + 1
            self._handles[handle] = spec.key
            params = ua.MonitoringParameters()
            params.ClientHandle = handle
            # -1: sample at the publishing interval (Part 4 §7.21).
            params.SamplingInterval = spec.sampling_interval_s * 1000 if spec.sampling_interval_s else -1.0
            params.QueueSize = spec.queue_size
            params.DiscardOldest = True
            if with_filter and spec.deadband_abs is not None:
                flt = ua.DataChangeFilter()
                flt.Trigger = ua.DataChangeTrigger.StatusValue
                flt.DeadbandType = ua.DeadbandType.Absolute
                flt.DeadbandValue = spec.deadband_abs
                params.Filter = flt
            request = ua.MonitoredItemCreateRequest()
            request.ItemToMonitor = ua.ReadValueId(
                NodeId=self._node(spec.node_id), AttributeId=AttributeIds.Value
            )
            request.MonitoringMode = ua.MonitoringMode.Reporting
            request.RequestedParameters = params
            requests.append(request)
        with _translated():
            results = await sub.create_monitored_items(requests)
        refused: dict[str, OpcUaError] = {}
        for spec, result in zip(items, results, strict=True):
            if isinstance(result, ua.StatusCode):
                refused[spec.key] = OpcUaServiceError(status_name(int(result.value)))
        return refused

    async def notifications(self) -> AsyncIterator[tuple[str, Sample]]:
        """(key, sample) for each data change; raises OpcUaConnectionError when the subscription dies."""
        sub = self._subscription
        if sub is None:
            raise RuntimeError("subscribe() first")
        while True:
            try:
                event = await sub.next_event(timeout=self._cfg.keepalive_s)
            except StopAsyncIteration:
                raise OpcUaConnectionError("BadSubscriptionIdInvalid", "subscription closed") from None
            if event is None:
                if not self.connected:
                    raise OpcUaConnectionError("BadConnectionClosed", "connection to the server lost")
                continue
            if isinstance(event, StatusChangeEvent):
                code = int(event.notification.Status.value)
                if code & 0x80000000:
                    # BadTimeout (subscription expired) or BadShutdown (link lost): the subscription
                    # is gone; a new link re-creates it.
                    raise OpcUaConnectionError(status_name(code), "subscription ended by the server")
                continue
            if isinstance(event, DataChangeEvent):
                key = self._handles.get(int(event.data.monitored_item.ClientHandle))
                if key is not None:
                    yield key, sample_of(event.data.monitored_item.Value)
