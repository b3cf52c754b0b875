"""Signed bearer tokens: who is asking.

A token is an HS256 JWT whose ``sub`` claim is the user id and whose ``exp``
claim says when it stops being accepted. Whoever holds the secret can mint
tokens, so the secret is the whole of the trust model: there is no user
database behind it.

Time claims are judged on an injected :class:`~workbench.domain.clock.Clock`, never on
the wall clock, so expiry behaves the same under simulated time and in tests.
Every way a token can be refused raises :class:`TokenError` with a readable
``reason``; nothing else escapes :func:`verify_token`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping

import jwt
from jwt.exceptions import InvalidSubjectError

from workbench.domain.clock import Clock, SystemClock

_ALGORITHM = "HS256"
_DEV_SECRET = "workbench-dev-secret-for-local-use-only"
_BEARER_FORMAT = "Authorization header must be 'Bearer <token>'"


class TokenError(Exception):
    """A token (or the header carrying it) is not acceptable; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def secret_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The signing secret: ``WORKBENCH_SECRET``, or a fixed development default.

    The default (``"workbench-dev-secret-for-local-use-only"``) is public, so anyone can mint
    tokens a server using it will accept: it is for local use only. Any
    deployment reachable by someone else must set ``WORKBENCH_SECRET``.
    """
    env = os.environ if environ is None else environ
    return env.get("WORKBENCH_SECRET") or _DEV_SECRET


def issue_token(
    user_id: str, secret: str, *, ttl_s: float = 3600.0, clock: Clock | None = None
) -> str:
    """A token for ``user_id`` that is accepted for ``ttl_s`` seconds from now."""
    if not user_id:
        raise ValueError("user_id must be non-empty")
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError("ttl_s must be a positive, finite number of seconds")
    _check_secret(secret)
    now = (clock or SystemClock()).now()
    # JWT times are whole seconds. Rounding exp up means a token is never
    # accepted for less than ttl_s, and a short ttl never yields exp == iat.
    claims = {"sub": user_id, "iat": int(now), "exp": math.ceil(now + ttl_s)}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def verify_token(token: str, secret: str, *, clock: Clock | None = None) -> str:
    """The user id a valid token was issued for; :class:`TokenError` otherwise."""
    _check_secret(secret)
    user_id, exp = _claims(token, secret)
    if exp <= (clock or SystemClock()).now():
        raise TokenError("token expired")
    return user_id


#: Tokens whose signature and claims were verified, by (token, secret): a phone
#: sends the same token with every request, and PyJWT's decode costs more than
#: the rest of authenticating it. Only accepted tokens are kept (a refusal
#: raises, and lru_cache keeps no exceptions), and expiry is judged on every
#: call, so the cache changes no decision.
_VERIFIED_TOKENS = 8192


@functools.lru_cache(maxsize=_VERIFIED_TOKENS)
def _claims(token: str, secret: str) -> tuple[str, int | float]:
    """``(sub, exp)`` of a token whose signature and claims are sound."""
    try:
        claims = jwt.decode(
            token,
            secret,
            # A fixed list: the token's own header must not choose the algorithm.
            algorithms=[_ALGORITHM],
            # PyJWT would judge exp/iat/nbf on the wall clock; exp is checked
            # by verify_token on the injected clock instead. We never issue nbf,
            # and iat carries no decision.
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "require": ["sub", "exp"],
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except jwt.DecodeError:
        raise TokenError("malformed token") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"token is missing a claim: {exc.claim}") from None
    except InvalidSubjectError:  # not re-exported at the top of jwt
        raise TokenError("token subject is not a string") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("token algorithm not allowed") from None
    except jwt.PyJWTError:
        raise TokenError("invalid token") from None

    exp = claims["exp"]
    # bool is an int, and Python's JSON parser accepts NaN, which compares
    # false with everything and so would never expire.
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise TokenError("token expiry is not a number")
    user_id: str = claims["sub"]
    if not user_id:
        raise TokenError("token has no subject")
    return user_id, exp


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` header value.

    ``None`` when there is no header (the caller decides whether anonymous is
    allowed); :class:`TokenError` when a header is there but is not a bearer
    token, so a client sending the wrong scheme hears about it.
    """
    if authorization is None:
        return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise TokenError(_BEARER_FORMAT)
    return parts[1]


def _check_secret(secret: str) -> None:
    # An empty HMAC key is a configuration mistake, not a bad token.
    if not secret:
        raise ValueError("secret must be non-empty")
