"""Daraja over HTTP: the STK push and STK Push Query client, and a local stand-in.

:class:`DarajaClient` is the production gateway (``WORKBENCH_MPESA=external``):
``stk_push`` posts ``/mpesa/stkpush/v1/processrequest`` and ``query`` posts
``/mpesa/stkpushquery/v1/query``, both with ``Password = base64(shortcode +
passkey + timestamp)``. Any transport error, 5xx or malformed answer raises
:class:`~workbench.payments.mpesa.GatewayUnavailable`, so the caller retries later and
never acts on a guess; Daraja's "still being processed" answer is a pending
:class:`~workbench.payments.mpesa.QueryResult`.

:class:`DarajaStub` is a real HTTP server speaking the same two requests, for
tests and the real-time simulation: it makes CheckoutRequestIDs, remembers each
push (with its CallBackURL, which only the gateway learns), and answers queries
from results its owner sets with :meth:`DarajaStub.settle`.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from workbench.payments.mpesa import GatewayUnavailable, QueryResult

PROCESSING = "500.001.1001"  # Daraja: "The transaction is being processed"


@dataclass(frozen=True)
class DarajaConfig:
    """Where Daraja is and who we are to it (``WORKBENCH_DARAJA_*``)."""

    base_url: str
    shortcode: str = "174379"
    passkey: str = ""
    consumer_key: str = ""
    consumer_secret: str = ""
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> DarajaConfig | None:
        url = env.get("WORKBENCH_DARAJA_URL")
        if not url:
            return None
        return cls(
            base_url=url.rstrip("/"),
            shortcode=env.get("WORKBENCH_DARAJA_SHORTCODE", "174379"),
            passkey=env.get("WORKBENCH_DARAJA_PASSKEY", ""),
            consumer_key=env.get("WORKBENCH_DARAJA_CONSUMER_KEY", ""),
            consumer_secret=env.get("WORKBENCH_DARAJA_CONSUMER_SECRET", ""),
        )


def password(shortcode: str, passkey: str, timestamp: str) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode()


class DarajaClient:
    """The payment gateway as Daraja serves it (thread-safe: one httpx client)."""

    def __init__(self, config: DarajaConfig) -> None:
        self.config = config
        self.http = httpx.Client(base_url=config.base_url, timeout=config.timeout_s)
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        c = self.config
        if not c.consumer_key:
            return {}
        with self._lock:
            if self._token is None or self._token[1] < time.monotonic():
                r = self._call(
                    "GET",
                    "/oauth/v1/generate",
                    params={"grant_type": "client_credentials"},
                    auth=(c.consumer_key, c.consumer_secret),
                )
                body = r.json()
                ttl = float(body.get("expires_in", 3599))
                self._token = (str(body["access_token"]), time.monotonic() + ttl - 60)
            return {"Authorization": f"Bearer {self._token[0]}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"Daraja {path}: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 500 and _error_code(r) != PROCESSING:
            raise GatewayUnavailable(f"Daraja {path}: HTTP {r.status_code}")
        return r

    def _signed(self) -> dict[str, str]:
        c = self.config
        timestamp = time.strftime("%Y%m%d%H%M%S")
        return {
            "BusinessShortCode": c.shortcode,
            "Password": password(c.shortcode, c.passkey, timestamp),
            "Timestamp": timestamp,
        }

    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        body = {
            **self._signed(),
            "TransactionType": "CustomerPayBillOnline",
            "Amount": amount,
            "PartyA": phone,
            "PartyB": self.config.shortcode,
            "PhoneNumber": phone,
            "CallBackURL": callback_url,
            "AccountReference": reference[-12:],
            "TransactionDesc": f"escrow {escrow_id}"[:13],
        }
        r = self._call(
            "POST", "/mpesa/stkpush/v1/processrequest", json=body, headers=self._headers()
        )
        try:
            data = r.json()
            checkout = data["CheckoutRequestID"]
        except (ValueError, KeyError, TypeError):
            raise GatewayUnavailable(
                f"Daraja STK push answered {r.status_code}: {r.text[:200]}"
            ) from None
        if str(data.get("ResponseCode", "0")) != "0" or not isinstance(checkout, str):
            raise GatewayUnavailable(f"Daraja refused the STK push: {r.text[:200]}")
        return checkout

    def query(self, checkout_request_id: str) -> QueryResult:
        body = {**self._signed(), "CheckoutRequestID": checkout_request_id}
        r = self._call("POST", "/mpesa/stkpushquery/v1/query", json=body, headers=self._headers())
        if _error_code(r) == PROCESSING:
            return QueryResult(checkout_request_id, None, "The transaction is being processed")
        try:
            data = r.json()
            code = int(data["ResultCode"])
            answered = data.get("CheckoutRequestID", checkout_request_id)
        except (ValueError, KeyError, TypeError):
            raise GatewayUnavailable(
                f"Daraja query answered {r.status_code}: {r.text[:200]}"
            ) from None
        if answered != checkout_request_id:
            raise GatewayUnavailable(f"Daraja answered a query for another checkout: {answered!r}")
        return QueryResult(checkout_request_id, code, str(data.get("ResultDesc", "")))

    def close(self) -> None:
        self.http.close()


def _error_code(r: httpx.Response) -> str | None:
    try:
        data = r.json()
    except ValueError:
        return None
    return data.get("errorCode") if isinstance(data, dict) else None


# -- a stand-in for tests and the real-time simulation --------------------------------


@dataclass
class Push:
    checkout_request_id: str
    reference: str
    amount: int
    phone: str
    callback_url: str
    password_ok: bool


class DarajaStub:
    """A local Daraja: STK push and STK Push Query over real HTTP.

    Results are what the owner says (:meth:`settle`); until then a query is
    "being processed". ``unavailable`` makes every request answer 503,
    ``push_delay_s`` makes the STK push slow, and ``drop_pushes`` makes it
    answer 503 (after the delay) without taking the push.
    """

    def __init__(self, shortcode: str = "174379", passkey: str = "stub-passkey") -> None:
        self.shortcode, self.passkey = shortcode, passkey
        self.pushes: dict[str, Push] = {}
        self.by_reference: dict[str, Push] = {}
        self.results: dict[str, tuple[int, str]] = {}
        self.unavailable = False
        self.push_delay_s = 0.0
        self.drop_pushes = False
        self.pushes_started = 0
        self.queries = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        """What an API process needs to use this stub as its gateway."""
        return {
            "WORKBENCH_DARAJA_URL": self.url,
            "WORKBENCH_DARAJA_SHORTCODE": self.shortcode,
            "WORKBENCH_DARAJA_PASSKEY": self.passkey,
        }

    def settle(self, checkout_request_id: str, code: int, desc: str = "") -> None:
        with self._lock:
            self.results[checkout_request_id] = (code, desc or ("ok" if code == 0 else "failed"))

    def push_for(self, reference_suffix: str) -> Push | None:
        with self._lock:
            return next(
                (p for r, p in self.by_reference.items() if r.endswith(reference_suffix)), None
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.unavailable:
            return 503, {"errorCode": "503.001.01", "errorMessage": "unavailable"}
        expected = password(self.shortcode, self.passkey, str(body.get("Timestamp", "")))
        password_ok = body.get("Password") == expected
        if not password_ok:
            return 400, {"errorCode": "400.002.02", "errorMessage": "Invalid Password"}
        if path == "/mpesa/stkpush/v1/processrequest":
            with self._lock:
                self.pushes_started += 1
            delay, drop = self.push_delay_s, self.drop_pushes
            if delay:
                time.sleep(delay)
            if drop:
                return 503, {"errorCode": "503.001.01", "errorMessage": "push dropped"}
            checkout = f"ws_CO_stub{next(self._ids):08d}"
            push = Push(
                checkout,
                str(body.get("AccountReference", "")),
                int(body.get("Amount", 0)),
                str(body.get("PhoneNumber", "")),
                str(body.get("CallBackURL", "")),
                password_ok,
            )
            with self._lock:
                self.pushes[checkout] = push
                self.by_reference[push.reference] = push
            return 200, {
                "MerchantRequestID": f"MR-{checkout}",
                "CheckoutRequestID": checkout,
                "ResponseCode": "0",
                "ResponseDescription": "Success. Request accepted for processing",
            }
        if path == "/mpesa/stkpushquery/v1/query":
            checkout = str(body.get("CheckoutRequestID", ""))
            with self._lock:
                self.queries += 1
                known = checkout in self.pushes
                result = self.results.get(checkout)
            if not known:
                return 400, {"errorCode": "400.002.02", "errorMessage": "Invalid CheckoutRequestID"}
            if result is None:
                return 500, {"errorCode": PROCESSING, "errorMessage": "being processed"}
            return 200, {
                "ResponseCode": "0",
                "CheckoutRequestID": checkout,
                "ResultCode": str(result[0]),
                "ResultDesc": result[1],
            }
        return 404, {"errorMessage": f"no route {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                status, answer = stub._answer(self.path, body if isinstance(body, dict) else {})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
