"""The command contract: canonical signing bytes, signatures, expiry, nonces, envelope errors."""

from __future__ import annotations

import base64

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from uplink.schema.commands import (
    Command,
    CommandError,
    NonceCache,
    ResultCode,
    decode_command,
    load_public_key,
    parse_kv_args,
    peek_id,
    sign_command,
    signing_bytes,
    verify_command,
)

NOW = 1_700_000_000_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def cmd(**kw: object) -> Command:
    base: dict[str, object] = {
        "id": "c-1",
        "name": "point.write",
        "args": {"point": "w/p", "value": 1.5},
        "issued_at_ns": NOW,
        "expires_at_ns": NOW + 60 * 10**9,
        "nonce": "n" * 16,
        "key_id": "ops",
    }
    return Command(**{**base, **kw})  # type: ignore[arg-type]


def keys() -> dict[str, object]:
    return {"ops": KEY.public_key()}


def test_signing_bytes_are_the_domain_line_and_sorted_compact_json_with_the_agent_inside() -> None:
    got = signing_bytes("well-1", cmd(args={"z": "é", "a": [1, 2.5]}))
    assert got == (
        b'fieldgate-cmd-v1\n{"agent":"well-1","args":{"a":[1,2.5],"z":"\xc3\xa9"},'
        b'"expires_at_ns":1700000060000000000,"id":"c-1","issued_at_ns":1700000000000000000,'
        b'"key_id":"ops","name":"point.write","nonce":"nnnnnnnnnnnnnnnn"}'
    )


def test_a_signed_command_verifies_and_any_change_or_other_agent_breaks_it() -> None:
    signed = sign_command(KEY, "well-1", cmd())
    verify_command("well-1", signed, keys(), now_ns=NOW)  # type: ignore[arg-type]
    with pytest.raises(CommandError) as exc:
        verify_command("well-2", signed, keys(), now_ns=NOW)  # type: ignore[arg-type]
    assert exc.value.code == ResultCode.UNAUTHORIZED
    tampered = msgspec.structs.replace(signed, args={"point": "w/p", "value": 99})
    with pytest.raises(CommandError):
        verify_command("well-1", tampered, keys(), now_ns=NOW)  # type: ignore[arg-type]
    # reply routing is not signed: changing it keeps the signature valid
    verify_command("well-1", msgspec.structs.replace(signed, reply_to="x/y"), keys(), now_ns=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"signature": None}, ResultCode.UNAUTHORIZED, "missing"),
        ({"nonce": None}, ResultCode.UNAUTHORIZED, "nonce"),
        ({"expires_at_ns": None}, ResultCode.UNAUTHORIZED, "expires_at_ns"),
        ({"key_id": "nobody"}, ResultCode.UNAUTHORIZED, "key_id"),
        ({"signature": "!!notbase64"}, ResultCode.UNAUTHORIZED, "signature"),
    ],
)
def test_a_control_command_without_a_valid_signature_is_unauthorized(
    change: dict[str, object], code: ResultCode, words: str
) -> None:
    signed = sign_command(KEY, "well-1", cmd())
    with pytest.raises(CommandError) as exc:
        verify_command(
            "well-1",
            msgspec.structs.replace(signed, **change),
            keys(),  # type: ignore[arg-type]
            now_ns=NOW,
        )
    assert exc.value.code == code and words in exc.value.message


def test_an_expired_or_too_long_lived_command_is_refused() -> None:
    signed = sign_command(KEY, "well-1", cmd())
    with pytest.raises(CommandError) as exc:
        verify_command("well-1", signed, keys(), now_ns=NOW + 61 * 10**9)  # type: ignore[arg-type]
    assert exc.value.code == ResultCode.EXPIRED
    forever = sign_command(KEY, "well-1", cmd(expires_at_ns=NOW + 10 * 86400 * 10**9))
    with pytest.raises(CommandError) as exc:
        verify_command("well-1", forever, keys(), now_ns=NOW, max_validity_s=86400)  # type: ignore[arg-type]
    assert exc.value.code == ResultCode.EXPIRED


def test_a_nonce_is_refused_until_its_command_expires_and_survives_serialisation() -> None:
    cache = NonceCache()
    cache.check_and_add("a" * 8, NOW + 100, NOW)
    restored = NonceCache.from_bytes(cache.to_bytes())
    with pytest.raises(CommandError) as exc:
        restored.check_and_add("a" * 8, NOW + 100, NOW + 50)
    assert exc.value.code == ResultCode.REPLAYED
    restored.check_and_add("a" * 8, NOW + 300, NOW + 101)  # expired entries are forgotten
    assert len(restored) == 1


def test_a_full_nonce_cache_drops_the_entry_that_expires_first() -> None:
    cache = NonceCache(max_entries=2)
    cache.check_and_add("late", NOW + 1000, NOW)
    cache.check_and_add("soon", NOW + 10, NOW)
    cache.check_and_add("new", NOW + 500, NOW)
    with pytest.raises(CommandError):
        cache.check_and_add("late", NOW + 1000, NOW)
    cache.check_and_add("soon", NOW + 10, NOW)


def test_malformed_and_unknown_commands_say_what_is_wrong() -> None:
    with pytest.raises(CommandError) as exc:
        decode_command(b"[1,2]")
    assert exc.value.code == ResultCode.INVALID
    with pytest.raises(CommandError) as exc:
        decode_command(b'{"id": "x", "name": "self.destruct"}')
    assert exc.value.code == ResultCode.UNKNOWN_COMMAND and "config.apply" in exc.value.message
    with pytest.raises(CommandError) as exc:
        decode_command(b'{"id": "has space", "name": "config.get"}')
    assert "id" in exc.value.message
    with pytest.raises(CommandError) as exc:
        decode_command(b'{"id": "a", "name": "config.get", "surprise": 1}')
    assert "surprise" in exc.value.message
    assert peek_id(b'{"id": "a", "name": "x", "reply_to": "r/t", "correlation": "c"}') == (
        "a",
        "x",
        "r/t",
        "c",
    )
    assert peek_id(b"\xff") == ("", "", None, None)


def test_public_keys_load_from_raw_base64_and_pem() -> None:
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    for form in (raw, base64.b64encode(raw), pem):
        assert load_public_key(form).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    with pytest.raises(ValueError):
        load_public_key(b"too short")


def test_key_value_arguments_are_json_when_they_parse_as_json() -> None:
    assert parse_kv_args(["value=7.5", "point=w/p", "on=true", 'name="q"']) == {
        "value": 7.5,
        "point": "w/p",
        "on": True,
        "name": "q",
    }
    with pytest.raises(ValueError):
        parse_kv_args(["novalue"])
