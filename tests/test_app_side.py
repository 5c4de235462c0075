"""docs/reference.md: the stdlib bridge, the middlewares with each framework's own test client, and apilog.testing."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import apilog
from apilog import logger
from apilog.testing import capture

from .utils import log_file, wait_written


def test_logging_bridge(daemon: Path) -> None:
    """ERROR inside apilog.user("carol") lands in users/carol/ERROR.log with its traceback; WARNING outside, system/WARN."""
    log = logging.getLogger("bridge-test")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = apilog.LoggingHandler()
    log.addHandler(handler)
    try:
        with apilog.user("carol"):
            try:
                1 / 0  # noqa: B018 - the point is the exception
            except ZeroDivisionError:
                log.exception("payment failed")
        log.warning("disk at 91%%")
        log.info("explicit user", extra={"user": "dora"})
        log.debug("below the logger's level")
    finally:
        log.removeHandler(handler)
    wait_written()
    carol = log_file(daemon, "users/carol/ERROR.log")
    assert carol.startswith("ERROR:  payment failed\\nTraceback (most recent call last):\\n")
    assert "ZeroDivisionError: division by zero" in carol and carol.count("\n") == 1
    assert log_file(daemon, "system/WARN.log").startswith("WARN:  disk at 91%")
    assert log_file(daemon, "users/dora/INFO.log").startswith("INFO:  explicit user")
    assert not (daemon / "logs" / "system" / "DEBUG.log").exists()  # below the logger's level
    assert apilog.LoggingHandler().stream_for(logging.CRITICAL) == "ERROR"
    assert apilog.LoggingHandler(streams={logging.INFO: "LOGIN"}).stream_for(logging.ERROR) == "LOGIN"


def test_user_context_is_per_task() -> None:
    """apilog.user() is a contextvar: concurrent asyncio tasks each see their own user."""

    async def one(name: str) -> str | None:
        with apilog.user(name):
            await asyncio.sleep(0.01)
            return apilog.current_user()

    async def both() -> list[str | None]:
        return list(await asyncio.gather(one("a"), one("b")))

    assert asyncio.run(both()) == ["a", "b"]
    assert apilog.current_user() is None


def _two_requests(get: object) -> None:
    for name in ("alice", "bob"):
        response = get("/pay", headers={"X-User": name})  # type: ignore[operator]
        assert response.status_code == 200


def _check_two_users(home: Path, framework: str) -> None:
    wait_written()
    for name in ("alice", "bob"):
        assert log_file(home, f"users/{name}/INFO.log") == f"INFO:  paid via {framework}\n"


def test_fastapi_middleware(daemon: Path) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from apilog.integrations import ApilogASGIMiddleware

    app = fastapi.FastAPI()

    @app.get("/pay")
    async def pay() -> dict[str, bool]:
        logger.delay("INFO", message="paid via fastapi", timestamp=False)
        return {"ok": True}

    app.add_middleware(ApilogASGIMiddleware, get_user=lambda scope: dict(scope["headers"]).get(b"x-user", b"").decode())
    _two_requests(TestClient(app).get)
    _check_two_users(daemon, "fastapi")


def test_flask_middleware(daemon: Path) -> None:
    flask = pytest.importorskip("flask")
    from apilog.integrations import init_flask

    app = flask.Flask("t")

    @app.get("/pay")
    def pay() -> str:
        logger.delay("INFO", message="paid via flask", timestamp=False)
        return "ok"

    init_flask(app, lambda: flask.request.headers.get("X-User"))
    _two_requests(app.test_client().get)
    _check_two_users(daemon, "flask")


def test_django_middleware(daemon: Path) -> None:
    pytest.importorskip("django")
    import django
    from django.conf import settings as django_settings
    from django.http import HttpResponse
    from django.test import Client
    from django.urls import path

    from apilog.integrations import django_middleware

    def pay(request: object) -> HttpResponse:
        logger.delay("INFO", message="paid via django", timestamp=False)
        return HttpResponse("ok")

    module = type(__import__("sys"))("apilog_django_test_urls")
    module.urlpatterns = [path("pay", pay)]  # type: ignore[attr-defined]
    module.ApilogMiddleware = django_middleware(lambda request: request.headers.get("X-User"))  # type: ignore[attr-defined]
    __import__("sys").modules[module.__name__] = module
    if not django_settings.configured:
        django_settings.configure(ROOT_URLCONF=module.__name__, ALLOWED_HOSTS=["testserver"],
                                  MIDDLEWARE=[f"{module.__name__}.ApilogMiddleware"], SECRET_KEY="test")
        django.setup()
    _two_requests(lambda url, headers: Client().get("/pay", headers=headers))
    _check_two_users(daemon, "django")


def test_testing_capture(home: Path) -> None:
    """capture() collects entries, checked as usual, and nothing reaches the spool."""
    with capture() as entries:
        logger.delay("LOGIN", "zed", {"ip": "x"}, heading="New Login")
        logger.delay("NOPE", "zed", "bad stream")
    assert [e.streams for e in entries] == [["LOGIN"], []]
    assert entries[0].location == "zed" and entries[0].message == {"ip": "x"}
    assert entries[1].problems == ["unknown stream 'NOPE'"]
    assert not (home / "spool").exists()


def test_importing_apilog_or_its_commands_leaves_celery_unloaded() -> None:
    """`import apilog`, its settings and both commands' modules load neither Celery nor kombu (half a second);
    the first use of `logger` does."""
    probe = ("import sys, apilog, apilog.settings, apilog.cli, apilogd.cli, apilogd.process.service; "
             "print('celery' in sys.modules, 'kombu' in sys.modules); "
             "from apilog import logger; print('celery' in sys.modules, type(logger).__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False", "True", "LogTask"]
