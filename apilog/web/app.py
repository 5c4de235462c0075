"""The pages and the JSON API of `apilog web`: read-only routes over a Trail, every value escaped by the templates."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from apilog.reading import since as parse_since
from apilog.settings import Settings

from .auth import TokenGate
from .trail import ALERTS, Item, Trail

USERS_PER_PAGE = 100
ENTRIES_PER_PAGE = 200
MAX_LIMIT = 1000
MAX_STREAMS = 256  # in a live tail's position
CHART_HOURS = 48
STATS_NAME = "stats.json"  # apilogd's report in its state folder, refreshed every few seconds
STATS_FRESH = 30.0  # seconds after which a report is taken for a stopped daemon's


def _limits_now(settings: Settings) -> dict[str, Any]:
    """Who apilogd limits right now and whether the log disk is full, from its last report (docs/operations.md, "Limits").

    Empty when the daemon's report is stale or not readable by this process (it runs as apilogd's
    user or in its group to see it).
    """
    try:
        stats = json.loads((settings.state_dir / STATS_NAME).read_bytes())
        limits = stats["limits"]
        fresh = time.time() - float(stats["updated"]) < STATS_FRESH
    except (OSError, ValueError, KeyError, TypeError):
        return {"limited_now": [], "log_disk_full": False}
    if not fresh or not isinstance(limits, dict):
        return {"limited_now": [], "log_disk_full": False}
    limited = [{"user": str(item.get("user")), "stream": str(item.get("stream")), "reason": str(item.get("reason")),
                "suppressed": int(item.get("suppressed", 0))}
               for item in limits.get("limited_now", []) if isinstance(item, dict)]
    return {"limited_now": limited, "log_disk_full": bool(limits.get("log_disk_full"))}


def create_app(settings: Settings, token: str) -> Starlette:
    """The web view of `settings`' log tree, open to holders of `token`."""
    trail = Trail(settings)
    env = Environment(loader=PackageLoader("apilog.web", "templates"), autoescape=select_autoescape(default=True))
    env.filters["when"] = _when
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.filters["user_url"] = user_url
    env.globals["alerts"] = ALERTS

    def render(template: str, **values: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**values))

    def user_of(request: Request) -> tuple[str, dict[str, list[Path]]]:
        """The user a request names, and the user's files by stream (listed once for the whole request)."""
        name = request.path_params.get("name") or request.query_params.get("name") or request.query_params.get("user") or ""
        if trail.folder(name) is None:
            raise HTTPException(404, "no such user")  # and never a path: the tree's encoder made the folder
        return name, trail.streams(name)

    def streams_asked(request: Request) -> set[str] | None:
        return {s.strip().upper() for s in request.query_params.getlist("stream") if s.strip()} or None

    def search_asked(request: Request) -> tuple[str, str | None, set[str] | None]:
        """(text, user, streams) of a search; an unknown user is a 404."""
        user = request.query_params.get("user") or None
        if user is not None and trail.folder(user) is None:
            raise HTTPException(404, "no such user")
        return request.query_params.get("q", ""), user, streams_asked(request)

    def wanted(request: Request) -> tuple[set[str] | None, float | None, int]:
        streams = streams_asked(request)
        raw_since = request.query_params.get("since") or None
        try:
            since = parse_since(raw_since) if raw_since else None
            limit = min(MAX_LIMIT, max(1, int(request.query_params.get("limit", ENTRIES_PER_PAGE))))
        except (ValueError, OverflowError):
            raise HTTPException(400, "since is an ISO time or an age like 2h; limit a number") from None
        return streams, since, limit

    def users_listed(request: Request) -> tuple[list[Any], int, int]:
        needle = request.query_params.get("q", "").casefold()
        try:
            page = max(0, int(request.query_params.get("page", 0)))
        except ValueError:
            page = 0
        everyone = [(n, t) for n, t in trail.users() if needle in n.casefold()]
        chosen = everyone[page * USERS_PER_PAGE:(page + 1) * USERS_PER_PAGE]
        return [trail.summary(n, t) for n, t in chosen], len(everyone), page

    def users_page(request: Request) -> Response:
        summaries, total, page = users_listed(request)
        return render("users.html", users=summaries, total=total, page=page, per_page=USERS_PER_PAGE,
                      q=request.query_params.get("q", ""), limits=_limits_now(settings))

    def user_page(request: Request) -> Response:
        name, files = user_of(request)
        streams, since, limit = wanted(request)
        items, cursor = trail.page(files, streams, limit, request.query_params.get("before"), since)
        first_hour, counts = trail.activity(files, CHART_HOURS)
        return render("user.html", name=name, items=items, cursor=cursor, every=list(files), shown=streams,
                      since=request.query_params.get("since", ""), chart=_chart(first_hour, counts),
                      live=_encode_sizes(trail.live_sizes(files)) if request.query_params.get("before") is None else "")

    def search_page(request: Request) -> Response:
        needle, user, streams = search_asked(request)
        found, partial = trail.search(needle, user=user, streams=streams) if needle else ([], False)
        return render("search.html", q=needle, user=user or "", found=found, partial=partial)

    def api_users(request: Request) -> Response:
        summaries, total, page = users_listed(request)
        return JSONResponse({"total": total, "page": page, "limits": _limits_now(settings), "users": [
            {"name": s.name, "last_activity": _iso(s.last_activity), "counts": s.counts} for s in summaries]})

    def api_entries(request: Request) -> Response:
        name, files = user_of(request)
        streams, since, limit = wanted(request)
        items, cursor = trail.page(files, streams, limit, request.query_params.get("before"), since)
        return JSONResponse({"user": name, "entries": [_json(i) for i in items], "before": cursor})

    def api_tail(request: Request) -> Response:
        _, files = user_of(request)
        raw = request.query_params.get("after")
        items, sizes = trail.after(files, None if raw is None else _decode_sizes(raw))
        return JSONResponse({"entries": [_json(i) for i in items], "after": _encode_sizes(sizes)})

    def api_search(request: Request) -> Response:
        if not request.query_params.get("q"):
            raise HTTPException(400, "q is required")
        needle, user, streams = search_asked(request)
        found, partial = trail.search(needle, user=user, streams=streams)
        return JSONResponse({"partial": partial, "results": [{"user": u, **_json(i)} for u, i in found]})

    def api_activity(request: Request) -> Response:
        name, files = user_of(request)
        first_hour, counts = trail.activity(files, CHART_HOURS)
        return JSONResponse({"user": name, "first_hour": _iso(first_hour), "per_hour": counts})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": detail}, status_code=code)
        return HTMLResponse(env.get_template("error.html").render(code=code, detail=detail), status_code=code)

    routes = [
        Route("/", users_page),
        Route("/u/{name:path}", user_page),
        Route("/user", user_page),  # ?name=: for the users named . and ..
        Route("/search", search_page),
        Route("/api/users", api_users),
        Route("/api/entries", api_entries),
        Route("/api/tail", api_tail),
        Route("/api/search", api_search),
        Route("/api/activity", api_activity),
        Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenGate, token=token)],
                     exception_handlers={HTTPException: not_found})


