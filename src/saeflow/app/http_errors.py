"""How the API answers what goes wrong: the status of each error, the 422 detail trimmed so a
bad body is not echoed back, the 503 of an unreadable table, and the body-size limit."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from saeflow.app.views import NotFound
from saeflow.errors import MissingSAEError, SaeflowError

MAX_BODY_BYTES = 1 << 20  # a 256-intervention plan is ~20 kB; nothing valid comes near 1 MiB
MAX_ECHO_CHARS = 120  # of a bad value quoted back in a 422
MAX_ERRORS = 20  # per 422


class ErrorDetail(BaseModel):
    detail: str = Field(..., description="what was wrong and what to do")


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorDetail, "description": "a request that cannot run as asked"},
    404: {"model": ErrorDetail, "description": "an unknown feature, slot or part of the run"},
    413: {"model": ErrorDetail, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    503: {"model": ErrorDetail, "description": "what this server cannot do now: no model, an "
                                               "unreadable table, a missing scorer"},
}


def error_status(exc: Exception) -> int:
    """The HTTP status of an error raised while answering: 404 for what does not exist, 400 for
    a request that cannot run as asked, 503 for what this server cannot do now."""
    if isinstance(exc, (NotFound, MissingSAEError)):
        return 404
    if isinstance(exc, table_errors()):
        return 503
    if isinstance(exc, ValueError):  # PlanError, GenerationError, FlowError, ...
        return 400
    return 503  # AppError (no model), HubError / EvalError (a scorer), an unreadable table...


def table_errors() -> tuple[type[Exception], ...]:
    """Errors of the table readers: a truncated or corrupt parquet file of the run."""
    import duckdb
    import pyarrow

    return (duckdb.Error, pyarrow.ArrowException)


async def unreadable_table(request: Request, exc: Exception):
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return JSONResponse({"detail": f"a table of this run cannot be read ({first}); rerun the "
                                   f"stage that wrote it (saeflow flow / index / stats)"},
                        status_code=503)


async def _not_found(request: Request, exc: Exception):
    return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)


async def _saeflow_error(request: Request, exc: Exception):
    return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))


async def _bad_value(request: Request, exc: Exception):
    if isinstance(exc, table_errors()):  # pyarrow's ArrowInvalid is a ValueError too
        return await unreadable_table(request, exc)
    # a request that cannot run as asked (a ValueError of a library, say)
    return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))


async def _invalid(request: Request, exc: Exception):
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": short_errors(exc.errors())}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers with a JSON `detail`: 404, 400, 422 or 503 (see error_status)."""
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(SaeflowError, _saeflow_error)
    app.add_exception_handler(ValueError, _bad_value)
    app.add_exception_handler(RequestValidationError, _invalid)
    for table_error in table_errors():
        app.add_exception_handler(table_error, unreadable_table)


def echo(value):
    """A bad input as quoted back in a 422: scalars as they are, long text cut, containers
    summarised (the body that failed may be megabytes)."""
    if value is None or isinstance(value, (bool, int)):
        return value if not isinstance(value, int) or abs(value) < 10**15 else str(value)[:40]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else \
            f"{value[:MAX_ECHO_CHARS]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return type(value).__name__


def short_errors(errors) -> list[dict]:
    """FastAPI's 422 detail (loc, msg, type, input) with each input trimmed by echo and at most
    MAX_ERRORS entries."""
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        item = {"loc": [x if isinstance(x, (str, int)) else str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type", ""))}
        if "input" in e:
            item["input"] = echo(e["input"])
        out.append(item)
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more errors",
                    "type": "too_many_errors"})
    return out


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, by Content-Length or while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            res = JSONResponse({"detail": self._too_big()}, status_code=413)
            return await res(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body without Content-Length
                raise StarletteHTTPException(413, self._too_big())
            return message
        return await self.app(scope, counted, send)

    def _too_big(self) -> str:
        return f"the request body is over {self.max_bytes} bytes; send less"
