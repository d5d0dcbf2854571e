"""The dashboard driven in headless Chromium with Playwright, against a running daemon.

Run by tests/integration/test_browser.py in its own process (Playwright's sync API runs its own
event loop, which must not meet the test's Twisted reactor):

    python browser_steps.py DATA_DIR ARTIFACT_DIR

Exit 0: every step passed; 77: Chromium could not be started (the reason on stderr; the test
skips); anything else: a step failed (the reason on stderr).
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
SKIP = 77
XSS_CMD = "echo '<script>window.xss=1</script><img src=x onerror=window.xss=2>'; exit 3"


class Api:
    """The daemon's wr REST API with the bearer token, as any script would use it."""

    def __init__(self, data_dir: Path) -> None:
        self.url = (data_dir / "wmgr.url").read_text().strip()
        self.token = (data_dir / "client.token").read_text().strip()
        self.context = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))

    def call(self, method: str, path: str, body: Any = None, form: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        kind = "application/json"
        if form is not None:
            data, kind = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": kind})
        with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body.strip()[:1] in (b"[", b"{") else body  # /publish answers OK

    def job(self, key: str) -> dict[str, Any]:
        return self.call("GET", f"rest/v1/jobs/{key}")[0]

    def add(self, group: str, commands: list[str]) -> list[dict[str, Any]]:
        return self.call("POST", f"rest/v1/jobs/?rep_grp={group}", [{"cmd": c} for c in commands])


def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {result!r}")
        time.sleep(0.1)


def group_text(page: Any, group: str) -> str:
    return page.locator(f".group[data-group='{group}'] .counts").text_content() or ""


def steps(page: Any, context: Any, api: Api, artifacts: Path) -> None:
    print("open the page and log in")
    page.goto(api.url + "ui/")
    page.wait_for_selector("#login-form")
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    # (locators, not wait_for_function: that evaluates strings, which the page's CSP forbids)
    page.locator("#login-error", has_text="wrong token").wait_for()
    page.fill("#token", api.token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#main:not([hidden])")
    page.wait_for_selector("#live.on")
    [cookie] = [c for c in context.cookies() if c["name"] == "wmgr_session"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
    assert api.token not in cookie["value"] and api.token not in page.url
    page.evaluate("window.loadedOnce = 'yes'")  # gone if the page ever reloads

    print("add jobs through the API; the bars move without a reload")
    api.add("browser", ["sleep 60 # to kill", "sleep 60 # to kill later"])
    page.wait_for_selector(".group[data-group='browser']")
    wait_for(lambda: "running 2" in group_text(page, "browser"), "two running jobs in the bar")
    first_width = page.eval_on_selector(".group[data-group='browser'] .seg.running", "e => e.style.width")
    # Jobs that use some memory for a while, so that the chart has something to show.
    hungry = [f"python3 -c 'import time; b = b\"x\" * ({mb} << 20); time.sleep({secs})' # {mb} MB"
              for mb, secs in ((20, 1.2), (45, 2.0), (70, 1.6), (90, 2.6))]
    api.add("browser", [f"sleep 0.{n}; echo done {n}" for n in range(1, 7)] + hungry + [XSS_CMD])
    api.add("quick", [f"echo quick {n}" for n in range(5)] + ["exit 1"])
    wait_for(lambda: "complete 10" in group_text(page, "browser") and "buried 1" in group_text(page, "browser"),
             "ten complete and one buried job in the bar")
    wait_for(lambda: "complete 5" in group_text(page, "quick"), "the second group's bar")
    second_width = page.eval_on_selector(".group[data-group='browser'] .seg.running", "e => e.style.width")
    assert first_width == "100%" and second_width != first_width, (first_width, second_width)
    assert page.evaluate("window.loadedOnce") == "yes", "the page reloaded"

    print("kill a running job from the page")
    page.click(".group[data-group='browser']")
    page.wait_for_selector("#categories tbody tr")
    running_row = page.locator("#categories tbody tr", has=page.locator(".state.running"))
    running_row.locator("button", has_text="show jobs").click()
    page.wait_for_selector("#jobs tbody tr.job")
    target = page.locator("#jobs tbody tr.job").first
    key = target.get_attribute("data-key")
    target.locator("button", has_text="kill").click()
    wait_for(lambda: api.job(key)["State"] == "buried", "the killed job to be buried")
    assert api.job(key)["FailReason"] == "killed by user request"

    print("retry a buried job from the page")
    xss = [job for job in api.call("GET", "rest/v1/jobs/browser?state=buried") if job["Cmd"] == XSS_CMD][0]
    assert xss["Attempts"] == 1
    page.locator("#categories tbody .state.buried").nth(1).wait_for()
    page.locator("#categories tbody tr", has_text="command exited non-zero").locator(
        "button", has_text="show jobs").click()
    row = page.locator(f"#jobs tbody tr.job[data-key='{xss['Key']}']")
    row.wait_for()
    row.locator("button", has_text="retry").click()
    wait_for(lambda: api.job(xss["Key"])["Attempts"] == 2 and api.job(xss["Key"])["State"] == "buried",
             "the retried job to run again")

    print("a job's details show its fields as text, never as HTML")
    page.locator(f"#jobs tbody tr.job[data-key='{xss['Key']}'] td.cmd").click()
    page.wait_for_selector("#job-detail:not([hidden])")
    page.locator("#job-stdout", has_text="<script>").wait_for()
    shown = page.locator("#job-fields dd").first.text_content()
    assert shown == XSS_CMD, shown
    assert page.evaluate("typeof window.xss") == "undefined", "a job's command ran as script"
    assert page.locator("#job-fields script, #job-stdout img, #jobs img").count() == 0
    assert page.locator("#chart svg circle").count() >= 1, "the memory and time chart is empty"

    print("the other APIs' views: connections, services, databases")
    api.call("POST", "publish", {"partition": "ccTest", "connections": [
        {"uid": f"DRO-00{n}-tp_to_trigger", "uri": f"tcp://127.0.0.1:{1234 + n}", "data_type": "TPSet",
         "connection_type": 0} for n in range(2)]})
    page.click("#tabs .tab[data-view='connections-view']")
    page.locator("#partitions tbody tr", has_text="ccTest").filter(has_text="2").wait_for()
    assert page.locator("#jobs-view").is_hidden()

    page.click("#tabs .tab[data-view='services-view']")
    sleeper = page.locator("#services tbody tr[data-service='sleeper']")
    sleeper.locator(".service-state.active").wait_for()
    sleeper.get_by_role("button", name="stop", exact=True).click()
    page.locator("#services tbody tr[data-service='sleeper'] .service-state.stopped").wait_for()
    assert api.call("GET", "services/sleeper")["result"]["state"] == "stopped"
    page.locator("#services tbody tr[data-service='sleeper']").get_by_role("button", name="start", exact=True).click()
    page.locator("#services tbody tr[data-service='sleeper'] .service-state.active").wait_for()

    api.call("POST", "dbs", form={"db": "LSST"})
    api.call("POST", "dbs/LSST/tables", form={
        "table": "Object", "schema": "CREATE TABLE Object (objectId BIGINT NOT NULL PRIMARY KEY, ra DOUBLE)"})
    page.click("#tabs .tab[data-view='dbs-view']")
    page.locator("#dbs tbody tr[data-db='LSST']", has_text="Object").wait_for()
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "dashboard-dbs.png"))
    page.click("#tabs .tab[data-view='services-view']")
    page.locator("#services tbody tr[data-service='sleeper'] .service-state.active").wait_for()
    page.screenshot(path=str(artifacts / "dashboard-services.png"))
    page.click("#tabs .tab[data-view='jobs-view']")
    page.locator("#group-detail").wait_for()

    print("screenshot")
    page.locator("#close-job").click()  # the group's bars, categories, jobs and chart stay
    page.wait_for_timeout(300)  # let the bars' width transition end before the picture
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    print("log out")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    status = page.evaluate("fetch('/ui/counts').then(r => r.status)")
    assert status == 401, status
    assert page.evaluate("window.loadedOnce") == "yes"


def main() -> int:
    data_dir, artifacts = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        print(f"Playwright for Python is not installed: {e}", file=sys.stderr)
        return SKIP
    api = Api(data_dir)
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60000)
        except Exception as e:
            print(f"Chromium could not be started: {str(e).splitlines()[0]}", file=sys.stderr)
            return SKIP
        try:
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(30000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            steps(page, context, api, artifacts)
            assert not errors, errors
        finally:
            browser.close()
            try:
                api.call("DELETE", "rest/v1/jobs/browser?state=running")  # leave no sleep behind
            except Exception:
                pass
    print("all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
