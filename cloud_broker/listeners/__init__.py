"""Listener registry: which transport module serves each config `kind` of listener into the hub.

Every listener module exposes `async def start(hub: ConnectionHub, config: ListenerConfig) ->
BoundListener` (see `base`). Kinds whose module is not installed are not offered; the QUIC listener
(`cloud_broker.listeners.quic`) plugs in here by existing.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud_broker.config import ListenerConfig
    from cloud_broker.listeners.base import BoundListener, ConnectionHub

LISTENER_MODULES: dict[str, str] = {
    "tcp": "cloud_broker.listeners.tcp",
    "tls": "cloud_broker.listeners.tcp",
    "ws": "cloud_broker.listeners.ws",
    "wss": "cloud_broker.listeners.ws",
    "quic": "cloud_broker.listeners.quic",
}


def available_kinds() -> tuple[str, ...]:
    """Kinds whose listener module can be imported, in registry order."""
    return tuple(kind for kind, module in LISTENER_MODULES.items() if importlib.util.find_spec(module))


async def start_listener(hub: ConnectionHub, config: ListenerConfig) -> BoundListener:
    """Bind one listener. OSError if the bind fails; ValueError for an unknown kind."""
    module_name = LISTENER_MODULES.get(config.kind)
    if module_name is None or not importlib.util.find_spec(module_name):
        raise ValueError(f"no listener for kind {config.kind!r}")
    module = importlib.import_module(module_name)
    bound: BoundListener = await module.start(hub, config)
    return bound
