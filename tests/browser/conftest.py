"""Headless Chromium (Debian's package, driven by Playwright's sync API) against the real product server.

Playwright cannot download browsers here, so the tests launch the system's ``chromium``. A missing browser
is a failure, not a skip: a green run must mean the pages were really looked at.
"""

import shutil
from pathlib import Path

import pytest
from django.conf import settings

from tests.support.live import live_product

SCREENSHOTS = Path(settings.BASE_DIR) / "test-output" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "Chromium is not installed, and the browser tests need it. Install it: apt-get install -y chromium"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A browser test without a browser FAILS (it is never skipped): a green run means the pages were seen."""
    if item.get_closest_marker("browser") and CHROMIUM is None:
        pytest.fail(MISSING, pytrace=False)


@pytest.fixture
def live(tmp_path):
    """The product server on loopback against the test database: its base URL and processes."""
    with live_product(tmp_path) as (base_url, procs):
        yield base_url, procs


@pytest.fixture
def base_url(live):
    return live[0]


@pytest.fixture
def browser(live, monkeypatch):
    """A headless Chromium, started after the server (so the server's environment stays untouched)."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        yield None  # pytest_runtest_call above fails the test before its body runs
        return
    # Playwright's sync API keeps an event loop in this thread, which makes Django refuse ORM calls made by
    # the test itself (SynchronousOnlyOperation). The ORM calls here are plain synchronous test code, so the
    # check is lifted for the test process only, and only while the browser runs.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, base_url):
    """A fresh browser context and page whose relative URLs resolve against the live server."""
    if browser is None:
        yield None
        return
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"JavaScript error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.on("response", lambda response: problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")
            if response.status >= 400 else None)
    yield page
    context.close()
    assert not problems, "The pages had errors:\n" + "\n".join(problems)


@pytest.fixture
def screenshot():
    """Save a full-page screenshot to test-output/screenshots/<name>.png and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
