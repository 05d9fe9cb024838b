"""OpenAI's error answers (``{"error": {message, type, param, code}}``) and scripted faults.

Source: OpenAI's "Error codes" guide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from listener.testing.openai_fake.limits import format_seconds

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


@dataclass
class Fault:
    """One scripted failure; ``FakeOpenAI.faults`` is consumed FIFO, one per chat request.

    Attributes:
        status: HTTP status to answer: 429, 500, 503, 400, 401, ...
        code: the error body's ``code``. None picks the usual one for the status:
            429 ``rate_limit_exceeded``, 401 ``invalid_api_key``, others null. With
            ``insufficient_quota`` the body's ``type`` is ``insufficient_quota`` too.
        retry_after_s: when set, sent as the ``retry-after`` header (seconds).
        message: the error body's ``message``; empty picks a realistic default.
    """

    status: int
    code: str | None = None
    retry_after_s: float | None = None
    message: str = ""


class ApiError(Exception):
    """An answer in OpenAI's error format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {kind} object: {object_id}", param=param)


def fault_error(fault: Fault) -> ApiError:
    """The answer a scripted ``Fault`` stands for."""
    status, code = fault.status, fault.code
    if status == 429:
        code = code or "rate_limit_exceeded"
        quota = code == "insufficient_quota"
        type_ = "insufficient_quota" if quota else "requests"
        default = (
            "You exceeded your current quota, please check your plan and billing details."
            if quota
            else "Rate limit reached for requests. Please try again later."
        )
    elif status == 401:
        code = code or "invalid_api_key"
        type_ = "invalid_request_error"
        default = "Incorrect API key provided: sk-****. You can find your API key at ..."
    elif status >= 500:
        type_ = "server_error"
        default = SERVER_ERROR_MESSAGE
    else:
        type_ = "invalid_request_error"
        default = f"Scripted {status} error."
    headers = {}
    if fault.retry_after_s is not None:
        headers["retry-after"] = format_seconds(fault.retry_after_s)
    return ApiError(status, fault.message or default, type_=type_, code=code, headers=headers)


def no_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="invalid_api_key",
    )
