"""Who may look: the token (APILOG_WEB_TOKEN, or one kept 0600 in the home), a cookie once shown, strict headers."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import MutableHeaders
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apilog.settings import Settings

TOKEN_NAME = "web.token"  # noqa: S105 - the file's name, not a secret
COOKIE = "apilog_web"
# Log text is the attacker's: nothing inline runs, nothing loads from elsewhere, no page frames ours.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def token_for(settings: Settings) -> str:
    """APILOG_WEB_TOKEN, else the one kept in the home (made now, 0600, when there is none)."""
    if settings.web_token:
        return settings.web_token
    path = settings.home / TOKEN_NAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o750)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


class TokenGate:
    """ASGI middleware: a request passes with the token (Bearer, cookie, or `?token=` once, which sets the cookie)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _holds(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # none is served: refused before anything reads it
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        offered = dict(query).get("token")
        bearer = headers.get("authorization", "")
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no cookie
            cookie = SimpleCookie()
        response: Response | None = None
        if offered is not None:
            if self._holds(offered):  # once: the token leaves the URL (and the history) for a cookie
                rest = urlencode([(k, v) for k, v in query if k != "token"])
                path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")  # as sent: a %2F stays one
                path = "/" + path.lstrip("/")  # never "//host/...": that would leave this site
                response = RedirectResponse(path + (f"?{rest}" if rest else ""), status_code=303)
                response.set_cookie(COOKIE, offered, httponly=True, samesite="strict", path="/")
            else:
                response = _unauthorized()
        elif not (self._holds(bearer.removeprefix("Bearer ")) if bearer.startswith("Bearer ")
                  else self._holds(cookie[COOKIE].value if COOKIE in cookie else None)):
            response = _unauthorized()
        if response is not None:
            await _with_headers(response)(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).update(HEADERS)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise
            # A bug must not answer without the policy: a plain 500 with the same headers (the traceback goes to the log).
            logging.getLogger("apilog.web").exception("error answering %s", scope.get("path"))
            await _with_headers(PlainTextResponse("500: the server failed on this request\n", status_code=500))(
                scope, receive, send)


def _unauthorized() -> Response:
    return PlainTextResponse("401: this needs the token apilog web printed (Authorization: Bearer <token>, "
                             "or ?token=<token> once)\n", status_code=401, headers={"www-authenticate": "Bearer"})


def _with_headers(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response
