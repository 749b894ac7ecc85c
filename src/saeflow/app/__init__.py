"""The web app: a JSON API (server.py, routes/) and a single page (static/) over one RUN
directory. Its names load on first use, so importing the package (the CLI does) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

DEFAULT_HOST = "127.0.0.1"  # localhost only: nothing is served to other machines unless asked
DEFAULT_PORT = 8765

_EXPORTS = {
    "create_app": "saeflow.app.server",
    "serve": "saeflow.app.server",
    "flow_pack_spec": "saeflow.app.server",
    "RunData": "saeflow.app.views",
    "NotFound": "saeflow.app.views",
    "LiveModel": "saeflow.app.live",
    "SteerRequest": "saeflow.app.schemas",
    "ActivationsRequest": "saeflow.app.schemas",
}

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "create_app", "serve", "flow_pack_spec", "RunData",
           "NotFound", "LiveModel", "SteerRequest", "ActivationsRequest"]

if TYPE_CHECKING:
    from saeflow.app.live import LiveModel
    from saeflow.app.schemas import ActivationsRequest, SteerRequest
    from saeflow.app.server import create_app, flow_pack_spec, serve
    from saeflow.app.views import NotFound, RunData

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
