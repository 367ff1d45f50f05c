#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven through
chromedriver by Selenium (Debian's chromium, chromium-driver and
python3-selenium). Run by tests/tests/dashboard.rs, which starts lab-server,
an agent and a terminal server for h00's console, and passes:

  WEB_URL     the dashboard's base URL
  LAB         the `lab` CLI; LAB_SERVER is set for it
  HOLDER_TOKEN, OTHER_TOKEN   a ci token (the holder) and a developer's
  OPERATOR_TOKEN              an operator's
  OUT         where screenshots go

Checks: sign-in with a token shows the hosts; a lease acquired with the CLI
appears on the open page within 2 s without a reload; the holder sees h00's
live console and a type box, and what it types reaches the console; a
non-holder sees no type box; every host shows its health, and an operator
who quarantines a host from its page (with a reason) sees it quarantined
there and on the hosts page, as `lab hosts` does; a booking made with the CLI
is listed on the queue page. Screenshots of every page are saved in OUT.
Exits non-zero with a message on the first failed check.
"""

import os
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

WEB = os.environ["WEB_URL"].rstrip("/")
OUT = os.environ["OUT"]
# Only the full dashboard check (main) needs these; host_console.py imports
# the helpers below without them.
LAB = os.environ.get("LAB", "")
HOLDER = os.environ.get("HOLDER_TOKEN", "")
OTHER = os.environ.get("OTHER_TOKEN", "")
OPERATOR = os.environ.get("OPERATOR_TOKEN", "")


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait(what, timeout, f):
    """Polls f every 50 ms until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = f()
        except Exception:  # an element not there yet, a page mid-render
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def shot(d, name):
    d.save_screenshot(os.path.join(OUT, f"{name}.png"))


def sign_in(d, token):
    d.delete_all_cookies()
    d.get(f"{WEB}/login")
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "signin").click()
    wait("the hosts table", 10, lambda: d.find_elements(By.CSS_SELECTOR, "#hosts tbody tr"))


