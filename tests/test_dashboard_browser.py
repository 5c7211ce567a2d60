"""The dashboard in a real browser: Debian's Chromium, driven by Playwright.

The app (tests/apps/dashboard_app.py) runs on gunicorn (gthread) with a SQLite
store; the browser is Chromium at /usr/bin/chromium (``apt-get install chromium``;
Playwright never downloads one here). Every test checks, when it ends, that no
request left the page's origin and that the console showed no error (a script or
style that the strict CSP refused would show there).

``RESTFUL_ASYNC_SCREENSHOT=docs/dashboard.png`` writes the README's picture there;
without it, the picture goes to a temporary folder.
"""

from __future__ import annotations

import os
import time
import typing as t
import urllib.parse
from pathlib import Path

import pytest

from .servers import http, poll_until_done, serve
from .services import services_required

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 10_000

if t.TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route


def _require_browser() -> None:
    reason = None
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None:
        return
    if services_required():
        pytest.fail(f"{reason}, and RESTFUL_ASYNC_REQUIRE_SERVICES=1")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[str]:
    _require_browser()
    database = tmp_path_factory.mktemp("dashboard") / "tasks.db"
    with serve(
        "gunicorn-gthread",
        "tests.apps.dashboard_app:app",
        threads=16,  # each open page holds one for its event stream
        env={"DASHBOARD_DB": str(database)},
        # Event streams stay open until the server stops: no need to wait for them.
        options=("--graceful-timeout", "1"),
    ) as url:
        yield url


@pytest.fixture(scope="module")
def browser(base: str) -> t.Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()


class Watched(t.NamedTuple):
    page: Page
    foreign: list[str]
    errors: list[str]
    navigations: list[str]


@pytest.fixture
def alice(browser: Browser, base: str) -> t.Iterator[Watched]:
    """A page of user alice, watched (see :func:`watched`)."""
    yield from watched(browser, base, {"user": "alice"})


@pytest.fixture
def operator(browser: Browser, base: str) -> t.Iterator[Watched]:
    """A page of user carol, an operator, watched."""
    yield from watched(browser, base, {"user": "carol", "role": "operator"})


def watched(browser: Browser, base: str, cookies: dict[str, str]) -> t.Iterator[Watched]:
    """A page with these cookies, watched: requests to any other origin are
    recorded and refused, console errors and uncaught exceptions recorded; none
    may have happened when the test ends."""
    context = browser.new_context(viewport={"width": 1200, "height": 620})
    context.add_cookies([{"name": k, "value": v, "url": base} for k, v in cookies.items()])
    foreign: list[str] = []
    errors: list[str] = []
    navigations: list[str] = []
    origin = base + "/"

    def route(route: Route, request: Request) -> None:
        if request.url.startswith(origin):
            route.continue_()
        else:
            foreign.append(request.url)
            route.abort()

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    try:
        yield Watched(page, foreign, errors, navigations)
        assert foreign == [], "requests left the origin"
        assert errors == [], "the console showed errors"
    finally:
        context.close()


def submit(base: str, user: str, query: str, path: str = "/jobs") -> str:
    """POST <path>?<query> as ``user``; the task's status URL."""
    status, headers, body = http("POST", f"{base}{path}?{query}", headers={"X-User": user})
    assert status == 202, body
    return headers["location"]


def task_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


def wait_for_value(page: Page, selector: str, above: float) -> float:
    """The value of a progress bar once it is above ``above``."""
    value = 0.0

    def moved() -> bool:
        nonlocal value
        value = float(page.eval_on_selector(selector, "bar => bar.value"))
        return value > above

    wait_until(page, moved, f"{selector} above {above}")
    return value


