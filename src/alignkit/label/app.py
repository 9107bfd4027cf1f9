"""The labeling web app (Starlette, server-rendered Jinja pages, one small static script).

Security, since model output is untrusted and the server holds people's work:

* every request needs the access token: ``?token=`` on the first visit (answered with an HttpOnly,
  SameSite=Strict cookie and a redirect that drops the token from the address bar), then the cookie;
  scripts may send ``Authorization: Bearer <token>`` instead;
* every POST carries a CSRF token (an HMAC of the access token and the labeler's name) and, when the
  browser sends Origin or Referer, it must be this server's own origin;
* Jinja autoescaping is on and the script writes only ``textContent``; the Content-Security-Policy
  allows scripts from this server's /static/ alone (no inline script, no eval), so a response that
  contains ``<script>`` or ``<img onerror>`` is shown as text and can run nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..rubric import FLAGS, LIKERT
from .forms import FLAG_TEXT, as_text, form_values, letter, parse_submission
from .store import DONE, SKIPPED, Store

TOKEN_COOKIE, LABELER_COOKIE = "alignkit_token", "alignkit_labeler"
NAME_RE = re.compile(r"^[\w][\w .@-]{0,63}$")
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chrome sends "Origin: null" on our own form posts
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Settings:
    def __init__(self, token: str, per_task: int = 1, labelers: list[str] | None = None):
        self.token = token
        self.per_task = per_task
        self.labelers = labelers or None   # None: anyone with the token picks a name

    def csrf(self, labeler: str) -> str:
        return hmac.new(self.token.encode(), f"csrf:{labeler}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(supplied.encode(), self.token.encode())


def _refuse(message: str, status: int = 403) -> Response:
    return PlainTextResponse(message + "\n", status_code=status, headers=HEADERS)


def _same_origin(request: Request) -> bool:
    """Browsers send Origin (or at least Referer) on form posts; when present it must be ours."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    if referer is not None:
        return referer == own or referer.startswith(own + "/")
    return True  # a non-browser client (no cross-site risk without a browser); the CSRF token still applies


class Guard(BaseHTTPMiddleware):
    """Access token on every request, same-origin on every POST, security headers on every answer."""

    async def dispatch(self, request: Request, call_next):
        settings: Settings = request.app.state.settings
        query_token = request.query_params.get("token")
        if query_token is not None:
            if not settings.token_ok(query_token):
                return _refuse("wrong access token: open the URL that `alignkit label serve` printed")
            if request.method == "GET":  # first visit: trade the URL token for a cookie, drop it from the URL
                params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = request.url.path + ("?" + urlencode(params) if params else "")
                response = RedirectResponse(target, status_code=303, headers=HEADERS)
                response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict", path="/")
                return response
        else:
            auth = request.headers.get("authorization", "")
            supplied = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE)
            if not settings.token_ok(supplied):
                return _refuse("missing or wrong access token: open the URL that `alignkit label serve` printed")
        if request.method in UNSAFE and not _same_origin(request):
            return _refuse("cross-origin request refused")
        response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response


# ----------------------------------------------------------------------------- helpers

