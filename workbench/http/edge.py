"""The HTTP edge: what a connection and a request body may cost before we give up.

Guarantees, each with a ``WORKBENCH_*`` setting (:class:`EdgeLimits`):

* **Bodies** (:class:`BodyLimit`). A request whose ``Content-Length`` exceeds
  ``max_body_bytes`` is answered 413 (``Connection: close``) before the
  application runs and before a byte of the body is read; a chunked body is
  counted as it streams and refused once it passes the limit, so memory per
  request is bounded by the limit.
* **Connections** (:class:`GuardedHttpToolsProtocol`, uvicorn's httptools
  protocol with deadlines it lacks): the request line and headers must arrive
  within ``header_timeout_s`` of the connection opening or of the request's
  first byte, and be at most ``max_header_bytes`` (431 otherwise); the body
  must arrive within ``body_timeout_s`` of the headers. A silent, trickling or
  stalled client is answered 408 and closed. Between requests uvicorn's own
  keep-alive timeout (``keepalive_s``) closes idle connections. A response that
  streams for long (SSE) is not affected: the deadlines cover only the request.
* **JSON** (:class:`StrictJsonRoute`): bodies are parsed strictly: UTF-8 only,
  no ``NaN``/``Infinity``, no float that overflows to infinity, integers of at
  most :data:`MAX_INT_DIGITS` digits, nesting at most :data:`MAX_DEPTH` deep and
  no lone surrogates in strings. Anything else is a JSON decode error, which the
  routes answer 422 (commands) or 400 (the M-Pesa callback), never 500: every
  value that survives parsing can be stored and echoed back in an error body.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_DEPTH = 32  # our bodies are 2-4 levels deep; Daraja's callback is 5
MAX_INT_DIGITS = 30  # far beyond any amount or code, far below int()'s own limit


@dataclass(frozen=True)
class EdgeLimits:
    """Limits on what one connection and one request may cost the server."""

    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EdgeLimits:
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            max_body_bytes=_positive_int(env, "WORKBENCH_MAX_BODY_BYTES", default.max_body_bytes),
            max_header_bytes=_positive_int(
                env, "WORKBENCH_MAX_HEADER_BYTES", default.max_header_bytes
            ),
            header_timeout_s=_seconds(env, "WORKBENCH_HEADER_TIMEOUT_S", default.header_timeout_s),
            body_timeout_s=_seconds(env, "WORKBENCH_BODY_TIMEOUT_S", default.body_timeout_s),
            keepalive_s=_positive_int(env, "WORKBENCH_KEEPALIVE_S", default.keepalive_s),
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name) or str(default)
    try:
        value = int(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a whole number, not {text!r}") from None
    if value <= 0:
        raise RuntimeError(f"{name} must be positive, not {value}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name) or str(default)
    try:
        value = float(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a number of seconds, not {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise RuntimeError(f"{name} must be a positive number of seconds, not {text!r}")
    return value


@cache
def limits_from_env() -> EdgeLimits:
    """The process's limits, read once (uvicorn builds a protocol per connection)."""
    return EdgeLimits.from_env()


