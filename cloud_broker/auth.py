"""Device authentication: the credentials file (salted scrypt hashes), verification on a worker thread,
certificate identities, and failed logins rate-limited per client IP and per user name with backoff.

The credentials file (`devices.json` in the data directory, mode 0600) maps device names to a role
and a scrypt hash with its own random salt and cost parameters; `cloud-broker device add|remove|list`
edits it, and a running broker picks changes up on the next login (it re-reads the file when its
modification time changed). A successful verification is remembered in memory under a keyed digest of
the password (the key is random per process), so reconnecting devices do not pay for scrypt again.

Checking a password costs tens of milliseconds on purpose, so it never runs on the event loop:
`AuthWorker` takes the core's `AuthRequest`s on its own thread and hands `AuthResult`s back.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud_broker.core.model import AuthRequest, AuthResult
from uplink.mqtt.packets import ReasonCode

log = logging.getLogger("cloud_broker.auth")

CREDENTIALS_FILE = "devices.json"
ROLES = ("device", "operator")
# scrypt cost: N=2^14, r=8 -> 16 MiB and ~50 ms per check; stored per entry so it can be raised later.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_DKLEN = 32


class CredentialsError(ValueError):
    """The credentials file is unreadable or malformed: fix it (or remove it and add devices again)."""


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    name: str
    role: str
    salt: bytes
    digest: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def check(self, password: bytes) -> bool:
        return hmac.compare_digest(_scrypt(password, self.salt, self.n, self.r, self.p), self.digest)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=256 * 1024 * 1024)


def make_credential(name: str, password: bytes, role: str = "device") -> DeviceCredential:
    if role not in ROLES:
        raise CredentialsError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not name or any(ch in name for ch in "/+#") or len(name) > 128:
        raise CredentialsError(f"device name {name!r} must be 1-128 characters without '/', '+' or '#'")
    salt = secrets.token_bytes(16)
    return DeviceCredential(name, role, salt, _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def load_credentials(path: Path) -> dict[str, DeviceCredential]:
    """Read the credentials file; a missing file is an empty table."""
    try:
        raw = path.read_text("utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
        out: dict[str, DeviceCredential] = {}
        for name, e in doc["devices"].items():
            out[name] = DeviceCredential(name, e["role"], bytes.fromhex(e["salt"]),
                                         bytes.fromhex(e["scrypt"]), int(e["n"]), int(e["r"]), int(e["p"]))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CredentialsError(f"{path} is not a valid credentials file: {exc!r}") from exc


def save_credentials(path: Path, creds: dict[str, DeviceCredential]) -> None:
    """Write the file atomically (temp file + rename), readable by the owner only."""
    doc = {"version": 1, "devices": {
        c.name: {"role": c.role, "salt": c.salt.hex(), "scrypt": c.digest.hex(), "n": c.n, "r": c.r, "p": c.p}
        for c in sorted(creds.values(), key=lambda c: c.name)}}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FailureLimiter:
    """Backoff after failed logins, per key (`ip:...`, `user:...`): after the `free_failures`-th failure
    a key is blocked for base * 2^(extra failures) seconds, capped. A success clears the key."""

    def __init__(self, free_failures: int = 3, base_s: float = 1.0, max_s: float = 300.0,
                 max_keys: int = 100_000) -> None:
        self.free_failures = free_failures
        self.base_s = base_s
        self.max_s = max_s
        self.max_keys = max_keys
        self._keys: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, blocked until)

    def blocked(self, key: str, now: float) -> bool:
        found = self._keys.get(key)
        return found is not None and found[1] > now

    def failed(self, key: str, now: float) -> None:
        failures = self._keys.pop(key, (0, 0.0))[0] + 1
        until = 0.0
        if failures >= self.free_failures:
            until = now + min(self.max_s, self.base_s * 2 ** (failures - self.free_failures))
        self._keys[key] = (failures, until)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)  # the least recently failed keys go first

    def succeeded(self, key: str) -> None:
        self._keys.pop(key, None)


def _peer_ip(peer: str) -> str:
    """`tcp:1.2.3.4:5678` / `ws:[::1]:80` -> the address part."""
    _, _, rest = peer.partition(":")
    host, _, _ = rest.rpartition(":")
    return host or peer


class DeviceAuthenticator:
    """Decides CONNECTs from the credentials file and certificate identities. One thread uses it."""

    def __init__(self, credentials_path: Path | None, *, allow_anonymous: bool = False,
                 certificate_identity: bool = True, accept_unregistered_certificates: bool = False,
                 limiter: FailureLimiter | None = None, ip_limiter: FailureLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._path = credentials_path
        self._allow_anonymous = allow_anonymous
        self._cert_identity = certificate_identity
        self._accept_unregistered = accept_unregistered_certificates
        # Per user name, and per client IP with a larger allowance (many devices may share a NAT address).
        self._limiter = limiter or FailureLimiter()
        self._ip_limiter = ip_limiter or FailureLimiter(free_failures=20)
        self._clock = clock
        self._creds: dict[str, DeviceCredential] = {}
        self._mtime_ns: int | None = None
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes], DeviceCredential] = {}
        self.failed_logins = 0
        self.rate_limited = 0
        self._reload()

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime_ns or (mtime is None and self._creds):
            self._creds = load_credentials(self._path)
            self._mtime_ns = mtime
            self._verified.clear()

    def authenticate(self, request: AuthRequest) -> AuthResult:
        now = self._clock()
        ip_key = "ip:" + _peer_ip(request.peer)
        user_key = "user:" + (request.username or request.cert_identity or "")
        limiter, ip_limiter = self._limiter, self._ip_limiter
        if ip_limiter.blocked(ip_key, now) or limiter.blocked(user_key, now):
            self.rate_limited += 1
            return AuthResult(ReasonCode.CONNECTION_RATE_EXCEEDED)
        try:
            self._reload()
        except CredentialsError as exc:
            log.error("%s; refusing logins until it is fixed", exc)
            return AuthResult(ReasonCode.SERVER_UNAVAILABLE)
        result = self._decide(request)
        if result.reason_code == ReasonCode.SUCCESS:
            limiter.succeeded(user_key)
        else:
            # An IP's record is not cleared by one success: an attacker with one valid account
            # must not reset the backoff of its guesses at others.
            self.failed_logins += 1
            ip_limiter.failed(ip_key, now)
            limiter.failed(user_key, now)
            log.info("refused login of %r from %s: reason 0x%02X", request.username or request.cert_identity,
                     request.peer, result.reason_code)
        return result

    def _decide(self, request: AuthRequest) -> AuthResult:
        identity = request.cert_identity if self._cert_identity else None
        if identity is not None:
            if request.username is not None and request.username != identity:
                return AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD)  # one device posing as another
            cred = self._creds.get(identity)
            if cred is not None:
                return AuthResult(ReasonCode.SUCCESS, identity, cred.role)
            if self._accept_unregistered:
                return AuthResult(ReasonCode.SUCCESS, identity, "device")
            return AuthResult(ReasonCode.NOT_AUTHORIZED)
        if request.username is None:
            if request.password is None and self._allow_anonymous:
                return AuthResult(ReasonCode.SUCCESS)
            return AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD if request.password is not None
                              else ReasonCode.NOT_AUTHORIZED)
        password = request.password or b""
        cache_key = (request.username, hmac.digest(self._cache_key, password, "sha256"))
        cred = self._verified.get(cache_key)
        if cred is not None:
            return AuthResult(ReasonCode.SUCCESS, request.username, cred.role)
        cred = self._creds.get(request.username)
        if cred is None:
            # Same cost as a real check, so response time does not reveal which names exist.
            _scrypt(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
            return AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        if not cred.check(password):
            return AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[cache_key] = cred
        return AuthResult(ReasonCode.SUCCESS, request.username, cred.role)


class AuthWorker:
    """Runs an authenticator on its own thread: `submit` from the loop, results through `on_result`
    (called on the worker thread: the owner marshals it to the loop)."""

    def __init__(self, authenticator: DeviceAuthenticator,
                 on_result: Callable[[AuthRequest, AuthResult], object], name: str = "broker-auth") -> None:
        self._auth = authenticator
        self._on_result = on_result
        self._queue: queue.SimpleQueue[AuthRequest | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def authenticator(self) -> DeviceAuthenticator:
        return self._auth

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: AuthRequest) -> None:
        self._queue.put(request)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            self._on_result(request, self._auth.authenticate(request))