def wait_until(page: Page, condition: t.Callable[[], bool], what: str) -> None:
    """Poll ``condition`` from here: the page's CSP forbids the eval that
    ``page.wait_for_function`` would use."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        page.wait_for_timeout(50)


def open_dashboard(watched: Watched, base: str) -> Page:
    page = watched.page
    page.goto(base + "/tasks/dashboard")
    page.wait_for_selector("#live.on")  # the event stream is open
    return page


def test_the_page_lists_the_callers_tasks_and_never_another_owners(
    alice: Watched, base: str
) -> None:
    mine = [submit(base, "alice", "steps=1") for _ in range(2)]
    theirs = [submit(base, "bob", "steps=1")]
    for location in mine + theirs:
        poll_until_done(base, location)
    page = open_dashboard(alice, base)
    for location in mine:
        page.wait_for_selector(f'tr[data-id="{task_id(location)}"].state-succeeded')
    # Tasks made while the page is open arrive through the event stream: bob's
    # first, then alice's; once alice's shows, bob's would have too.
    theirs.append(submit(base, "bob", "steps=1"))
    poll_until_done(base, theirs[-1])
    late = submit(base, "alice", "steps=1")
    page.wait_for_selector(f'tr[data-id="{task_id(late)}"]')
    html = page.content()
    for location in theirs:
        assert task_id(location) not in html
    assert alice.navigations == [base + "/tasks/dashboard"]  # never reloaded


def test_a_running_tasks_bar_moves_without_reload(
    alice: Watched, base: str, tmp_path: Path
) -> None:
    # A few finished tasks of each kind, for the picture.
    ended = [
        submit(base, "alice", "steps=4", "/reports"),
        submit(base, "alice", "steps=2&fail=1", "/exports/invoices.csv"),
        submit(base, "alice", "steps=3", "/exports/orders.csv"),
    ]
    stopped = submit(base, "alice", "steps=400&delay=0.05", "/reports")
    http("DELETE", base + stopped, headers={"X-User": "alice"})
    for location in [*ended, stopped]:
        poll_until_done(base, location)
    running = task_id(submit(base, "alice", "steps=40&delay=0.2"))
    page = open_dashboard(alice, base)
    bar = f'tr[data-id="{running}"] progress'
    first = wait_for_value(page, bar, above=0)
    wait_for_value(page, bar, above=first + 2)
    assert page.inner_text(f'tr[data-id="{running}"] .progress-text').endswith("of 40")
    assert alice.navigations == [base + "/tasks/dashboard"]
    # The counts follow within a few seconds (they are read at most every 2 s).
    wait_until(page, lambda: page.inner_text('[data-count="running"]') == "1", "1 running")
    picture = os.environ.get("RESTFUL_ASYNC_SCREENSHOT") or str(tmp_path / "dashboard.png")
    page.screenshot(path=picture, full_page=True)
    # Stop it: a later test's page need not see it run.
    http("DELETE", f"{base}/tasks/{running}", headers={"X-User": "alice"})


def test_cancel_and_forget(alice: Watched, base: str) -> None:
    location = submit(base, "alice", "steps=400&delay=0.05")
    row = f'tr[data-id="{task_id(location)}"]'
    page = open_dashboard(alice, base)
    page.wait_for_selector(f"{row}.state-running")
    page.click(f"{row} .cancel")
    page.wait_for_selector(f"{row}.state-cancelled")  # the handler stopped: the stream told
    assert page.is_hidden(f"{row} .cancel")
    page.click(f"{row} .forget")
    page.wait_for_selector(row, state="detached")
    status, _, _ = http("GET", base + location, headers={"X-User": "alice"})
    assert status == 404


def test_the_detail_filter_and_pages_stay_on_the_origin(alice: Watched, base: str) -> None:
    location = submit(base, "alice", "steps=2")
    poll_until_done(base, location)
    page = open_dashboard(alice, base)
    row = f'tr[data-id="{task_id(location)}"]'
    page.click(f"{row} .path")
    page.wait_for_selector("#detail[open] .headers")
    detail = page.text_content("#detail-body") or ""
    assert "Response 201" in detail
    assert '{"steps": 2}' in detail
    page.click("#detail-close")
    page.click('button[data-state="failed"]')
    page.wait_for_selector(row, state="detached")
    assert urllib.parse.urlsplit(page.url).query == "state=failed"
    page.click('button[data-state=""]')
    page.wait_for_selector(row)
    assert page.is_disabled("#newer")
    # A state the page does not know: every task, and no filter left in the URL.
    page.goto(base + "/tasks/dashboard?state=bogus&x=1")
    page.wait_for_selector("#live.on")
    page.wait_for_selector(row)
    assert urllib.parse.urlsplit(page.url).query == "x=1"
    assert page.is_hidden("#problem")


def test_an_operator_sees_and_cancels_another_owners_task(operator: Watched, base: str) -> None:
    location = submit(base, "bob", "steps=400&delay=0.05")
    row = f'tr[data-id="{task_id(location)}"]'
    page = open_dashboard(operator, base)
    page.wait_for_selector(f"{row}.state-running")
    assert page.inner_text(f"{row} .owner") == "bob"
    page.click(f"{row} .cancel")
    page.wait_for_selector(f"{row}.state-cancelled")
    status, _, _ = http("GET", base + location, headers={"X-User": "bob"})
    assert status == 409
