"""JupyterLab in headless Chromium on the sandboxed kernel (slow tier).

Nothing is faked: the test starts a real JupyterLab server on 127.0.0.1 with a token
and a sandboxed kernelspec (the microVM provisioner, the default image), and drives
it with Selenium in Debian's headless ``chromium`` through Debian's ``chromedriver``.
The machine has no outside network, so Selenium Manager is never asked (the driver's
path is given) and Chromium runs with everything that phones home turned off.

A person's path is followed: the launcher's card for the sandboxed kernel, a cell that
prints the guest's kernel release (read back from the page), a screenshot kept as a
test artifact, a restart from the Kernel menu (JupyterLab's REST restart, after which
the page reconnects), a shutdown through the REST API, and a server log without a
traceback. No QEMU of the server's may outlive it. A second test restarts the kernel
through the REST API behind the page's back (expected to fail today, see its marker).

Artifacts (screenshots, the server log) go to ``$VMRUNTIME_TEST_ARTIFACTS/<test>/`` or
``build/test-artifacts/<test>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import requests
from conftest import USER_CACHE, DefaultImageSession, setup_kernel
from registry_support import free_port
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from vm_support import qemu_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KERNEL_NAME = "sandboxed-lab-test"
DISPLAY_NAME = "Python 3 (sandboxed: vmruntime/default:latest)"
# Under TCG a kernel start is a boot plus ipykernel's import in the guest (~15-30 s
# alone, more on a machine shared with other VMs); a restart starts ipykernel again.
KERNEL_TIMEOUT = 180.0
SERVER_TIMEOUT = 90.0
PAGE_TIMEOUT = 60.0
PRINT_RELEASE = 'import platform; print("guest kernel:", platform.release())'
# After a restart the kernel is a fresh process: the first cell's import is gone.
PRINT_AFTER_RESTART = 'print("after restart:", "platform" in globals())'
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root, where Chromium's own sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def sandboxed_kernelspec(**config: Any) -> dict[str, Any]:
    """The kernel.json the installer writes for the default image (1 GiB of guest RAM)."""
    return {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {
                "provisioner_name": "microvm-provisioner",
                "config": {"image": "vmruntime/default:latest", "memory": 1024, **config},
            },
        },
    }


def artifact_root() -> Path:
    """Where test artifacts go: ``$VMRUNTIME_TEST_ARTIFACTS``, or ``build/test-artifacts``
    in the checkout (``build/`` is ignored by git)."""
    configured = os.environ.get("VMRUNTIME_TEST_ARTIFACTS")
    return Path(configured) if configured else REPO / "build" / "test-artifacts"


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """This test's artifact directory, emptied first: nothing in it is from an older run."""
    path = artifact_root() / request.node.name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


# --- the JupyterLab server ------------------------------------------------------------


@dataclass
class LabServer:
    """A running JupyterLab: its URL, token, log file and the runtime dir its VMs use."""

    process: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path
    vm_runtime: Path

    def api(self, method: str, path: str, timeout: float = 30.0) -> requests.Response:
        response = requests.request(
            method,
            f"{self.url}/api/{path}",
            headers={"Authorization": f"token {self.token}"},
            timeout=timeout,
        )
        response.raise_for_status()
        return response

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def write_kernelspec(jupyter_path: Path, config: dict[str, Any]) -> None:
    spec_dir = jupyter_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(sandboxed_kernelspec(**config), indent=1))


