"""`apilog web` over a tree a real apilogd wrote: the token, escaping, traversal, paging, tail, and a real Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from apilogd.process import control

from apilog import logger, settings

from .utils import wait_for, wait_written

starlette_testclient = pytest.importorskip("starlette.testclient")

TOKEN = "t0k3n-for-the-tests"
USER = "usera1@gizzleMail.com"
ODD_USER = "../etc/passwd"  # a real user name: it must reach its own folder and nothing else
XSS_MESSAGE = "<img src=x onerror=\"document.title='pwned-message'\">"
XSS_HEADING = "<script>document.title='pwned-heading'</script>"
XSS_KEY = "<svg onload=\"document.title='pwned-key'\">"


@pytest.fixture
def tree(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A running apilogd that wrote two users' trails (one archived in part) with stored XSS payloads."""
    monkeypatch.setenv("APILOG_WEB_TOKEN", TOKEN)
    settings.reset()
    control.start(settings.load())
    try:
        for n in range(30):
            logger.delay("INFO", USER, f"opened page {n}")
        wait_written()
        subprocess.run([sys.executable, "-m", "apilog", "archive"], check=True, capture_output=True)
        for n in range(30, 40):
            logger.delay("INFO", USER, f"opened page {n}")
        wait_written()
        time.sleep(1.1)  # stamps have whole seconds: what follows is newer
        logger.delay("LOGIN", USER, {"email": USER, XSS_KEY: "value"}, dict_to_string=True, heading=XSS_HEADING)
        logger.delay("SECURITY ALERT", USER, XSS_MESSAGE)
        logger.delay("STRANGE ACTIVITY", USER, "five logins from five countries")
        logger.delay("INFO", ODD_USER, "a user whose name looks like a path")
        wait_written()
        archive = home / "logs" / "archive"
        wait_for(lambda: any(archive.rglob("*.gz")) and not any(archive.rglob("*.log")), what="compression")
        yield home
    finally:
        control.stop(settings.load())


