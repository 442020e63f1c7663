"""An HTTP API error in OpenAI's body shape, ``{"error": {"message", "type", "param", "code"}}``, so OpenAI
clients show it as it is; raised by the routes of app.py and vllm_api.py alike."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request's failure: its HTTP status, message, and the offending field (``param``) when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind  # the error's type (None: OpenAI's, by status)

    def response(self) -> JSONResponse:
        kind = self.kind or ("invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)