def server_environment(root: Path, vm_runtime: Path) -> dict[str, str]:
    """Jupyter's directories under ``root``; the VMs' runtime dir ours alone, so leftover
    QEMU processes can be found by it; the images and guest kernel from the user's cache."""
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(root / "jupyter-path"),
        JUPYTER_CONFIG_DIR=str(root / "jupyter-config"),
        JUPYTER_DATA_DIR=str(root / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(root / "jupyter-runtime"),
        VMRUNTIME_CACHE=str(USER_CACHE),
        VMRUNTIME_STATE=str(root / "vmruntime-state"),
        XDG_RUNTIME_DIR=str(vm_runtime),
        # The worktree's code, not only the editable install's (the provisioner's module).
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.pop("JUPYTER_TOKEN", None)
    return env


def write_lab_config(config_dir: Path) -> None:
    """No news feed, no update check, no extension search: no outside network to ask."""
    config_dir.mkdir(parents=True)
    config = {
        "LabApp": {
            "news_url": None,  # None, not "": only None turns the feed off
            "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "extension_manager": "readonly",
        }
    }
    (config_dir / "jupyter_lab_config.json").write_text(json.dumps(config, indent=1))
    # Without an answer the page asks whether to fetch news, in a toast over the notebook.
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')


def start_lab(
    root: Path, port: int, token: str, env: dict[str, str], log_file: BinaryIO
) -> subprocess.Popen[bytes]:
    notebooks = root / "notebooks"
    notebooks.mkdir()
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # another port would be one the test does not know
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={notebooks}",
    ]  # fmt: skip
    if os.geteuid() == 0:  # the tests run as root here; the server refuses that by default
        command.append("--allow-root")
    return subprocess.Popen(
        command, cwd=notebooks, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def wait_for_status(server: LabServer) -> None:
    def answers() -> bool:
        if not server.alive():
            pytest.fail(f"JupyterLab exited early:\n{server.log()[-3000:]}")
        try:
            return server.api("GET", "status", timeout=5).ok
        except requests.RequestException:
            return False

    wait_until(answers, SERVER_TIMEOUT, "JupyterLab's /api/status")


def stop_lab(server: LabServer) -> None:
    """Ask the server to shut down (it shuts its kernels down first); signals if it won't."""
    if server.alive():
        with contextlib.suppress(requests.RequestException):
            server.api("POST", "shutdown", timeout=KERNEL_TIMEOUT)
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            server.process.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, stop_signal)
    server.process.wait(timeout=30)


def qemu_left_after(vm_runtime: Path, grace: float) -> list[int]:
    """QEMU processes of the server's still running ``grace`` seconds after it exited
    (a VM whose host side just closed may take a moment to exit)."""
    deadline = time.monotonic() + grace
    while (running := qemu_processes(str(vm_runtime))) and time.monotonic() < deadline:
        time.sleep(0.25)
    return running


@pytest.fixture
def kernel_config() -> dict[str, Any]:
    """The provisioner's settings in the kernelspec (a test parametrizes it to change them).
    Kernels start warm, resumed when asked for (``pool_size`` 0): the VMs counted here are
    then exactly the kernels' (a pool's ready members: tests/test_warm_kernels.py)."""
    return {"pool_size": 0}


@pytest.fixture
def lab_server(tmp_path: Path, artifacts: Path, kernel_config: dict[str, Any],
               default_image_session: DefaultImageSession) -> Iterator[LabServer]:  # fmt: skip
    """JupyterLab with the sandboxed kernelspec; at the end no QEMU of its may be left.
    (``default_image_session``: the default image is built if it is missing.)"""
    write_kernelspec(tmp_path / "jupyter-path", kernel_config)
    write_lab_config(tmp_path / "jupyter-config")
    # Unix socket paths under it must stay under 108 bytes: hence a short /tmp path.
    vm_runtime = Path(tempfile.mkdtemp(prefix="vmr-lab-", dir="/tmp"))
    port, token = free_port(), secrets.token_hex(16)
    log_path = tmp_path / "jupyterlab.log"
    with log_path.open("wb") as log_file:
        env = server_environment(tmp_path, vm_runtime)
        process = start_lab(tmp_path, port, token, env, log_file)
    server = LabServer(process, f"http://127.0.0.1:{port}", token, log_path, vm_runtime)
    try:
        wait_for_status(server)
        yield server
    finally:
        stop_lab(server)
        (artifacts / "jupyterlab-server.log").write_bytes(log_path.read_bytes())
        leftovers = qemu_left_after(vm_runtime, grace=10.0)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(vm_runtime, ignore_errors=True)
        assert not leftovers, f"QEMU processes outlived JupyterLab: {leftovers}"


