"""The files the server hands out: the single page and its static files, plotly's bundle, and
files inside RUN (resolved; a path that leaves RUN is a 404). None is in the API's schema."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from saeflow.app.deps import Data
from saeflow.errors import AppError

STATIC = Path(__file__).parent.parent / "static"

router = APIRouter()


def plotly_bundle() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise AppError(f"plotly's bundled plotly.min.js is missing at {path}; "
                       f"reinstall plotly")
    return path


@router.get("/files/{path:path}", summary="A file of the run (plots, tables)",
            include_in_schema=False)
def run_file(data: Data, path: str):
    target = (data.root / path).resolve()
    try:
        target.relative_to(data.root)
    except ValueError:
        raise HTTPException(404, "no such file in this run") from None
    if not target.is_file():
        raise HTTPException(404, "no such file in this run")
    return FileResponse(target)


@router.get("/assets/plotly.min.js", include_in_schema=False)
def plotly_js():
    return FileResponse(plotly_bundle(), media_type="application/javascript")


def index():
    return FileResponse(STATIC / "index.html")


def add_files(app: FastAPI) -> None:
    """The run's files and plotly's bundle, the static folder, and the page at /."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", index, include_in_schema=False)
