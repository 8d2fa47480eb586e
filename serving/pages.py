"""The web page for people (serving/ui/, at /ui/) and where BentoML's Swagger page moves to make room for it.

BentoML answers `/` with its Swagger page. A person who opens the service should land on the page that
scores a row instead, so `GET /` redirects to `/ui/`, and `/docs` serves our own copy of the Swagger page
(serving/ui/openapi.html): BentoML's loads Google Tag Manager from the web, which a service that must work
offline (and not report its users' visits) cannot serve. Swagger UI's assets stay BentoML's, at
`/static_content/`, and the spec at `/docs.json`.

The page's files are static: the page reads the model's feature schema from `GET /model` at run time and
builds its form from it, so one set of files serves every model and follows the champion when it changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

Scope = dict[str, Any]
UI_DIR = Path(__file__).parent / "ui"
UI_PATH = "/ui"
DOCS_PATH = "/docs"
OPENAPI_PAGE = f"{UI_PATH}/openapi.html"


def ui_route() -> Mount:
    """/ui/: the page and its script, style and charts, all served from here (no external URL: the page
    must work offline). `/ui` itself is redirected to `/ui/` by the router, so relative URLs resolve."""
    return Mount(UI_PATH, app=StaticFiles(directory=UI_DIR, html=True), name="ui")


class PagePaths:
    """`GET /` -> 307 to /ui/; `/docs` -> the Swagger page. Added after HttpAuth, so the gate judges the
    path the client asked for."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if path == "/":
                await _redirect(send, f"{UI_PATH}/")
                return
            if path == DOCS_PATH:
                scope = {**scope, "path": OPENAPI_PAGE, "raw_path": OPENAPI_PAGE.encode()}
        await self.app(scope, receive, send)


async def _redirect(send: Any, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 307,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})
