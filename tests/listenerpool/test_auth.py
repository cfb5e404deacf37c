"""API tokens and signed subscribe tokens, as pure functions."""

from __future__ import annotations

import base64
import json

import pytest

from listenerpool.auth import (
    InvalidToken,
    SubscribeClaims,
    bearer_token,
    read_subscribe_token,
    sign_subscribe_token,
    split_secrets,
    token_matches,
    verify_subscribe_token,
)
from listenerpool.settings import SettingsError, load_settings

KEY_A = "a" * 32
KEY_B = "b" * 32
NOW = 1_800_000_000


def test_a_signed_token_grants_its_session_until_it_expires() -> None:
    token = sign_subscribe_token([KEY_A], "s1", NOW + 60)
    grant = verify_subscribe_token([KEY_A], token, "s1", NOW)
    assert (grant.sid, grant.expires_at) == ("s1", NOW + 60)
    with pytest.raises(InvalidToken) as expired:
        verify_subscribe_token([KEY_A], token, "s1", NOW + 60)
    assert expired.value.code == "token_expired"


def test_a_token_for_another_session_is_refused() -> None:
    token = sign_subscribe_token([KEY_A], "s1", NOW + 60)
    with pytest.raises(InvalidToken) as refused:
        verify_subscribe_token([KEY_A], token, "s2", NOW)
    assert refused.value.code == "wrong_session"


def test_rotation_the_first_key_signs_and_any_listed_key_verifies() -> None:
    old = sign_subscribe_token([KEY_A], "s1", NOW + 60)
    new = sign_subscribe_token([KEY_B, KEY_A], "s1", NOW + 60)
    assert verify_subscribe_token([KEY_B, KEY_A], old, "s1", NOW).sid == "s1"
    assert verify_subscribe_token([KEY_B], new, "s1", NOW).sid == "s1"
    with pytest.raises(InvalidToken):
        verify_subscribe_token([KEY_B], old, "s1", NOW)  # the old key was dropped


def _forge_payload(token: str, **claims: object) -> str:
    payload, _, mac = token.partition(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(claims)
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{forged}.{mac}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: _forge_payload(t, sid="s2"),
        lambda t: _forge_payload(t, exp=NOW + 10**6),
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
        lambda t: t.replace(".", ""),
        lambda t: t + ".x",
        lambda t: "." + t.partition(".")[2],
        lambda t: t.partition(".")[0] + ".!!!",
        lambda t: "x" * 5000,
        lambda t: "",
    ],
)
def test_tampered_or_malformed_tokens_are_refused(tamper: object) -> None:
    token = sign_subscribe_token([KEY_A], "s1", NOW + 60)
    assert callable(tamper)
    with pytest.raises(InvalidToken) as refused:
        verify_subscribe_token([KEY_A], tamper(token), "s1", NOW)
    assert refused.value.code == "invalid_token"


def test_a_payload_signed_with_the_key_but_not_the_right_shape_is_refused() -> None:
    import hashlib
    import hmac

    payload = base64.urlsafe_b64encode(b'["s1", 1]').rstrip(b"=").decode()
    mac = hmac.new(KEY_A.encode(), payload.encode(), hashlib.sha256).digest()
    token = payload + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    with pytest.raises(InvalidToken) as refused:
        verify_subscribe_token([KEY_A], token, "s1", NOW)
    assert refused.value.code == "invalid_token"


def test_api_tokens_match_any_listed_token_only() -> None:
    assert token_matches("t" * 16, ["u" * 16, "t" * 16])
    assert not token_matches("t" * 15, ["t" * 16])
    assert not token_matches("", ["t" * 16])
    assert not token_matches("t" * 16, [])


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_settings_split_rotated_secrets_and_refuse_short_ones() -> None:
    settings = load_settings(api_token=f"{'t' * 16}, {'u' * 16}", signing_key=KEY_A)
    assert settings.api_tokens == ("t" * 16, "u" * 16)
    assert settings.signing_keys == (KEY_A,)
    assert split_secrets(" , ") == ()
    with pytest.raises(SettingsError, match=r"LP_API_TOKEN: .*16 characters"):
        load_settings(api_token="short")
    with pytest.raises(SettingsError, match=r"LP_SIGNING_KEY: .*32 characters"):
        load_settings(signing_key="short")
    with pytest.raises(SettingsError, match="LP_API_TOKEN: is set but holds no token"):
        load_settings(api_token=" , ")


def test_secrets_do_not_show_in_settings_repr_or_errors() -> None:
    settings = load_settings(api_token="secret-token-0123456789", signing_key=KEY_A)
    assert "secret-token" not in repr(settings)
    assert KEY_A not in repr(settings)
    with pytest.raises(SettingsError) as bad:
        load_settings(api_token="secret-short")
    assert "secret-short" not in str(bad.value)


def test_a_token_may_name_several_sessions() -> None:
    token = sign_subscribe_token([KEY_A], ["s1", "s2"], NOW + 60)
    assert read_subscribe_token([KEY_A], token, NOW) == SubscribeClaims(
        frozenset({"s1", "s2"}), NOW + 60
    )
    assert verify_subscribe_token([KEY_A], token, "s2", NOW).sid == "s2"
    with pytest.raises(InvalidToken) as other:
        verify_subscribe_token([KEY_A], token, "s3", NOW)
    assert other.value.code == "wrong_session"
    with pytest.raises(InvalidToken) as expired:
        read_subscribe_token([KEY_A], token, NOW + 60)
    assert expired.value.code == "token_expired"
    # A one-session token reads as a set of one.
    single = sign_subscribe_token([KEY_A], "s1", NOW + 60)
    assert read_subscribe_token([KEY_A], single, NOW).sids == frozenset({"s1"})
