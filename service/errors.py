"""One domain error class carrying its HTTP status and a stable code, and the handlers that render it.

Every error answer has the same shape, ``{"error": {"code": "...", "message": "..."}}``; clients branch on
``code``, never on the message. Unexpected exceptions become ``internal_error`` without their details (the
request middleware logs them with the request id).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.imaging import ImageDecodeError

logger = logging.getLogger("dermaseg.errors")

#: Every code the service answers with, and its HTTP status.
ERROR_CODES: dict[str, int] = {
    "undecodable_image": 400,
    "malformed_request": 400,
    # The Open Inference Protocol's (/v2, service.routes.v2): its request is malformed, or lacks the image.
    "invalid_inference_request": 400,
    "missing_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_model": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "request_timeout": 408,
    "payload_too_large": 413,
    "image_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "internal_error": 500,
    "not_ready": 503,
    "overloaded": 503,
}

#: Status of each :class:`~service.imaging.ImageDecodeError` code.
_DECODE_STATUS = {"undecodable_image": 400, "unsupported_media_type": 415, "image_too_large": 413}


class ServiceError(Exception):
    """An error the client is told about: HTTP status, stable code, human message, optional headers."""

    def __init__(
        self, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def from_decode_error(cls, error: ImageDecodeError) -> ServiceError:
        """Maps an image decoding failure to 400, 413 or 415."""
        return cls(_DECODE_STATUS.get(error.code, 400), error.code, error.message)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code, headers=dict(headers or {}))


async def _service_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    return error_response(error.status_code, error.code, error.message, error.headers)


async def _validation_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        where = ".".join(
            str(part) for part in item.get("loc", ()) if part not in ("query", "header", "body", "form")
        )
        problems.append(
            f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid"))
        )
    return error_response(422, "validation_error", "; ".join(problems) or "invalid request")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 406: "not_acceptable", 401: "unauthorized"}


async def _http_error_handler(request: Request, error: Exception) -> JSONResponse:
    # Starlette raises these for unknown paths and wrong methods; give them the common shape too.
    assert isinstance(error, StarletteHTTPException)
    code = _HTTP_CODES.get(error.status_code) or HTTPStatus(error.status_code).phrase.lower().replace(
        " ", "_"
    )
    message = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    return error_response(error.status_code, code, message, error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers; unexpected exceptions are turned into 500s by the request middleware."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
