"""uvicorn's HTTP protocol with a deadline on request headers, against clients that never finish them.

uvicorn times out idle keep-alive connections, but not a connection that sends nothing, nor one that sends
its request line and headers a byte at a time ("slowloris"): each holds a socket and a file descriptor for
as long as the client likes. The service's own upload deadline (``upload_timeout_s``) only starts once the
headers are in. This protocol gives every request ``header_timeout_s`` from the moment the connection opens,
or from the first byte after the previous answer, to complete its headers; then it answers 408
``request_timeout`` and closes the connection.

It is uvicorn's own protocol class (httptools or h11, as ``Settings.http`` picks), with four methods
wrapped, and is handed to uvicorn through its documented ``http=`` parameter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from service.errors import error_body

logger = logging.getLogger("dermaseg")


def timeout_response(timeout_s: float) -> bytes:
    """The raw 408 answer, in the service's error shape, that closes the connection."""
    body = json.dumps(
        error_body("request_timeout", f"the request's headers did not arrive within {timeout_s:g} s")
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


class _HeaderDeadline:
    """Mixed into a uvicorn HTTP protocol: arms a timer while a request's headers are awaited."""

    header_timeout_s: float = 10.0
    # Set by the uvicorn protocol this is mixed into.
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        awaiting_headers = before is None or before.response_complete
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a new request's headers are complete
            self._disarm_header_deadline()
        elif awaiting_headers:  # the first bytes of the next request: its clock starts (and is never reset)
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return
        logger.info("closing a connection whose request headers took over %g s", self.header_timeout_s)
        self.transport.write(timeout_response(self.header_timeout_s))
        self.transport.close()


def header_deadline_protocol(http: str, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for ``http`` (``auto``, ``h11`` or ``httptools``) with the header deadline."""
    base: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS[http])
    return type(
        f"HeaderDeadline{base.__name__}",
        (_HeaderDeadline, base),
        {"header_timeout_s": header_timeout_s, "__module__": __name__},
    )
