#!/usr/bin/env python3
"""A host page of the dashboard showing a real boot: headless Chromium
(Debian's chromium and chromium-driver, driven by python3-selenium) signs in
to a lab in a box and opens a leased host's page while its Xen dom0 is up.
Run by tests/tests/e2e_xen.rs once the dom0 marker is on the host's serial
console; it passes:

  WEB_URL   the dashboard (the namespace's web port forwarded to loopback)
  TOKEN     any token (the lab in a box runs the development mode)
  HOST      the leased host
  MARKER    the text the console must show (dom0's marker)
  OUT       where screenshots go

Checks: the hosts table shows the host leased, with its health; the host's
page shows the marker in its live console (what the agent captured over
Serial-over-LAN, streamed through lab-server to the browser). Exits non-zero
with a message on the first failed check; screenshots in OUT.
"""

import os
import sys

from selenium.webdriver.common.by import By

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dashboard as dash  # noqa: E402  (browser, wait, sign_in, shot, row_text, failed, run)

HOST = os.environ["HOST"]
MARKER = os.environ["MARKER"]
TOKEN = os.environ["TOKEN"]


def main():
    d = dash.browser()
    try:
        dash.sign_in(d, TOKEN)
        row = dash.wait(f"{HOST} leased on the hosts page", 10,
                        lambda: "leased" in dash.row_text(d, HOST) and dash.row_text(d, HOST))
        assert "healthy" in row, f"no health shown for {HOST}: {row}"
        dash.shot(d, "hosts-lab")
        # A live console stream can break while the host boots on a loaded
        # machine (seen once in CI: "console stream interrupted", never
        # back); a person would reload the page, whose console replays the
        # recent output. Twice at most, each reload said.
        for attempt in range(3):
            d.get(f"{dash.WEB}/hosts/{HOST}")
            try:
                text = dash.wait(f"{MARKER} in {HOST}'s live console", 20,
                                 lambda: MARKER in d.find_element(By.ID, "console").text
                                 and d.find_element(By.ID, "console").text)
                break
            except AssertionError:
                status = d.find_element(By.ID, "console-status").text
                if attempt == 2:
                    raise
                print(f"host page: no {MARKER} after 20 s (console status: {status}); reloading",
                      file=sys.stderr)
        line = next(l for l in text.splitlines() if MARKER in l)
        print(f"host page console: {line.strip()}")
        assert d.find_element(By.ID, "health").text.startswith("healthy"), d.find_element(By.ID, "health").text
        dash.shot(d, "host-dom0")
        print("host page checks passed")
    except Exception:
        dash.failed(d, "host-dom0-failure")
        raise
    finally:
        d.quit()


if __name__ == "__main__":
    dash.run(main)