def user_url(name: str) -> str:
    """A user's page; `.` and `..` by the query, which no browser folds away as a dot segment."""
    return f"/user?name={quote(name, safe='')}" if name in (".", "..") else f"/u/{quote(name, safe='')}"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _json(item: Item) -> dict[str, Any]:
    return {"stream": item.stream, "ts": _iso(item.ts), "text": item.text, "file": item.file}


def _encode_sizes(sizes: dict[str, int]) -> str:
    return ",".join(f"{quote(path, safe='')}:{size}" for path, size in sizes.items())


def _decode_sizes(raw: str) -> dict[str, int]:
    out = {}
    for part in raw.split(",")[:MAX_STREAMS]:
        path, _, size = part.rpartition(":")
        if path and size.isascii() and size.isdigit() and len(size) <= 18:
            out[unquote(path)] = int(size)
    return out


def _chart(first_hour: float, counts: dict[str, list[int]]) -> dict[str, Any]:
    """Stacked bars per hour, as shapes for the template's SVG (alert streams on top, in their colours)."""
    hours = len(next(iter(counts.values()))) if counts else CHART_HOURS
    totals = [sum(c[h] for c in counts.values()) for h in range(hours)]
    top = max(totals, default=0) or 1
    order = sorted(counts, key=lambda s: (s in ALERTS, s))
    bars = []
    for hour in range(hours):
        y = 100.0
        for stream in order:
            n = counts[stream][hour]
            if n:
                height = 100.0 * n / top
                y -= height
                bars.append({"x": hour * 10, "y": round(y, 2), "h": round(height, 2), "stream": stream, "n": n,
                             "hour": _when(first_hour + hour * 3600)})
    return {"bars": bars, "width": hours * 10, "top": top, "streams": order,
            "from": _when(first_hour), "to": _when(time.time())}
