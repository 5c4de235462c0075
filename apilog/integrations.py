"""Middlewares that set the current user per request (ASGI: FastAPI and Starlette; Flask; Django).

Each takes a function returning the request's user name (or None for "system"); none of the
frameworks is required by apilog itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .core.context import reset_user, set_user

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


class ApilogASGIMiddleware:
    """ASGI middleware: `app.add_middleware(ApilogASGIMiddleware, get_user=lambda scope: ...)`.

    `get_user` gets the ASGI scope (headers, path, and `scope["user"]` under Starlette's
    AuthenticationMiddleware) and may be a coroutine function.
    """

    def __init__(self, app: ASGIApp, get_user: Callable[[Scope], Any]) -> None:
        self.app = app
        self.get_user = get_user

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]], send: Callable[..., Awaitable[Any]]) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        name = self.get_user(scope)
        if inspect.isawaitable(name):
            name = await name
        token = set_user(name or None)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_user(token)


def init_flask(app: Any, get_user: Callable[[], str | None]) -> None:
    """Flask: `init_flask(app, lambda: flask.g.user)` sets the current user for each request."""
    from flask import g  # Flask is an optional extra

    @app.before_request  # type: ignore[untyped-decorator]  # `app` is any Flask app: not imported here
    def _apilog_set_user() -> None:
        g._apilog_token = set_user(get_user() or None)

    @app.teardown_request  # type: ignore[untyped-decorator]
    def _apilog_reset_user(_exc: BaseException | None) -> None:
        token = g.pop("_apilog_token", None)
        if token is not None:
            reset_user(token)


def django_middleware(get_user: Callable[[Any], str | None] | None = None) -> type:
    """Django: a middleware class; by default the user is `request.user.get_username()` when logged in.

        # settings.py                       # yourapp/middleware.py
        MIDDLEWARE = [..., "yourapp.middleware.ApilogMiddleware"]
                                            ApilogMiddleware = django_middleware(lambda request: ...)
    """

    def default(request: Any) -> str | None:
        user = getattr(request, "user", None)
        return user.get_username() if user is not None and user.is_authenticated else None

    pick = get_user or default

    class ApilogDjangoMiddleware:
        def __init__(self, get_response: Callable[[Any], Any]) -> None:
            self.get_response = get_response

        def __call__(self, request: Any) -> Any:
            token = set_user(pick(request) or None)
            try:
                return self.get_response(request)
            finally:
                reset_user(token)

    return ApilogDjangoMiddleware
