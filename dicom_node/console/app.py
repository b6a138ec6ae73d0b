"""The console's web application: login, sessions and the checks every route passes (role, CSRF)."""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer

from dicom_node.console.auth import SESSION_COOKIE, SESSION_MAX_AGE_S, LoginLimiter, Sessions, check_password
from dicom_node.console.auth import session_key as load_session_key
from dicom_node.route import Rule, load_rules
from pacsai import audit
from pacsai.audit import AuditEvent, EventOutcome, Participant
from pacsai.console_db import ROLES, ConsoleTables, User
from pacsai.settings import Settings
from pacsai.state import State

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
LOGIN_COOKIE = "pacsai_login"
JOB_ACTION: audit.Code = ("job-action", "99PACSAI", "Operator action on a job")
PHI_VIEW: audit.Code = ("110103", "DCM", "DICOM Instances Accessed")


class NotLoggedIn(Exception):
    """No valid session: a page redirects to the login page, anything else is answered 401."""


class Forbidden(Exception):
    """The user's role does not allow it, or the CSRF token is missing or wrong (403)."""


@dataclass
class Console:
    """What the routes share: settings, database, users, sessions, limiter, rules, the broker for re-deliveries."""

    settings: Settings
    state: State
    tables: ConsoleTables
    sessions: Sessions
    limiter: LoginLimiter
    rules: tuple[Rule, ...]
    templates: Jinja2Templates
    celery: Celery | None = None
    secure_cookies: bool = False
    cache_dir: Path = field(default_factory=lambda: Path("."))

    def user_for(self, request: Request) -> tuple[User, str]:
        """The logged-in user and their CSRF token; NotLoggedIn otherwise."""
        session = self.sessions.read(request.cookies.get(SESSION_COOKIE))
        user = self.tables.user(session.username) if session else None
        if session is None or user is None:
            raise NotLoggedIn()
        return user, session.csrf(self.sessions.key)

    def require(self, request: Request, role: str) -> tuple[User, str]:
        user, csrf = self.user_for(request)
        if not user.at_least(role):
            raise Forbidden(f"this needs the {role} role")
        return user, csrf

    async def require_post(self, request: Request, role: str) -> tuple[User, dict[str, str]]:
        """A POST: logged in, the role, and the CSRF token of this session in the form (Forbidden otherwise)."""
        user, csrf = self.user_for(request)
        form = {key: str(value) for key, value in (await request.form()).items()}
        if not secrets.compare_digest(form.get("csrf", ""), csrf):
            raise Forbidden("missing or wrong CSRF token; reload the page and try again")
        if not user.at_least(role):
            raise Forbidden(f"this needs the {role} role")
        return user, form

    def audit(self, request: Request, user: User, event: audit.Code, action: str, description: str, **kw: Any) -> None:
        who = Participant(user.username, request.client.host if request.client else "", True)
        us = Participant(f"{self.settings.node.ae_title}-console", socket.gethostname(), False, audit.APPLICATION)
        outcome = kw.pop("outcome", EventOutcome.SUCCESS)
        audit.trail_for(self.settings).record(
            AuditEvent(event, action, outcome, (who, us), description=description, **kw)
        )

    def page(
        self, request: Request, name: str, user: User | None, csrf: str = "", status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        return self.templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf, "now": time.time(), **context}, status_code=status_code
        )


def create_app(settings: Settings, state: State | None = None, celery: Celery | None = None) -> FastAPI:
    """The console for these settings (its own database connection unless `state` is given)."""
    from dicom_node.console import pages, stow

    state = state or State(settings.storage.database)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ago"] = _ago
    templates.env.filters["when"] = lambda at: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "–"
    templates.env.filters["mb"] = lambda n: f"{(n or 0) / 1048576:,.0f} MB"
    console = Console(
        settings=settings,
        state=state,
        tables=ConsoleTables(state),
        sessions=Sessions(load_session_key(settings.storage.data_dir)),
        limiter=LoginLimiter(),
        rules=load_rules(settings.node.routes_file),
        templates=templates,
        celery=celery,
        secure_cookies=settings.security.tls_cert is not None,
        cache_dir=settings.storage.data_dir / "console-cache",
    )
    app = FastAPI(title="pacsai console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _add_handlers(app, console)
    _add_login(app, console)
    pages.add_pages(app, console)
    stow.add_stow(app, console)  # STOW-RS: studies sent to us over DICOMweb
    return app


def _ago(at: float) -> str:
    if not at:
        return "never"
    seconds = max(0.0, time.time() - at)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _add_handlers(app: FastAPI, console: Console) -> None:
    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        # a browser navigating (it accepts HTML) goes to the login page; an image, a script or a POST is answered 401
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/login", status_code=303)
        return Response("login required", status_code=401)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return console.page(request, "error.html", None, message=str(exc), status_code=403)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
        return response


def _add_login(app: FastAPI, console: Console) -> None:
    login_tokens = URLSafeTimedSerializer(console.sessions.key, salt="pacsai-console-login")

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        token = secrets.token_urlsafe(16)
        response = console.page(request, "login.html", None, login_csrf=token, message="")
        _set_cookie(console, response, LOGIN_COOKIE, login_tokens.dumps(token), 600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        try:
            expected = login_tokens.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=600)
        except BadSignature:
            expected = None
        if not expected or not secrets.compare_digest(form.get("csrf", ""), str(expected)):
            raise Forbidden("the login form expired or did not come from this site; reload it")
        username, address = form.get("username", "").strip(), request.client.host if request.client else ""
        if console.limiter.locked(username, address):
            return _login_failed(console, request, "too many failed logins: wait 5 minutes", 429)
        user = check_password(console.tables, username, form.get("password", ""))
        if user is None:
            console.limiter.failed(username, address)
            nobody = User(username[:64] or "?", "", "viewer", False)
            console.audit(
                request,
                nobody,
                audit.USER_AUTHENTICATION,
                "E",
                "console login failed",
                outcome=EventOutcome.MINOR_FAILURE,
            )
            return _login_failed(console, request, "wrong user name or password", 401)
        console.limiter.succeeded(username, address)
        console.audit(request, user, audit.USER_AUTHENTICATION, "E", "console login")
        cookie, _ = console.sessions.issue(user.username)
        response = RedirectResponse("/", status_code=303)
        _set_cookie(console, response, SESSION_COOKIE, cookie, SESSION_MAX_AGE_S)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await console.require_post(request, ROLES[0])  # anyone logged in may log out
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response


def _login_failed(console: Console, request: Request, message: str, status: int) -> Response:
    token = secrets.token_urlsafe(16)
    response = console.page(request, "login.html", None, login_csrf=token, message=message)
    response.status_code = status
    serializer = URLSafeTimedSerializer(console.sessions.key, salt="pacsai-console-login")
    _set_cookie(console, response, LOGIN_COOKIE, serializer.dumps(token), 600)
    return response


def _set_cookie(console: Console, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, samesite="strict", secure=console.secure_cookies, path="/"
    )
