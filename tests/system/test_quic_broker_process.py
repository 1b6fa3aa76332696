"""The `cloud-broker` process with a QUIC listener from its TOML config, driven by our QUIC client.

Checks the listener registry wiring end to end: the process binds QUIC next to TCP and TLS, an
Uplink over QUIC exchanges messages with a TCP client, and on SIGTERM the QUIC client gets
DISCONNECT 0x8B (server shutting down) followed by CONNECTION_CLOSE with application error 1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hil.bench.uplink import make_bench_pki, start_broker_process
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import MQTT_5, ConnAck, Connect, Disconnect, ReasonCode
from uplink.quic import APP_ERROR_CTRL_STREAM_DOWN, QuicSettings, open_quic

pytestmark = pytest.mark.system


async def test_a_broker_process_serves_quic_from_its_config_and_closes_it_with_0x8b_on_sigterm(
        tmp_path: Path) -> None:
    pki = make_bench_pki(tmp_path)
    async with start_broker_process(pki, tmp_path) as ports:
        settings = QuicSettings(port=ports.quic, ca_file=pki.ca_file, handshake_timeout_s=5.0)

        async def quic(config: UplinkConfig):  # type: ignore[no-untyped-def]
            return (await open_quic(config.host, settings, keep_alive_s=config.keep_alive_s)).control

        device = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="well-7"),
                        transport_factory=quic)
        app = Uplink(UplinkConfig(host="127.0.0.1", port=ports.tcp, client_id="app"))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(device.run(), name="device")
            tg.create_task(app.run(), name="app")
            async with asyncio.timeout(15.0):
                await app.wait_connected()
                await app.subscribe([("data/#", 1)])
                await device.wait_connected()
                assert await device.publish("data/well-7", b"42") < 0x80
                message = await anext(app.inbound())
                assert message.payload == b"42"
            await device.close()
            await app.close()

        link = await open_quic("127.0.0.1", settings)
        await link.control.send(encode(Connect(client_id="watch", protocol_level=MQTT_5), MQTT_5))
        decoder = Decoder(MQTT_5)
        async with asyncio.timeout(10.0):
            packets = decoder.feed(await link.control.recv())
            assert isinstance(packets[0], ConnAck)
            ports.terminate()  # SIGTERM
            data = b""
            while chunk := await link.control.recv():
                data += chunk
        assert decoder.feed(data) == [Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)]
        async with asyncio.timeout(10.0):
            while not link.closed:  # noqa: ASYNC110 - the broker's close
                await asyncio.sleep(0.02)
        assert link.peer_app_error == APP_ERROR_CTRL_STREAM_DOWN
        await link.close()
