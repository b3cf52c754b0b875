"""Bearer tokens: issuing, verifying on an injected clock, and every way to refuse one."""

from __future__ import annotations

import math

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.domain.clock import ManualClock
from workbench.http.auth import TokenError, bearer_token, issue_token, secret_from_env, verify_token

# 64 bytes and more, so PyJWT has no reason to warn about the key length (HS512 included).
SECRET = "test-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "other-secret-" + "0123456789abcdef" * 4
START = 1_700_000_000.0


def raw_token(claims: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    """A token with exactly these claims, bypassing issue_token's checks."""
    return jwt.encode(claims, secret, algorithm=algorithm)


def refusal(token: str, clock: ManualClock | None = None) -> str:
    with pytest.raises(TokenError) as info:
        verify_token(token, SECRET, clock=clock or ManualClock(START))
    return info.value.reason


# -- issuing and verifying --------------------------------------------------------


def test_round_trip() -> None:
    clock = ManualClock(START)
    token = issue_token("user-1", SECRET, clock=clock)
    assert isinstance(token, str)
    assert verify_token(token, SECRET, clock=clock) == "user-1"


def test_claims() -> None:
    clock = ManualClock(START + 0.5)
    token = issue_token("user-1", SECRET, ttl_s=60, clock=clock)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {"sub": "user-1", "iat": int(START), "exp": int(START) + 61}


def test_a_short_ttl_is_not_expired_on_issue() -> None:
    # now + ttl is 1_700_000_000.7: rounding exp down would give exp == now's second.
    clock = ManualClock(START + 0.5)
    token = issue_token("user-1", SECRET, ttl_s=0.2, clock=clock)
    assert verify_token(token, SECRET, clock=clock) == "user-1"


@pytest.mark.parametrize("ttl_s", [0, -1, math.nan, math.inf])
def test_issue_rejects_a_bad_ttl(ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        issue_token("user-1", SECRET, ttl_s=ttl_s, clock=ManualClock(START))


def test_issue_rejects_an_empty_user_id() -> None:
    with pytest.raises(ValueError, match="user_id"):
        issue_token("", SECRET, clock=ManualClock(START))


def test_an_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="secret"):
        issue_token("user-1", "", clock=ManualClock(START))
    token = issue_token("user-1", SECRET, clock=ManualClock(START))
    with pytest.raises(ValueError, match="secret"):
        verify_token(token, "", clock=ManualClock(START))


@given(st.text(min_size=1))
def test_any_user_id_round_trips(user_id: str) -> None:
    clock = ManualClock(START)
    assert verify_token(issue_token(user_id, SECRET, clock=clock), SECRET, clock=clock) == user_id


# -- expiry follows the injected clock ----------------------------------------------


def test_valid_until_just_before_exp_and_expired_at_exp() -> None:
    clock = ManualClock(START)
    token = issue_token("user-1", SECRET, ttl_s=60, clock=clock)
    clock.set(START + 59.999)
    assert verify_token(token, SECRET, clock=clock) == "user-1"
    clock.set(START + 60)
    assert refusal(token, clock) == "token expired"
    clock.advance(3600)
    assert refusal(token, clock) == "token expired"


def test_expiry_ignores_the_wall_clock() -> None:
    # Issued and checked in 2001: long expired by the wall clock, valid by this one.
    clock = ManualClock(1_000_000_000.0)
    token = issue_token("user-1", SECRET, ttl_s=60, clock=clock)
    assert verify_token(token, SECRET, clock=clock) == "user-1"
    # And the other way: fresh by the wall clock, expired on a clock in the future.
    fresh = issue_token("user-1", SECRET, ttl_s=60)
    assert refusal(fresh, ManualClock(4_000_000_000.0)) == "token expired"


# -- refusals -----------------------------------------------------------------------


def test_a_token_signed_with_another_secret_has_a_bad_signature() -> None:
    clock = ManualClock(START)
    token = issue_token("user-1", OTHER_SECRET, clock=clock)
    assert refusal(token, clock) == "bad signature"


def test_a_tampered_payload_has_a_bad_signature() -> None:
    clock = ManualClock(START)
    header, _, signature = issue_token("user-1", SECRET, clock=clock).split(".")
    forged_payload = raw_token({"sub": "admin", "exp": START + 60}).split(".")[1]
    assert refusal(f"{header}.{forged_payload}.{signature}", clock) == "bad signature"


def test_a_token_accepted_before_is_judged_again_every_time() -> None:
    """Verified tokens are remembered (PyJWT's decode is slow); no decision changes."""
    clock = ManualClock(START)
    token = issue_token("user-1", SECRET, ttl_s=60, clock=clock)
    assert verify_token(token, SECRET, clock=clock) == "user-1"
    assert verify_token(token, SECRET, clock=clock) == "user-1"
    # Still expiry on the clock of each call, not of the first.
    clock.advance(60)
    assert refusal(token, clock) == "token expired"
    # Remembered under its secret only: the same token is refused by another one.
    with pytest.raises(TokenError, match="bad signature"):
        verify_token(token, OTHER_SECRET, clock=ManualClock(START))
    # A refusal is not remembered as an acceptance, nor an acceptance as a refusal.
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert refusal(tampered) == "bad signature"
    assert refusal(tampered) == "bad signature"
    assert verify_token(token, SECRET, clock=ManualClock(START)) == "user-1"


@pytest.mark.parametrize(
    "garbage", ["", "garbage", "a.b.c", "a.b", "ünïcode.✓.x", "Bearer abc", "...."]
)
def test_garbage_is_malformed(garbage: str) -> None:
    assert refusal(garbage) == "malformed token"


def test_a_payload_that_is_not_an_object_is_malformed() -> None:
    token = jwt.api_jws.encode(b'["sub"]', SECRET, algorithm="HS256")
    assert refusal(token) == "malformed token"


@pytest.mark.parametrize(
    ("claims", "missing"),
    [({"exp": START + 60}, "sub"), ({"sub": "user-1"}, "exp"), ({"sub": None, "exp": 1}, "sub")],
)
def test_a_missing_claim(claims: dict[str, object], missing: str) -> None:
    assert refusal(raw_token(claims)) == f"token is missing a claim: {missing}"


def test_an_empty_subject() -> None:
    assert refusal(raw_token({"sub": "", "exp": START + 60})) == "token has no subject"


@pytest.mark.parametrize("sub", [42, ["user-1"], {"id": "user-1"}, True])
def test_a_subject_that_is_not_a_string(sub: object) -> None:
    assert refusal(raw_token({"sub": sub, "exp": START + 60})) == "token subject is not a string"


@pytest.mark.parametrize("exp", ["tomorrow", True, [1], math.nan, math.inf])
def test_an_expiry_that_is_not_a_number(exp: object) -> None:
    # NaN would compare false with any time and so never expire.
    assert refusal(raw_token({"sub": "user-1", "exp": exp})) == "token expiry is not a number"


def test_a_float_expiry_from_elsewhere_is_honoured() -> None:
    token = raw_token({"sub": "user-1", "exp": START + 0.5})
    assert verify_token(token, SECRET, clock=ManualClock(START + 0.25)) == "user-1"
    assert refusal(token, ManualClock(START + 0.5)) == "token expired"


def test_the_token_cannot_choose_its_algorithm() -> None:
    claims = {"sub": "user-1", "exp": START + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert refusal(unsigned) == "token algorithm not allowed"
    # Right secret, but not the algorithm this server signs with.
    assert refusal(raw_token(claims, algorithm="HS512")) == "token algorithm not allowed"


def test_a_bad_jti_is_refused_as_a_token_error() -> None:
    # Any other PyJWT refusal still surfaces as a TokenError, never a PyJWT exception.
    assert refusal(raw_token({"sub": "user-1", "exp": START + 60, "jti": 7})) == "invalid token"


# -- the secret ---------------------------------------------------------------------


def test_secret_from_env() -> None:
    assert secret_from_env({"WORKBENCH_SECRET": "s3cret"}) == "s3cret"
    assert secret_from_env({}) == "workbench-dev-secret-for-local-use-only"
    assert secret_from_env({"WORKBENCH_SECRET": ""}) == "workbench-dev-secret-for-local-use-only"
    assert secret_from_env({"OTHER": "x"}) == "workbench-dev-secret-for-local-use-only"


def test_secret_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_SECRET", "from-the-environment")
    assert secret_from_env() == "from-the-environment"
    monkeypatch.delenv("WORKBENCH_SECRET")
    assert secret_from_env() == "workbench-dev-secret-for-local-use-only"


# -- the Authorization header -------------------------------------------------------


def test_no_header_is_no_token() -> None:
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    "header",
    ["Bearer abc.def.ghi", "bearer abc.def.ghi", "BEARER abc.def.ghi", "  Bearer \t abc.def.ghi  "],
)
def test_bearer_header(header: str) -> None:
    assert bearer_token(header) == "abc.def.ghi"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "abc.def.ghi",
        "Basic dXNlcjpwYXNz",
        "Bearerabc",
        "Bearer a b",
    ],
)
def test_a_malformed_header(header: str) -> None:
    with pytest.raises(TokenError) as info:
        bearer_token(header)
    assert info.value.reason == "Authorization header must be 'Bearer <token>'"


def test_header_to_user() -> None:
    clock = ManualClock(START)
    header = f"Bearer {issue_token('user-1', SECRET, clock=clock)}"
    token = bearer_token(header)
    assert token is not None
    assert verify_token(token, SECRET, clock=clock) == "user-1"