# --- the browser ----------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, driven by Debian's chromedriver."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.exists():
            pytest.fail(f"{program} is missing: apt-get install chromium chromium-driver")
    # The driver and the browser are given, so Selenium Manager has nothing to look up;
    # offline, it could not download anything even if it tried.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def screenshot_on_failure(driver: WebDriver, path: Path) -> Iterator[None]:
    """Keep what the page showed when a step failed, next to the test's screenshot."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(path))
        raise


def css(driver: WebDriver | WebElement, selector: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def launcher_card(driver: WebDriver, display_name: str) -> WebElement | None:
    """The Notebook section's card for ``display_name`` (its title or its label)."""
    for card in css(driver, '.jp-LauncherCard[data-category="Notebook"]'):
        try:
            if display_name in (card.get_attribute("title") or "", card.text):
                return card
        except StaleElementReferenceException:  # the launcher re-rendered under us
            continue
    return None


def click_when_present(driver: WebDriver, selector: str) -> None:
    WebDriverWait(driver, PAGE_TIMEOUT).until(lambda d: css(d, selector))[0].click()


def kernel_idle(driver: WebDriver) -> bool:
    return bool(css(driver, '.jp-Notebook-ExecutionIndicator[data-status="idle"]'))


def page_connected_to_kernel(server: LabServer) -> dict[str, Any] | None:
    """Our kernel, once the page holds a websocket to it (the server counts them).

    The page's indicator says "idle" for an instant after the card's click, before the
    kernel exists: only after the server has the page connected is its "idle" the
    kernel's. A cell run before that is dropped with no output.
    """
    kernels = server.api("GET", "kernels").json()
    return next((k for k in kernels if k["name"] == KERNEL_NAME and k["connections"]), None)