def client(authorized: bool = True) -> starlette_testclient.TestClient:
    from apilog.web.app import create_app

    app = create_app(settings.load(), TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
    return starlette_testclient.TestClient(app, headers=headers, follow_redirects=False)


def test_no_token_or_a_wrong_one_gets_401_and_every_answer_carries_the_policy(tree: Path) -> None:
    anonymous = client(authorized=False)
    for url in ("/", f"/u/{quote(USER, safe='')}", "/api/users", "/static/style.css", "/search?q=x"):
        found = anonymous.get(url)
        assert found.status_code == 401, url
        assert "default-src 'none'" in found.headers["content-security-policy"]
    assert anonymous.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert anonymous.get("/?token=wrong").status_code == 401
    anonymous.cookies.set("apilog_web", "wrong")
    assert anonymous.get("/").status_code == 401
    ok = client().get("/")
    assert ok.status_code == 200
    assert ok.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
    assert ok.headers["x-content-type-options"] == "nosniff" and ok.headers["x-frame-options"] == "DENY"


def test_the_token_in_the_url_once_becomes_an_httponly_strict_cookie(tree: Path) -> None:
    anonymous = client(authorized=False)
    odd = quote(ODD_USER, safe="")
    first = anonymous.get(f"/u/{odd}?token={TOKEN}&stream=INFO")
    assert first.status_code == 303
    assert first.headers["location"] == f"/u/{odd}?stream=INFO"  # the token leaves the URL; the name stays encoded
    cookie = first.headers["set-cookie"]
    assert f"apilog_web={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    anonymous.cookies.set("apilog_web", TOKEN)
    after = anonymous.get(first.headers["location"])
    assert after.status_code == 200 and "a user whose name looks like a path" in after.text


def test_urls_that_would_leave_the_tree_get_404(tree: Path) -> None:
    (tree.parent / "secret.txt").write_text("INFO:  not a log\n")
    web = client()
    for url in ("/u/..%2F..%2Fsecret.txt", "/u/%2E%2E", "/u/%2E%2E%2F%2E%2E", "/u/users%2F..%2F..%2F..", "/u/",
                "/static/../../secret.txt", "/static/..%2F..%2F..%2Fsecret.txt", "/u/nobody%40example.com",
                "/api/entries?user=..%2F..%2Fsecret.txt", "/api/tail?user=..&after=", "/u/%00"):
        found = web.get(url)
        assert found.status_code == 404, (url, found.status_code)
        assert "not a log" not in found.text
    # The user literally named ../etc/passwd has its own (encoded) folder, and that is all it reaches.
    assert web.get(f"/api/entries?user={quote(ODD_USER, safe='')}").json()["entries"][0]["file"] == \
        "users/%2E.%2Fetc%2Fpasswd/INFO.log"


def test_there_is_no_write_endpoint(tree: Path) -> None:
    web = client()
    for method in ("post", "put", "delete", "patch"):
        for url in ("/", f"/u/{quote(USER, safe='')}", "/api/users", "/api/entries?user=x", "/search"):
            assert getattr(web, method)(url).status_code == 405, (method, url)


def test_stored_xss_is_shown_as_text(tree: Path) -> None:
    page = client().get(f"/u/{quote(USER, safe='')}").text
    for payload in (XSS_MESSAGE, XSS_HEADING, XSS_KEY):
        assert payload not in page
    assert "&lt;script&gt;document.title=&#39;pwned-heading&#39;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=" in page and "&lt;svg onload=" in page


def test_the_timeline_pages_through_every_entry_once_newest_first(tree: Path) -> None:
    web = client()
    seen: list[str] = []
    before = None
    while True:
        url = f"/api/entries?user={quote(USER, safe='')}&limit=7" + (f"&before={before}" if before else "")
        body = web.get(url).json()
        seen.extend(item["text"] for item in body["entries"])
        before = body["before"]
        if before is None:
            break
    infos = [t for t in seen if t.startswith("INFO:")]
    assert infos == [f"INFO:  opened page {n}" for n in range(39, -1, -1)] or \
        (sorted(infos) == sorted(set(infos)) and len(infos) == 40)  # equal stamps: order within a second is free
    assert len(seen) == 43 == len(set(seen))  # archived and live, each once
    assert [t.split(" ", 2)[2] for t in infos[:1]] and any("§" in t for t in infos)
    only = web.get(f"/api/entries?user={quote(USER, safe='')}&stream=SECURITY%20ALERT&stream=LOGIN").json()
    assert sorted(e["stream"] for e in only["entries"]) == ["LOGIN", "SECURITY ALERT"]
    assert web.get(f"/api/entries?user={quote(USER, safe='')}&since=2000-01-01").json()["entries"]
    assert not web.get(f"/api/entries?user={quote(USER, safe='')}&since=2999-01-01").json()["entries"]
    assert web.get(f"/api/entries?user={quote(USER, safe='')}&since=yesterday").status_code == 400


def test_users_search_activity_and_tail(tree: Path) -> None:
    web = client()
    users = web.get("/api/users").json()
    by_name = {u["name"]: u for u in users["users"]}
    assert by_name[USER]["counts"] == {"INFO": 40, "LOGIN": 1, "SECURITY ALERT": 1, "STRANGE ACTIVITY": 1}
    assert web.get("/api/users?q=gizzle").json()["total"] == 1
    found = web.get("/api/search?q=FIVE%20LOGINS").json()
    assert [r["user"] for r in found["results"]] == [USER] and not found["partial"]
    activity = web.get(f"/api/activity?user={quote(USER, safe='')}").json()["per_hour"]
    assert sum(activity["INFO"]) == 40 and sum(activity["SECURITY ALERT"]) == 1
    page = web.get(f"/u/{quote(USER, safe='')}").text
    assert 'class="bar s-SECURITY_ALERT alert"' in page  # alerts stand out in the chart
    start = web.get(f"/api/tail?user={quote(USER, safe='')}").json()
    logger.delay("WARN", USER, "something new")
    wait_written()
    new = web.get(f"/api/tail?user={quote(USER, safe='')}&after={quote(start['after'])}").json()
    assert [e["text"].split(" §")[0] for e in new["entries"]] == ["WARN:  something new"]


def test_the_generated_token_is_kept_0600(home: Path) -> None:
    from apilog.web.auth import token_for

    token = token_for(settings.load())
    kept = home / "web.token"
    assert kept.read_text().strip() == token and kept.stat().st_mode & 0o777 == 0o600
    assert token_for(settings.load()) == token  # the same one next time


# ---------------------------------------------------------------- a real headless Chromium


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_in_chromium_the_timeline_renders_filters_and_tails_and_no_payload_runs(tree: Path, browser: object,
                                                                               tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver: object = browser
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "apilog", "web", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _answers(port), what="apilog web to listen")
        base = f"http://127.0.0.1:{port}"
        driver.get(f"{base}/u/{quote(USER, safe='')}?token={TOKEN}")  # type: ignore[attr-defined]
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "article.entry"), what="the timeline")  # type: ignore[attr-defined]
        assert "token=" not in driver.current_url  # type: ignore[attr-defined]
        assert driver.execute_script("return document.cookie") == ""  # type: ignore[attr-defined]  # HttpOnly
        texts = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "article.entry pre")]  # type: ignore[attr-defined]
        assert len(texts) == 43
        assert any(XSS_HEADING in t for t in texts) and any(XSS_MESSAGE in t for t in texts), texts  # shown, as text
        assert any(json.dumps(XSS_KEY)[1:-1] in t for t in texts)  # a dict key, as its JSON wrote it
        assert "pwned" not in driver.title  # type: ignore[attr-defined]
        assert driver.execute_script("return document.querySelectorAll('article script, article img, article svg').length") == 0  # type: ignore[attr-defined]
        # Into the test's folder: a test never changes the checkout (docs/timeline.png is made from such a shot by hand).
        assert driver.save_screenshot(str(tmp_path / "timeline.png"))  # type: ignore[attr-defined]
        driver.find_element(By.LINK_TEXT, "SECURITY ALERT").click()  # type: ignore[attr-defined]
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "article.entry")) == 1, what="the filter")  # type: ignore[attr-defined]
        assert driver.find_element(By.CSS_SELECTOR, "article.entry .stream").text == "SECURITY ALERT"  # type: ignore[attr-defined]
        driver.find_element(By.LINK_TEXT, "all").click()  # type: ignore[attr-defined]
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "article.entry")) == 43, what="all streams again")  # type: ignore[attr-defined]
        logger.delay("WARN", USER, "<i>live</i> entry")
        wait_for(lambda: "<i>live</i> entry" in driver.find_element(By.CSS_SELECTOR, "article.entry pre").text,  # type: ignore[attr-defined]
                 timeout=15, what="the live tail")
        assert not driver.find_elements(By.CSS_SELECTOR, "article.entry pre i")  # type: ignore[attr-defined]
        assert "pwned" not in driver.title  # type: ignore[attr-defined]
        driver.delete_all_cookies()  # type: ignore[attr-defined]
        driver.get(f"{base}/")  # type: ignore[attr-defined]
        assert "401" in driver.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    finally:
        server.terminate()
        server.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _within(seconds: float, call: object) -> object:
    """`call()`'s answer, failing (rather than hanging the suite) when it takes longer than `seconds`."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=seconds)  # type: ignore[arg-type]
    finally:
        pool.shutdown(wait=False)


def test_damaged_files_planted_links_and_fifos_never_hang_or_leak(tree: Path, tmp_path: Path) -> None:
    """Found by an attack: a file not starting with an entry (or a cursor inside its first one) looped for ever,
    a FIFO planted as an archive blocked the server, and a linked archive folder served a file outside the tree."""
    import base64

    logs = tree / "logs"
    junk = logs / "users" / "junk"
    junk.mkdir()
    (junk / "INFO.log").write_text("junk line\nINFO:  hello \u00a7 [2026-11-29 02:00:00]\n")
    os.mkfifo(logs / "archive" / "users" / USER / "WARN.20260101T000000Z.log.gz")
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "INFO.20250101T000000Z.log").write_text("INFO:  TOPSECRET outside the tree\n")
    (logs / "archive" / "users" / "junk").symlink_to(secret)
    web = client()
    junk_page = _within(10, lambda: web.get("/api/entries?user=junk"))
    assert [e["text"] for e in junk_page.json()["entries"]] == [  # type: ignore[attr-defined]
        "INFO:  hello \u00a7 [2026-11-29 02:00:00]\n", "junk line\n"]
    cursor = base64.urlsafe_b64encode(json.dumps({"INFO": [f"users/{USER}/INFO.log", 3]}).encode()).decode()
    assert _within(10, lambda: web.get(f"/api/entries?user={quote(USER, safe='')}&before={cursor}")).status_code == 200  # type: ignore[attr-defined]
    assert _within(10, lambda: web.get("/")).status_code == 200  # type: ignore[attr-defined]
    assert _within(10, lambda: web.get(f"/u/{quote(USER, safe='')}")).status_code == 200  # type: ignore[attr-defined]
    everything = web.get("/api/entries?user=junk&limit=1000").text + web.get("/api/search?q=topsecret").text
    assert "TOPSECRET" not in everything


def test_crafted_requests_get_clear_answers_never_a_bare_500(tree: Path) -> None:
    import base64

    web = client()
    user = quote(USER, safe="")
    assert web.get(f"/api/entries?user={user}&since=99999999999d").status_code == 400
    assert web.get(f"/api/tail?user={user}&after=a:%C2%B2").status_code == 200
    assert web.get(f"/api/tail?user={user}&after=a:{'9' * 5000}").status_code == 200
    deep = base64.urlsafe_b64encode(b"[" * 3000).decode()
    assert web.get(f"/api/entries?user={user}&before={deep}").status_code == 200
    redirect = client(authorized=False).get(f"//evil.example/x?token={TOKEN}")
    assert redirect.status_code == 303 and redirect.headers["location"].startswith("/") \
        and not redirect.headers["location"].startswith("//")


def test_a_forged_stamp_in_a_heading_neither_breaks_nor_feeds_the_chart(tree: Path) -> None:
    logger.delay("INFO", "forge@x.com", "x", heading="hi \u00a7 [9999-99-99 99:00:00]")
    logger.delay("INFO", "forge@x.com", "y", heading=f"hi \u00a7 [{time.strftime('%Y-%m-%d %H', time.gmtime())}:00:00]")
    wait_written()
    web = client()
    assert web.get("/u/forge%40x.com").status_code == 200
    assert sum(web.get("/api/activity?user=forge%40x.com").json()["per_hour"]["INFO"]) == 2  # the entries' own stamps


def test_users_named_dot_and_dot_dot_are_reachable(tree: Path) -> None:
    for name in (".", ".."):
        logger.delay("INFO", name, f"I am {name!r}")
    wait_written()
    web = client()
    users = web.get("/").text
    assert 'href="/user?name=.."' in users and 'href="/user?name=."' in users
    assert "I am &#39;..&#39;" in web.get("/user?name=..").text