def uvicorn_options(limits: EdgeLimits | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` that install the guarded protocol."""
    limits = limits or limits_from_env()
    return {
        "http": "workbench.http.edge:GuardedHttpToolsProtocol",
        "timeout_keep_alive": limits.keepalive_s,
        # Only used if someone selects h11 instead; the guarded protocol has its own.
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }


# -- connections ----------------------------------------------------------------------------


#: Scope keys of the disconnect hook: the protocol sets ``DISCONNECT_HOOKED`` in the
#: scope of every request it serves, and calls ``scope[DISCONNECT_HOOK]()`` (if a
#: response set one) when the connection is lost. A long response (SSE) learns
#: that the client left without a task per connection parked in ``receive()``.
DISCONNECT_HOOKED = "workbench.disconnect_hooked"
DISCONNECT_HOOK = "workbench.on_disconnect"
#: Scope key of the chunk writer the protocol gives every request it serves:
#: ``scope[WRITE_CHUNK](body) -> bool`` writes one body chunk of a streaming
#: response at once, from the event loop's thread, or returns False and writes
#: nothing (see :func:`_write_chunk`). It never raises.
WRITE_CHUNK = "workbench.write_chunk"


def _write_chunk(cycle_ref: Callable[[], Any], body: bytes) -> bool:
    """Write ``body`` as one chunk of the cycle's streaming response, if it can go now.

    What uvicorn's ``send`` does for a body chunk, without the ASGI ``send``
    chain or an await: only while the response is started, chunked and not
    over, the connection is open and the transport is not asking writers to
    wait (its buffer is over the high-water mark). Otherwise False: nothing
    is written and the caller takes the ordinary, awaiting path, where a gone
    client ends the response. It bypasses the app's middleware for this
    chunk; none of ours looks at body chunks. The cycle is held weakly: the
    scope holds this writer and the cycle holds the scope, and a cycle per
    request for the garbage collector to find is what this must not cost.
    """
    cycle = cycle_ref()
    if (
        cycle is None
        or not body  # an empty chunk would end the response
        or cycle.disconnected
        or not cycle.response_started
        or cycle.response_complete
        or not cycle.chunked_encoding
        or cycle.flow.write_paused
        or cycle.transport.is_closing()
    ):
        return False
    try:
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
    except (RuntimeError, OSError):  # closed under us (uvloop raises on a closed handle)
        return False
    return True


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus header and body deadlines and a header size cap.

    uvicorn itself only times out idle keep-alive connections: a connection
    that never completes its request line and headers, or its body, is held
    forever. Each deadline is one loop timer, armed when the phase starts and
    cancelled when it ends. It also calls a response's disconnect hook
    (:data:`DISCONNECT_HOOK`) when the connection is lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits_from_env()
        self._deadline: Any = None  # asyncio.TimerHandle of the phase in progress
        self._awaiting_headers = True
        self._header_bytes = 0  # raw bytes while the headers are incomplete
        self._header_size = 0  # request line and headers as parsed
        # This connection's request cycles whose response may still be running
        # (more than one only when requests are pipelined behind a response).
        self._open_cycles: list[Any] = []

    def _arm(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, on_expiry)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, reason: str, text: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_plain_response(status, reason, text))
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "Request Timeout", "request headers not received in time")

    def _body_too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "Request Timeout", "request body not received in time")

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        # uvicorn marks only its latest cycle disconnected; with a request
        # pipelined behind a stream, the stream's cycle is an earlier one.
        for cycle in self._open_cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
            hook = cycle.scope.get(DISCONNECT_HOOK)
            if hook is not None:
                hook()
        self._open_cycles = []

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded (WebSocket): not ours now
            self._disarm()
            return
        # Judged after parsing, so a packet holding small headers and a body is fine.
        if (
            self._awaiting_headers
            and self._header_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"request line and headers exceed {self.limits.max_header_bytes} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_size = 0
        if self._deadline is None:  # a new request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.scope[DISCONNECT_HOOKED] = True  # type: ignore[literal-required]
        self._awaiting_headers = False
        self._header_bytes = 0
        self._arm(self.limits.body_timeout_s, self._body_too_slow)
        if self._header_size <= self.limits.max_header_bytes:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope:  # not an upgrade (WebSocket)
                self.scope[WRITE_CHUNK] = partial(_write_chunk, weakref.ref(cycle))  # type: ignore[literal-required]
                self._open_cycles = [c for c in self._open_cycles if not c.response_complete]
                self._open_cycles.append(cycle)
            return
        # Headers that arrived whole in one packet: answer them with a 431 app
        # instead of ours, so uvicorn's request cycle stays consistent.
        app, self.app = self.app, _headers_too_large(self.limits.max_header_bytes)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self._disarm()
        self._awaiting_headers = True
        self._header_bytes = 0
        super().on_message_complete()


def _headers_too_large(limit: int) -> ASGIApp:
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        body = f"request line and headers exceed {limit} bytes".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 431,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return refuse


# -- bodies ---------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit (413, then close)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            detail=f"request body exceeds the limit of {limit} bytes",
            headers={"Connection": "close"},  # the rest of the body is never read
        )


class BodyLimit:
    """ASGI middleware: request bodies of at most ``max_body_bytes``, else 413.

    A declared ``Content-Length`` above the limit is answered before the
    application runs, so no route (even one that never reads its body) holds
    the connection open for an announced 200 MB. A chunked body is counted as
    it streams: the ``receive`` that passes the limit raises
    :class:`BodyTooLarge`, which the routes' exception handling answers 413.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            try:
                too_large = int(declared[0]) > limit
            except ValueError:
                too_large = False  # uvicorn's parser refuses a malformed length itself
            if too_large:
                await _send_413(send, BodyTooLarge(limit).detail)
                return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # raised where no handler turned it into a response
            if started:
                raise
            await _send_413(send, exc.detail)


async def _send_413(send: Send, detail: str) -> None:
    body = json.dumps({"error": "body_too_large", "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is never read
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- JSON -----------------------------------------------------------------------------------


def _refuse_json(message: str) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, "", 0)


def _constant(name: str) -> Any:
    raise _refuse_json(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _refuse_json(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _refuse_json(f"integer of {len(text)} digits is out of range")
    return int(text)


def strict_loads(body: bytes) -> Any:
    """Parse a JSON body or raise :class:`json.JSONDecodeError` saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("body is not valid UTF-8", "", exc.start) from None
    try:
        value = json.loads(
            text, parse_constant=_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError:
        raise _refuse_json(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    _check_shape(value)
    return value


def _check_shape(value: Any) -> None:
    # Iterative, so checking cannot itself recurse too deep.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, list | dict):
            if depth > MAX_DEPTH:
                raise _refuse_json(f"JSON nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)


def _check_text(text: str) -> None:
    # A lone surrogate ("\ud800") parses but cannot be stored or sent back as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse_json("string holds a lone surrogate") from None


class StrictJsonRequest(Request):
    """A request whose ``json()`` is :func:`strict_loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Routes that parse JSON bodies with :class:`StrictJsonRequest` (set before adding routes)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler
