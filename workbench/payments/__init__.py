"""M-Pesa payments: what Daraja says, and why we believe it.

A payment callback is a claim, not a fact. :mod:`.mpesa` parses Daraja's
callback JSON and makes the per-push callback URL (an HMAC of the payment's
reference, checked before the body is read); the service records a result
only after Daraja's STK Push Query confirms it. :mod:`.daraja` is the HTTP
client for the real Daraja and a local stand-in for tests and real-time runs;
``SimulatedGateway`` is an in-process gateway for the demo and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.payments.daraja import DarajaClient, DarajaConfig, DarajaStub
    from workbench.payments.mpesa import (
        CallbackError,
        GatewayBehaviour,
        GatewayUnavailable,
        QueryResult,
        SimulatedGateway,
        callback_token,
        parse_callback,
        reference_of,
    )

__all__ = [
    "CallbackError",
    "DarajaClient",
    "DarajaConfig",
    "DarajaStub",
    "GatewayBehaviour",
    "GatewayUnavailable",
    "QueryResult",
    "SimulatedGateway",
    "callback_token",
    "parse_callback",
    "reference_of",
]
__getattr__ = lazy(
    __name__,
    {
        "CallbackError": "mpesa",
        "DarajaClient": "daraja",
        "DarajaConfig": "daraja",
        "DarajaStub": "daraja",
        "GatewayBehaviour": "mpesa",
        "GatewayUnavailable": "mpesa",
        "QueryResult": "mpesa",
        "SimulatedGateway": "mpesa",
        "callback_token": "mpesa",
        "parse_callback": "mpesa",
        "reference_of": "mpesa",
    },
)
