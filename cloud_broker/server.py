"""Runs the broker in asyncio: binds the listeners, feeds the pure core, flushes its output, fires its
timers, and connects the core's deferred work to the threads that do it (journal writer, auth worker).

Theory of operation. Listeners call the hub for every connection event; the hub passes them to the
one `Broker` core with `loop.time()` as now. Output is not written at once: the first event of an
event-loop iteration that leaves work schedules one `flush` (call_soon), which drains the core and
writes each connection's bytes with a single `transport.write`, closes what the core closed, hands the
journal batch to the writer thread and CONNECTs to the auth worker. Many PUBLISHes fanned out within
one iteration therefore cost one syscall per subscriber and one journal batch. The writer reports
commits and the auth worker verdicts back through `call_soon_threadsafe`; the core then releases the
held PUBACKs / answers the CONNECTs, and the next flush writes them. The core's timers run from a
single `loop.call_at` handle, re-armed after every flush. `$SYS` statistics and slow-consumer checks
are `call_later` handles too. The protocol runs in listener callbacks, these handles and the two
worker threads. Components with work of their own (the file-transfer server's jobs and GC) run as
named tasks in one TaskGroup owned by the `BrokerServer` (its `broker-components` task); such a
component that dies sets `hub.failed` like a journal failure does, and `BrokerServer.close` cancels
them before it stops the threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_broker.acl import Acl, AclRule, default_rules
from cloud_broker.auth import AuthWorker, DeviceAuthenticator, FailureLimiter
from cloud_broker.config import BrokerConfig
from cloud_broker.core.broker import Broker
from cloud_broker.core.hooks import Authenticator, Authorizer, MessageHook
from cloud_broker.core.model import AuthRequest, AuthResult
from cloud_broker.core.persistence import Persistence, StoredState
from cloud_broker.files.server import FileTransferServer, HubLink, acl_rules
from cloud_broker.listeners import start_listener
from cloud_broker.listeners.base import BoundListener, ConnectionSink
from cloud_broker.persistence.sqlite import SqlitePersistence
from cloud_broker.persistence.writer import JournalWriter
from cloud_broker.sys_topics import sys_messages
from uplink.mqtt.packets import ReasonCode

log = logging.getLogger("cloud_broker")

VERSION = "0.1.0"
STATE_FILE = "broker.sqlite3"


class BrokerHub:
    """Connects listeners to the core: connection ids, coalesced writes, deadlines, back-pressure,
    and the hand-offs to the journal writer and the auth worker."""

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop, *,
                 high_water_bytes: int = 1_048_576, low_water_bytes: int = 262_144,
                 slow_consumer_timeout_s: float = 60.0) -> None:
        self.broker = broker
        self.high_water_bytes = high_water_bytes
        self.low_water_bytes = low_water_bytes
        self._slow_consumer_timeout_s = slow_consumer_timeout_s
        self._loop = loop
        self._sinks: dict[int, ConnectionSink] = {}
        self._next_id = 0
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closed = False
        self._slow: dict[int, asyncio.TimerHandle] = {}
        self.journal: JournalWriter | None = None
        self.auth: AuthWorker | None = None
        self.slow_consumers_disconnected = 0
        # Set when the broker cannot go on (journal writes fail, a component died): its owner stops it.
        self.failure: Exception | None = None
        self.failed_what = ""
        self.failed = asyncio.Event()

    @property
    def connection_count(self) -> int:
        return len(self._sinks)

    # ---------------------------------------------------------------- listener callbacks

    @property
    def receive_maximum(self) -> int:
        return self.broker.settings.receive_maximum

    def open(self, sink: ConnectionSink, peer: str, cert_identity: str | None = None,
             receive_windows: int = 1) -> int:
        if self._closed:
            sink.close()
            return -1  # never known to the core: later events for it are ignored there
        self._next_id += 1
        conn_id = self._next_id
        self._sinks[conn_id] = sink
        self.broker.connection_opened(conn_id, peer, self._loop.time(), cert_identity, receive_windows)
        self._after_event()
        return conn_id

    def violation(self, conn_id: int, reason_code: int) -> None:
        """A listener found a protocol violation the core cannot see (a per-stream limit): close the
        connection as the core closes its own violations (MQTT 5 DISCONNECT with reason_code, will)."""
        if conn_id in self._sinks:
            self.broker.close_connection(conn_id, reason_code, self._loop.time())
            self._after_event()

    def received(self, conn_id: int, data: bytes) -> None:
        self.broker.data_received(conn_id, data, self._loop.time())
        self._after_event()

    def lost(self, conn_id: int) -> None:
        self._clear_slow(conn_id)
        if self._sinks.pop(conn_id, None) is not None:
            self.broker.connection_lost(conn_id, self._loop.time())
            self._after_event()

    def congested(self, conn_id: int, congested: bool) -> None:
        """The connection's write buffer passed the high-water mark, or drained below the low one.

        While congested the connection is not read from either: a client that does not read its own
        acknowledgements must not keep publishing into the broker.
        """
        sink = self._sinks.get(conn_id)
        if sink is None:
            return
        self.broker.set_congested(conn_id, congested, self._loop.time())
        if congested:
            sink.pause_reading()
            if conn_id not in self._slow:
                self._slow[conn_id] = self._loop.call_later(self._slow_consumer_timeout_s,
                                                            self._slow_consumer, conn_id)
        else:
            sink.resume_reading()
            self._clear_slow(conn_id)
        self._after_event()

    def _clear_slow(self, conn_id: int) -> None:
        handle = self._slow.pop(conn_id, None)
        if handle is not None:
            handle.cancel()

    def _slow_consumer(self, conn_id: int) -> None:
        self._slow.pop(conn_id, None)
        sink = self._sinks.pop(conn_id, None)
        if sink is None:
            return
        self.slow_consumers_disconnected += 1
        log.info("connection %d: output stuck above the high-water mark for %.0f s: disconnected",
                 conn_id, self._slow_consumer_timeout_s)
        self.broker.close_connection(conn_id, ReasonCode.QUOTA_EXCEEDED, self._loop.time())
        abort = getattr(sink, "abort", None)
        if abort is not None:
            abort()  # its buffer will never drain: do not wait for it
        else:
            sink.close()
        self._after_event()

    # ---------------------------------------------------------------- worker results (on the loop)

    def journal_committed(self, batch: int) -> None:
        self.broker.journal_committed(batch, self._loop.time())
        self._after_event()

    def journal_failed(self, exc: Exception) -> None:
        self.component_failed("broker state could not be written", exc)

    def component_failed(self, what: str, exc: Exception) -> None:
        """Something the broker needs broke for good: record the first failure and signal `failed`."""
        if not self.failed.is_set():
            self.failure, self.failed_what = exc, what
            self.failed.set()

    def core_changed(self) -> None:
        """A component entered the core from outside a listener callback (a hook settling an ack,
        publishing a response): schedule the flush and re-arm the deadline timer, as for any event."""
        self._after_event()

    def auth_completed(self, request: AuthRequest, result: AuthResult) -> None:
        self.broker.auth_completed(request.conn_id, result, self._loop.time())
        self._after_event()

    # ---------------------------------------------------------------- output and timers

    def _after_event(self) -> None:
        if not self._flush_scheduled and self.broker.needs_flush():
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        self._arm_timer()

    def flush(self) -> None:
        """Write the core's output (one write per connection, then closes after their last bytes),
        and hand its journal batch and authentication requests to their threads."""
        self._flush_scheduled = False
        broker = self.broker
        if self.journal is not None and broker.has_journal():
            batch, intents = broker.drain_journal()
            self.journal.submit(batch, intents)
        if self.auth is not None:
            for request in broker.drain_auth_requests():
                self.auth.submit(request)
        writes, closes = broker.drain()
        sinks = self._sinks
        for conn_id, data in writes:
            sink = sinks.get(conn_id)
            if sink is not None:
                sink.write(data)
        for conn_id in closes:
            self._clear_slow(conn_id)
            sink = sinks.pop(conn_id, None)
            if sink is not None:
                sink.close()  # an asyncio transport sends its buffered bytes before closing

    def _arm_timer(self) -> None:
        when = self.broker.next_deadline()
        if when is None or (self._timer_when is not None and self._timer_when <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        self.broker.handle_deadlines(self._loop.time())
        self.flush()
        self._arm_timer()

    def publish_sys(self, uptime_s: float, extra: dict[str, int]) -> None:
        now = self._loop.time()
        for message in sys_messages(self.broker.stats(), uptime_s, VERSION, extra):
            self.broker.publish(message, now)
        self._after_event()

    def shutdown(self) -> None:
        """Tell every client the server is going away, write that, and close all connections."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handle in self._slow.values():
            handle.cancel()
        self._slow.clear()
        self.broker.shutdown(self._loop.time())
        self.flush()
        for sink in list(self._sinks.values()):
            sink.close()
        self._sinks.clear()