def lab(token, *args, wait_for_exit=True):
    env = dict(os.environ, LAB_TOKEN=token)
    if not wait_for_exit:
        return subprocess.Popen([LAB, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"lab {args} failed: {r.stderr}")
    return r.stdout


def row_text(d, host):
    return d.find_element(By.CSS_SELECTOR, f'#hosts tr[data-host="{host}"]').text


def main():
    d = browser()
    waiting = None
    try:
        d.get(f"{WEB}/hosts")
        wait("the sign-in page for a visitor without a session", 5, lambda: "/login" in d.current_url)
        shot(d, "login")
        sign_in(d, HOLDER)
        hosts = [r.get_attribute("data-host") for r in d.find_elements(By.CSS_SELECTOR, "#hosts tbody tr")]
        assert hosts == ["h00", "h01", "h02"], hosts
        wait("the live feed", 5, lambda: d.find_element(By.ID, "live").get_attribute("class") == "on")
        assert "available" in row_text(d, "h00"), row_text(d, "h00")

        # A lease from the CLI shows up without a reload.
        d.execute_script("window.__no_reload = 1")
        out = lab(HOLDER, "--json", "lease", "acquire", "--host", "h00", "--no-wait", "--comment", "browser test")
        acquired = time.monotonic()
        wait("h00 leased by ci1 on the open page", 2.0,
             lambda: "ci1" in row_text(d, "h00") and "leased" in row_text(d, "h00"))
        seen = time.monotonic() - acquired
        assert d.execute_script("return window.__no_reload") == 1, "the page reloaded"
        print(f"lease shown {seen * 1000:.0f} ms after the CLI returned")
        lease_id = __import__("json").loads(out)["id"]
        shot(d, "hosts")

        # Someone waits for h00: the queue shows them with their position;
        # a booking of h02 is listed below it.
        waiting = lab(OTHER, "lease", "acquire", "--host", "h00", wait_for_exit=False)
        booked = __import__("json").loads(lab(OTHER, "--json", "booking", "create", "--host", "h02",
                                              "--start", "+2h", "--duration", "1h", "--comment", "release test"))
        d.get(f"{WEB}/queue")
        wait("a waiting request in the queue", 10, lambda: d.find_elements(By.CSS_SELECTOR, "#queue tbody tr"))
        row = d.find_element(By.CSS_SELECTOR, "#queue tbody tr").text
        assert "dev2" in row and row.startswith("1"), row
        brow = d.find_element(By.CSS_SELECTOR, f'#bookings tr[data-booking="{booked["id"]}"]').text
        assert "h02" in brow and "scheduled" in brow and "release test" in brow, brow
        shot(d, "queue")

        d.get(f"{WEB}/leases")
        wait("the active lease", 5, lambda: d.find_elements(By.CSS_SELECTOR, f'#active tr[data-lease="{lease_id}"]'))
        shot(d, "leases")

        d.get(f"{WEB}/leases/{lease_id}")
        wait("the lease page", 5, lambda: d.find_element(By.ID, "release"))
        assert d.find_element(By.ID, "renew") and d.find_element(By.ID, "log")
        wait("a provisioning record", 10, lambda: d.find_elements(By.CSS_SELECTOR, "#provisioning tbody tr"))
        shot(d, "lease")

        # The holder's host page: the live console and a type box.
        d.get(f"{WEB}/hosts/h00")
        wait("console output", 10, lambda: "dom0 login:" in d.find_element(By.ID, "console").text)
        line = wait("the type box", 5, lambda: d.find_element(By.ID, "console-line"))
        line.send_keys("uname -a")
        d.find_element(By.CSS_SELECTOR, "#console-input button").click()
        wait("the typed line echoed by the console", 5,
             lambda: "echo: uname -a" in d.find_element(By.ID, "console").text)
        shot(d, "host-holder")

        # A developer who does not hold h00: no console, no type box.
        sign_in(d, OTHER)
        d.get(f"{WEB}/hosts/h00")
        wait("the host page", 5, lambda: d.find_element(By.ID, "details"))
        wait("the console refusal", 5, lambda: d.find_element(By.ID, "console-denied"))
        assert not d.find_elements(By.ID, "console-line"), "a non-holder sees a type box"
        assert not d.find_elements(By.ID, "maintenance"), "a developer sees the maintenance button"
        shot(d, "host-nonholder")

        # Health: every host healthy; an operator quarantines h02 from its
        # page (a prompt asks why), the page and the hosts table say so
        # without a reload, and so does the CLI.
        sign_in(d, OPERATOR)
        assert all("healthy" in row_text(d, h) for h in ("h00", "h01", "h02")), \
            [row_text(d, h) for h in ("h00", "h01", "h02")]
        d.get(f"{WEB}/hosts/h02")
        wait("the quarantine button", 5, lambda: d.find_element(By.ID, "quarantine")).click()
        prompt = wait("the reason prompt", 5, lambda: d.switch_to.alert)
        prompt.send_keys("memory errors in the BMC log")
        prompt.accept()
        wait("h02 quarantined on its page", 5,
             lambda: d.find_element(By.ID, "health").text.startswith("quarantined"))
        health = d.find_element(By.ID, "health").text
        assert "memory errors in the BMC log" in health and "op3" in health, health
        shot(d, "host-quarantined")
        d.get(f"{WEB}/hosts")
        wait("h02 quarantined on the hosts page", 5, lambda: "quarantined" in row_text(d, "h02"))
        listed = __import__("json").loads(lab(OPERATOR, "--json", "hosts"))
        h02 = next(h for h in (listed if isinstance(listed, list) else listed["hosts"]) if h["name"] == "h02")
        assert h02["health"] == "quarantined", h02
        print("dashboard checks passed")
    except Exception:
        failed(d, "failure")
        raise
    finally:
        if waiting:
            waiting.kill()
        d.quit()


def failed(d, name):
    """After a failed check: a screenshot, the page's errors and the
    browser's console."""
    shot(d, name)
    for e in d.find_elements(By.CSS_SELECTOR, ".error"):
        print(f"page error: {e.text}", file=sys.stderr)
    for entry in d.get_log("browser"):
        print(f"browser: {entry['message']}", file=sys.stderr)


def run(check):
    """Runs a script's checks: a failed one exits 1 with its message."""
    try:
        check()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run(main)
