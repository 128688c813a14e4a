"""The Dagster UI as a person uses it: `dagster dev` on a throwaway project, driven by headless
Chromium. The graph shows every asset group, the Materialize button of raw_pairs launches a run
that succeeds, and the asset page then renders its preview images and its passed checks.

Screenshots of each step go to $DALLE3_TEST_ARTIFACTS, else test-artifacts/ui/ (gitignored).
Needs Debian's chromium and chromium-driver (`make browser`).
"""

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO, Project
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from servers import BIN, free_port, wait_for_http

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("DALLE3_TEST_ARTIFACTS") or REPO / "test-artifacts" / "ui")
RAW_PAIRS = dg.AssetKey("raw_pairs")
# Generous: on a shared 2-core machine the code location (torch and all) takes a while to load.
SERVER_TIMEOUT = 120
UI_TIMEOUT = 180
RUN_TIMEOUT = 300

Locator = tuple[str, str]


def text_is(text: str) -> str:
    """An XPath test for an element's own text, ignoring surrounding whitespace."""
    return f"normalize-space(text())='{text}'"


def wait(driver: WebDriver, timeout: float = UI_TIMEOUT) -> WebDriverWait:
    """A wait that outlasts React re-rendering an element between finding and using it."""
    return WebDriverWait(driver, timeout, 0.5, ignored_exceptions=[StaleElementReferenceException])


def screenshot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


@contextmanager
def screenshot_on_failure(driver: WebDriver) -> Iterator[None]:
    """What the page looked like when a step failed, beside the steps' screenshots."""
    (ARTIFACTS / "failure.png").unlink(missing_ok=True)  # an earlier run's
    try:
        yield
    except BaseException:
        screenshot(driver, "failure")
        raise


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (dagster dev, its webserver, daemon, code servers and run
    workers), then SIGKILL whatever is left: a hung server, or a child that outlived it."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def dagster_dev(project: Project, log_path: Path) -> Iterator[str]:
    """`dagster dev` (webserver and daemon: the instance queues runs, so a UI launch needs the
    daemon to start them) on the project; yields the UI's URL. Prints its log on failure."""
    # The "Join the Dagster community" dialog covers every page on localhost until dismissed;
    # this is the file its Skip button writes.
    nux = project.root / ".dagster" / ".nux" / "nux.yaml"
    nux.parent.mkdir(parents=True, exist_ok=True)
    nux.write_text("seen: 1\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = project.env() | {
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        str(BIN / "dagster"), "dev", "-m", "dalle3_dag.definitions",
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    with open(log_path, "ab") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            cmd, cwd=project.root, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        # the webserver answers before the code location has loaded: the graph waits longer
        wait_for_http(f"{url}/server_info", process, SERVER_TIMEOUT, log_path)
        yield url
    except BaseException:
        print(f"--- {log_path} ---\n{log_path.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        stop(process)


def wait_for_run(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun:
    """The run once finished (queued, started by the daemon, then done)."""
    deadline, run = time.monotonic() + RUN_TIMEOUT, None
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run
        time.sleep(1)
    raise TimeoutError(f"run {run_id} not finished in {RUN_TIMEOUT} s: {run and run.status}")


def run_errors(instance: dg.DagsterInstance, run_id: str) -> str:
    """The error events of a run, with their tracebacks."""
    lines = []
    for entry in instance.all_logs(run_id):
        if entry.level < logging.ERROR:
            continue
        lines.append(entry.user_message)
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if error := getattr(data, "error", None):
            lines.append(error.to_string())
    return "\n".join(lines)


def xpath(expression: str) -> Locator:
    return (By.XPATH, expression)


def visible(driver: WebDriver, locator: Locator, timeout: float = UI_TIMEOUT) -> WebElement:
    return wait(driver, timeout).until(EC.visibility_of_element_located(locator))


def click(driver: WebDriver, locator: Locator, timeout: float = UI_TIMEOUT) -> None:
    """Click once the element is shown and enabled, again if a re-render took it away first."""

    def clicked(driver: WebDriver) -> bool:
        if element := EC.element_to_be_clickable(locator)(driver):
            element.click()
            return True
        return False

    wait(driver, timeout).until(clicked)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Debian Chromium; Selenium must not look for (or download) a driver."""
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        pytest.fail(
            f"the UI test drives {CHROMIUM} through {CHROMEDRIVER}, and one is missing: "
            "run `make browser` (installs Debian's chromium and chromium-driver)"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No background calls home: on a closed network each is a refused connection.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1600,1000", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_shows_groups_and_materializes_raw_pairs(
    project: Project, tmp_path: Path, browser: WebDriver
) -> None:
    from dalle3_dag.definitions import defs  # validates the params file: the project's

    groups = sorted({spec.group_name for spec in defs.resolve_all_asset_specs()})
    graph = defs.resolve_asset_graph()
    checks = sorted(key.name for key in graph.asset_check_keys if key.asset_key == RAW_PAIRS)
    assert groups and checks

    home = str(project.root / ".dagster")
    with (
        dagster_dev(project, tmp_path / "dagster-dev.log") as url,
        dg.DagsterInstance.from_config(home) as instance,
        screenshot_on_failure(browser),
    ):
        # The asset graph: one collapsed node per group, once the code location has loaded.
        browser.get(f"{url}/asset-groups")
        for group in groups:
            visible(browser, xpath(f"//*[local-name()='foreignObject']//*[{text_is(group)}]"))
        screenshot(browser, "1-graph")

        # raw_pairs' config is all optional, so Materialize launches at once (no launchpad);
        # the toast saying so links to the run, and goes away after a few seconds.
        browser.get(f"{url}/assets/raw_pairs")
        click(browser, xpath("//button[normalize-space()='Materialize']"))
        view = xpath("//a[contains(@href, '/runs/')][normalize-space()='View']")
        run_page = wait(browser).until(lambda d: d.find_element(*view).get_attribute("href"))
        screenshot(browser, "2-launched")
        browser.get(run_page)
        run_id = re.fullmatch(r".*/runs/([0-9a-f-]{36})", run_page).group(1)

        run = wait_for_run(instance, run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS, run_errors(instance, run_id)
        assert run.asset_selection == {RAW_PAIRS}
        visible(browser, xpath(f"//*[{text_is('Success')}]"))  # the run's status tag
        screenshot(browser, "3-run-succeeded")

        # The materialization's `examples`: a Markdown table of data-URI images, in a dialog.
        browser.get(f"{url}/assets/raw_pairs")
        examples = f"//tr[.//*[{text_is('examples')}]]//a[{text_is('[Show Markdown]')}]"
        click(browser, xpath(examples))
        images = (By.CSS_SELECTOR, "[role=dialog] img")
        wait(browser).until(EC.visibility_of_all_elements_located(images))
        decoded = "return [...arguments].every(i => i.complete && i.naturalWidth > 0)"
        wait(browser).until(lambda d: d.execute_script(decoded, *d.find_elements(*images)))
        screenshot(browser, "4-asset-preview")

        # The checks tab: every check of raw_pairs listed as succeeded, the selected one passed.
        browser.get(f"{url}/assets/raw_pairs?view=checks")
        for name in checks:
            row = f"//*[@title='{name}']/following-sibling::*[{text_is('Succeeded')}]"
            visible(browser, xpath(row))
        visible(browser, xpath(f"//*[{text_is('Passed')}]"))
        screenshot(browser, "5-checks")