@dataclass(frozen=True, slots=True)
class ListenerAddress:
    kind: str
    host: str
    port: int


@dataclass(eq=False)
class BrokerServer:
    """A running broker. `ports` maps listener kind to bound ports, in config order."""

    broker: Broker
    hub: BrokerHub
    addresses: list[ListenerAddress]
    _listeners: list[BoundListener] = field(repr=False)
    _store: Persistence | None = field(default=None, repr=False)
    # The file-transfer server (`[file_transfer] enable = true`), its jobs running in `_components`.
    files: FileTransferServer | None = None
    _sys_handle: asyncio.TimerHandle | None = field(default=None, repr=False)
    _components: asyncio.Task[None] | None = field(default=None, repr=False)
    _closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def ports(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for addr in self.addresses:
            out.setdefault(addr.kind, []).append(addr.port)
        return out

    def _start_components(self, components: list[tuple[str, Coroutine[Any, Any, None]]]) -> None:
        """Run each (name, coroutine) as a named task of one TaskGroup, owned by this server."""
        if components:
            self._components = asyncio.get_running_loop().create_task(
                self._run_components(components), name="broker-components")

    async def _run_components(self, components: list[tuple[str, Coroutine[Any, Any, None]]]) -> None:
        async with asyncio.TaskGroup() as tg:
            for name, coro in components:
                tg.create_task(self._component(name, coro), name=name)

    async def _component(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        # A component runs until the server cancels it. An error (or an unexpected return) is not
        # swallowed: it is logged with its traceback and stops the broker through `hub.failed`,
        # whose owner exits non-zero so the service manager restarts us.
        try:
            await coro
        except Exception as exc:
            log.exception("%s failed", name)
            self.hub.component_failed(f"{name} failed", exc)
        else:
            self.hub.component_failed(f"{name} ended", RuntimeError(f"{name} returned unexpectedly"))

    async def close(self) -> None:
        """Stop accepting, send DISCONNECT 0x8B to MQTT 5 clients, close every connection, stop the
        components (file transfer), commit the journal and stop the worker threads. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._sys_handle is not None:
            self._sys_handle.cancel()
        for listener in self._listeners:
            listener.close()
        self.hub.shutdown()
        for listener in self._listeners:
            await listener.wait_closed()
        if self._components is not None:
            self._components.cancel()
            try:
                await self._components
            except asyncio.CancelledError:
                # Ours (we cancelled it) unless the task calling close is itself being cancelled.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if self.hub.auth is not None:
            await asyncio.to_thread(self.hub.auth.stop)
        if self.hub.journal is not None:
            await asyncio.to_thread(self.hub.journal.stop)
        if self._store is not None:
            self._store.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _authorizer_for(config: BrokerConfig) -> Authorizer | None:
    if not config.acl.enabled:
        return None
    rules = tuple(AclRule(r.role, r.action, r.topic, r.permission == "allow") for r in config.acl.rules)
    rules = rules or default_rules()
    if config.file_transfer.enable:
        # '#' never matches '$' topics, so without these every client would get 0x87 on `$file/...`.
        rules = (*acl_rules(), *rules)
    return Acl(rules)


async def serve(
    config: BrokerConfig,
    *,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer | None = None,
    hooks: tuple[MessageHook, ...] = (),
) -> BrokerServer:
    """Start a broker for config and return once every listener is bound. OSError if a bind fails;
    `cloud_broker.persistence.sqlite.StoreError` if the state file cannot be used.

    `authenticator` replaces the credentials-file authenticator with an in-memory one (answers on
    the loop); `authorizer` replaces the config's ACL (give it `files.server.acl_rules()` too when
    file transfer is enabled); `hooks` see every PUBLISH before the file-transfer server does.
    With `[file_transfer] enable = true` the server is `BrokerServer.files` and its jobs run as the
    server's task until `close`.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    store: SqlitePersistence | None = None
    state = StoredState()
    if config.data_dir is not None:
        # Once, at start, before serving anyone: blocking the loop for a mkdir here stalls no client.
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    if config.durable():
        assert config.data_dir is not None
        store = await asyncio.to_thread(SqlitePersistence, Path(config.data_dir) / STATE_FILE,
                                        config.persistence.synchronous)
        state = await asyncio.to_thread(store.load, time.time() - time.monotonic())
    elif config.persistence.backend == "sqlite":
        log.warning("no data_dir: broker state is kept in memory only and lost on restart")

    device_auth: DeviceAuthenticator | None = None
    if authenticator is None:
        auth_cfg = config.auth
        device_auth = DeviceAuthenticator(
            config.credentials_path(), allow_anonymous=config.allow_anonymous,
            certificate_identity=auth_cfg.certificate_identity,
            accept_unregistered_certificates=auth_cfg.accept_unregistered_certificates,
            limiter=FailureLimiter(auth_cfg.free_failures, auth_cfg.backoff_base_s, auth_cfg.backoff_max_s),
            ip_limiter=FailureLimiter(auth_cfg.free_failures_per_ip, auth_cfg.backoff_base_s,
                                      auth_cfg.backoff_max_s))
    files: FileTransferServer | None = None
    if config.file_transfer.enable:
        assert config.data_dir is not None  # checked by the config
        files = FileTransferServer(config.file_transfer, config.data_dir)
        hooks = (*hooks, files)
    broker = Broker(config.core_settings(), authenticator=authenticator,
                    authorizer=authorizer if authorizer is not None else _authorizer_for(config),
                    hooks=hooks, journal=store is not None, deferred_auth=device_auth is not None)
    broker.restore(state, loop.time())
    bp = config.backpressure
    hub = BrokerHub(broker, loop, high_water_bytes=bp.high_water_bytes, low_water_bytes=bp.low_water_bytes,
                    slow_consumer_timeout_s=bp.slow_consumer_timeout_s)
    if store is not None:
        hub.journal = JournalWriter(
            store,
            on_committed=lambda batch: loop.call_soon_threadsafe(hub.journal_committed, batch),
            on_failed=lambda exc: loop.call_soon_threadsafe(hub.journal_failed, exc))
        hub.journal.start()
    if device_auth is not None:
        hub.auth = AuthWorker(device_auth,
                              lambda req, res: loop.call_soon_threadsafe(hub.auth_completed, req, res))
        hub.auth.start()
    if broker.has_journal():
        hub.flush()  # what restore changed (sessions that expired while the broker was down)

    listeners: list[BoundListener] = []
    addresses: list[ListenerAddress] = []
    try:
        for listener_cfg in config.listeners:
            bound = await start_listener(hub, listener_cfg)
            listeners.append(bound)
            addresses.extend(ListenerAddress(bound.kind, host, port) for host, port in bound.addresses)
    except (OSError, ValueError):
        for bound in listeners:
            bound.close()
            await bound.wait_closed()
        if hub.auth is not None:
            await asyncio.to_thread(hub.auth.stop)
        if hub.journal is not None:
            await asyncio.to_thread(hub.journal.stop)
        if store is not None:
            store.close()
        raise
    server = BrokerServer(broker, hub, addresses, listeners, store, files)
    if files is not None:
        server._start_components([("broker-file-transfer", files.run(HubLink(hub)))])

    interval_s = config.sys.interval_s
    if interval_s > 0:
        def sys_tick() -> None:
            extra = {"slow_consumers_disconnected": hub.slow_consumers_disconnected}
            if device_auth is not None:
                extra["auth/rate_limited"] = device_auth.rate_limited
            hub.publish_sys(time.monotonic() - started, extra)
            server._sys_handle = loop.call_later(interval_s, sys_tick)

        sys_tick()
    return server
