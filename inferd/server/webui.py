"""The web page (chat playground at `/`, live dashboard at `/dashboard`) and the JSON endpoint behind the
dashboard (`/stats`).

The pages are static files shipped in the package (inferd/server/web/, plain JS and CSS: no build step, no CDN).
They and their assets are open without an API key, so a browser can load them and then ask for the key; every API
call the pages make (models, chat, score, stats) carries it. `--no-webui` leaves out the pages, not /stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from inferd import __version__
from inferd.server.state import ServerState
from inferd.server.stats import stats

WEB_DIR = Path(__file__).parent / "web"
ASSET_PREFIX = "/ui/"
PAGE_PATHS = frozenset({"/", "/dashboard", "/ui/config"})
NO_CACHE = {"Cache-Control": "no-cache"}  # a new inferd version's page replaces the old one at once


def is_open(path: str) -> bool:
    """Whether `path` is one of the pages or their assets (served without the API key)."""
    return path in PAGE_PATHS or path.startswith(ASSET_PREFIX)


def add_routes(app: FastAPI, state: ServerState, pages: bool = True) -> None:
    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return stats(state, state.metrics.recent)

    if not pages:
        return

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=NO_CACHE)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(WEB_DIR / "dashboard.html", headers=NO_CACHE)

    @app.get("/ui/config", include_in_schema=False)
    async def page_config() -> dict[str, Any]:
        """What a page needs before its first API call: whether to ask for a key."""
        return {"api_key_required": state.api_key is not None, "version": __version__}

    app.mount(ASSET_PREFIX.rstrip("/"), StaticFiles(directory=WEB_DIR), name="webui")