def _env() -> Environment:
    env = Environment(loader=PackageLoader("alignkit.label", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.globals.update(letter=letter, flags=FLAGS, flag_text=FLAG_TEXT, likert=range(LIKERT[0], LIKERT[1] + 1))
    return env


def _render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    html = request.app.state.env.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status)


def _labeler(request: Request) -> str | None:
    name = unquote(request.cookies.get(LABELER_COOKIE, ""))
    settings: Settings = request.app.state.settings
    if not NAME_RE.match(name) or (settings.labelers and name not in settings.labelers):
        return None
    return name


def _csrf_ok(request: Request, form, labeler: str) -> bool:
    expected = request.app.state.settings.csrf(labeler)
    return hmac.compare_digest(str(form.get("csrf", "")).encode(), expected.encode())


def _store(request: Request) -> Store:
    return request.app.state.store


# ----------------------------------------------------------------------------- pages

async def home(request: Request) -> Response:
    if _labeler(request) is None:
        settings: Settings = request.app.state.settings
        return _render(request, "login.html", labelers=settings.labelers, csrf=settings.csrf(""), error=None)
    return RedirectResponse("/next", status_code=303)


async def login(request: Request) -> Response:
    form = await request.form()
    settings: Settings = request.app.state.settings
    if not _csrf_ok(request, form, ""):
        return _refuse("bad or missing CSRF token")
    name = str(form.get("name", "")).strip()
    error = None
    if not NAME_RE.match(name):
        error = "A name is 1-64 letters, digits, spaces or . _ @ -, starting with a letter or digit."
    elif settings.labelers and name not in settings.labelers:
        error = "Unknown labeler: pick a name from the list."
    if error:
        return _render(request, "login.html", 400, labelers=settings.labelers, csrf=settings.csrf(""), error=error)
    await run_in_threadpool(_store(request).ensure_labeler, name)
    response = RedirectResponse("/next", status_code=303)
    response.set_cookie(LABELER_COOKIE, quote(name), httponly=True, samesite="strict", path="/")
    return response


async def logout(request: Request) -> Response:
    form = await request.form()
    labeler = _labeler(request)
    if labeler is not None and not _csrf_ok(request, form, labeler):
        return _refuse("bad or missing CSRF token")
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(LABELER_COOKIE, path="/")
    return response


async def next_task(request: Request) -> Response:
    labeler = _labeler(request)
    if labeler is None:
        return RedirectResponse("/", status_code=303)
    settings: Settings = request.app.state.settings
    store = _store(request)
    task_id = await run_in_threadpool(store.next_task, labeler, settings.per_task)
    if task_id is not None:
        return RedirectResponse(f"/task/{task_id}", status_code=303)
    done, total = await run_in_threadpool(store.progress, labeler, settings.per_task)
    last = await run_in_threadpool(store.previous_task, labeler, -1)
    return _render(request, "done.html", labeler=labeler, done=done, total=total, back=last,
                   csrf=settings.csrf(labeler))


def _task_page(request: Request, labeler: str, a, *, values: dict, errors: list[str], status: int = 200):
    settings: Settings = request.app.state.settings
    store = _store(request)
    done, total = store.progress(labeler, settings.per_task)
    shown = [{"pos": p, "letter": letter(p), "text": as_text(a.responses[i])} for p, i in enumerate(a.order)]
    return _render(request, "task.html", status, labeler=labeler, task_id=a.task_id, prompt=as_text(a.prompt),
                   responses=shown, k=len(shown), values=values, errors=errors, done=done, total=total,
                   status_text={DONE: "labelled", SKIPPED: "skipped"}.get(a.status, ""),
                   back=store.previous_task(labeler, a.task_id), csrf=settings.csrf(labeler))


async def task_get(request: Request) -> Response:
    labeler = _labeler(request)
    if labeler is None:
        return RedirectResponse("/", status_code=303)
    task_id = request.path_params["task_id"]
    store = _store(request)
    a = await run_in_threadpool(store.assignment, labeler, task_id)
    if a is None:
        return _refuse("no such task for this labeler", 404)
    label = await run_in_threadpool(store.latest_label, labeler, task_id)
    values = form_values(label, a.order) if a.status == DONE else {}
    return await run_in_threadpool(_task_page, request, labeler, a, values=values, errors=[])


async def task_post(request: Request) -> Response:
    labeler = _labeler(request)
    if labeler is None:
        return _refuse("log in first", 403)
    form = await request.form()
    if not _csrf_ok(request, form, labeler):
        return _refuse("bad or missing CSRF token")
    task_id = request.path_params["task_id"]
    store = _store(request)
    a = await run_in_threadpool(store.assignment, labeler, task_id)
    if a is None:
        return _refuse("no such task for this labeler", 404)
    if form.get("action") == "skip":
        await run_in_threadpool(store.skip, labeler, task_id)
        return RedirectResponse("/next", status_code=303)
    fields = {k: str(v) for k, v in form.multi_items()}
    parsed = parse_submission(fields, a.order)
    if parsed.errors:
        return await run_in_threadpool(_task_page, request, labeler, a, values=fields, errors=parsed.errors,
                                       status=400)
    await run_in_threadpool(store.submit, labeler, task_id, ranks=parsed.ranks, rubric=parsed.rubric,
                            note=parsed.note)
    return RedirectResponse("/next", status_code=303)


def create_app(store: Store, *, token: str, per_task: int = 1, labelers: list[str] | None = None) -> Starlette:
    routes = [
        Route("/", home),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/next", next_task),
        Route("/task/{task_id:int}", task_get, methods=["GET"]),
        Route("/task/{task_id:int}", task_post, methods=["POST"]),
        Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.settings = Settings(token, per_task, labelers)
    app.state.store = store
    app.state.env = _env()
    return app