def notebook_cells(driver: WebDriver) -> list[WebElement]:
    return css(driver, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")


def run_in_cell(driver: WebDriver, index: int, code: str) -> None:
    """Type ``code`` into cell ``index`` (it must exist) and run it with Shift+Enter."""

    def focused_editor(_: WebDriver) -> WebElement | None:
        cells = notebook_cells(driver)
        editors = css(cells[index], ".cm-content") if len(cells) > index else []
        if not editors:
            return None
        editors[0].click()  # may be refused while the notebook is still being laid out
        return editors[0]

    editor = WebDriverWait(
        driver,
        PAGE_TIMEOUT,
        ignored_exceptions=[
            ElementClickInterceptedException,
            ElementNotInteractableException,
            StaleElementReferenceException,
        ],
    ).until(focused_editor)
    editor.send_keys(code)
    editor.send_keys(Keys.SHIFT, Keys.ENTER)


def cell_output(driver: WebDriver, index: int, marker: str, timeout: float = KERNEL_TIMEOUT) -> str:
    """The text of cell ``index``'s output once it contains ``marker``."""

    def output() -> str | None:
        cells = notebook_cells(driver)
        if len(cells) <= index:
            return None
        try:
            texts = [out.text for out in css(cells[index], ".jp-OutputArea-output")]
        except StaleElementReferenceException:
            return None
        return next((text for text in texts if marker in text), None)

    return WebDriverWait(driver, timeout).until(lambda _: output())


def guest_kernel_release() -> str:
    """The Debian cloud kernel every sandbox boots (the one scripts/setup.sh cached)."""
    return setup_kernel().release


# --- the tests --------------------------------------------------------------------------


def open_sandboxed_notebook(browser: WebDriver, server: LabServer) -> dict[str, Any]:
    """A person's first steps: the launcher's sandboxed card, then a notebook whose kernel
    is up and connected to the page. Returns the kernel's REST model."""
    browser.get(f"{server.url}/lab?token={server.token}")
    card = WebDriverWait(browser, PAGE_TIMEOUT).until(lambda d: launcher_card(d, DISPLAY_NAME))
    card.click()
    kernel = wait_until(lambda: page_connected_to_kernel(server), KERNEL_TIMEOUT, "the kernel")
    WebDriverWait(browser, KERNEL_TIMEOUT).until(kernel_idle)
    return kernel


def restart_from_the_kernel_menu(browser: WebDriver, server: LabServer, kernel_id: str) -> None:
    """Kernel > Restart Kernel…, confirmed in the dialog, as a person does it.

    The page marks its kernel "restarting" before it asks the server, and the server logs
    the restart only once the new kernel answered: after that line, the page's next
    "idle" is the new kernel's.
    """
    restarts_before = server.log().count(f"Kernel restarted: {kernel_id}")
    menu = [item for item in css(browser, ".lm-MenuBar-item") if item.text == "Kernel"]
    assert menu, "no Kernel menu in the menu bar"
    menu[0].click()
    click_when_present(browser, '.lm-Menu-item[data-command="kernelmenu:restart"]')
    click_when_present(browser, ".jp-Dialog .jp-mod-accept")  # "Restart"
    wait_until(
        lambda: server.log().count(f"Kernel restarted: {kernel_id}") > restarts_before,
        KERNEL_TIMEOUT,
        "the server to log the kernel's restart",
    )
    WebDriverWait(browser, KERNEL_TIMEOUT).until(kernel_idle)


def assert_clean_log(server: LabServer) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert "CancelledError" not in log, log


def test_sandboxed_kernel_in_jupyterlab(
    lab_server: LabServer, browser: WebDriver, artifacts: Path
) -> None:
    """Launcher, a cell that prints the guest's kernel release, a screenshot, a restart
    from the page, a shutdown through the REST API, and a server log with no traceback."""
    started = time.monotonic()
    screenshot = artifacts / "sandboxed-kernel.png"
    with screenshot_on_failure(browser, artifacts / "failure.png"):
        kernel = open_sandboxed_notebook(browser, lab_server)
        run_in_cell(browser, 0, PRINT_RELEASE)
        printed = cell_output(browser, 0, "guest kernel:")
        assert browser.save_screenshot(str(screenshot))
    release = printed.split("guest kernel:", 1)[1].strip()
    assert release == guest_kernel_release()
    assert release != os.uname().release
    assert screenshot.stat().st_size > 0
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    vms_before_restart = qemu_processes(str(lab_server.vm_runtime))
    assert len(vms_before_restart) == 1
    with screenshot_on_failure(browser, artifacts / "failure.png"):
        restart_from_the_kernel_menu(browser, lab_server, kernel["id"])
        run_in_cell(browser, 1, PRINT_AFTER_RESTART)
        assert "after restart: False" in cell_output(browser, 1, "after restart:")
    # A restart starts a fresh kernel process in the same sandbox, not a new VM.
    assert qemu_processes(str(lab_server.vm_runtime)) == vms_before_restart

    lab_server.api("DELETE", f"kernels/{kernel['id']}", timeout=KERNEL_TIMEOUT)
    assert lab_server.api("GET", "kernels").json() == []
    wait_until(
        lambda: not qemu_processes(str(lab_server.vm_runtime)),
        60,
        "the kernel's QEMU to exit after its shutdown",
    )
    assert_clean_log(lab_server)
    print(f"JupyterLab test body: {time.monotonic() - started:.1f} s; screenshot: {screenshot}")


@pytest.mark.parametrize("kernel_config", [{"rotate_key_on_restart": False, "pool_size": 0}])
def test_a_connected_page_survives_a_rest_restart(
    lab_server: LabServer, browser: WebDriver, artifacts: Path
) -> None:
    """POST /api/kernels/ID/restart from outside the page, then a cell through the page.

    With ``rotate_key_on_restart`` off the restart keeps the key and the ports, so the
    page carries on without knowing (by default the ports change, and only a client
    that restarted the kernel itself reconnects: docs/jupyter.md, "Lifecycle")."""
    with screenshot_on_failure(browser, artifacts / "failure.png"):
        kernel = open_sandboxed_notebook(browser, lab_server)
        run_in_cell(browser, 0, PRINT_RELEASE)
        cell_output(browser, 0, "guest kernel:")
        lab_server.api("POST", f"kernels/{kernel['id']}/restart", timeout=KERNEL_TIMEOUT)
        run_in_cell(browser, 1, PRINT_AFTER_RESTART)
        # The page never saw the restart; a live kernel answers a print within seconds.
        assert "after restart: False" in cell_output(
            browser, 1, "after restart:", timeout=PAGE_TIMEOUT
        )
    lab_server.api("DELETE", f"kernels/{kernel['id']}", timeout=KERNEL_TIMEOUT)
    assert_clean_log(lab_server)
