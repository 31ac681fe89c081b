"""uvicorn's HTTP/1.1 protocol, answering malformed requests in pyexec's JSON error shape.

uvicorn rejects what h11 cannot parse (oversized or malformed request lines and headers)
before the app sees it, with a plain-text 400. This subclass keeps uvicorn's handling
and changes only that answer: ``{"error": {"code", "message"}}`` like every other error,
431 ``headers_too_large`` when the request head outgrew the parser's buffer, else
400 ``bad_http_request``.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["MAX_HEAD_BYTES", "JsonErrorH11Protocol"]

#: Largest request line plus headers the server reads (uvicorn's
#: ``h11_max_incomplete_event_size``; h11's own default is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024


class JsonErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        if len(self.conn.trailing_data[0]) > limit:
            status, code = 431, "headers_too_large"
            message = f"the request line and headers exceed {limit} bytes"
        else:
            status, code = 400, "bad_http_request"
            message = "the request is not valid HTTP/1.1"
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
