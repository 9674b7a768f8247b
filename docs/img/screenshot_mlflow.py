"""Screenshot of an MLflow UI page with headless Chromium, driven over the DevTools protocol (no extra packages).

python docs/img/screenshot_mlflow.py URL OUT.png [JS to run before the shot]

Used for docs/img/mlflow_grid.png (see docs/mlflow.md): expands the sweep's parent row and closes the assistant
panel, which a plain ``chromium --screenshot`` cannot do.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request

from websockets.sync.client import connect

PORT = 9333
EXPAND = """
(() => {
  const close = [...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Close');
  if (close) close.click();  // the assistant side panel
  const expand = [...document.querySelectorAll('button[data-component-id*=runnamecellrenderer]')];
  expand.forEach(b => b.click());  // the sweep parents' rows: show their children
  return expand.length;
})()
"""
RESIZE_HANDLE = """
(() => {
  const h = document.querySelector('.ag-header-cell[col-id^="attributes.`Run Name`"] .ag-header-cell-resize');
  if (!h) return null;
  const r = h.getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
})()
"""


def main(url: str, out: str, script: str = EXPAND, width: int = 1500, height: int = 640,
         widen: int = 260) -> None:
    proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--remote-debugging-port={PORT}", f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(180):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/json"))
                break
            except OSError:
                time.sleep(1)
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=60) as ws:
            ids = iter(range(1, 10**6))

            def cmd(method: str, **params):
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=300))
                    if msg.get("id") == i:
                        return msg.get("result", {})

            cmd("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            cmd("Page.navigate", url=url)
            time.sleep(25)  # the single-page app loads and queries the runs
            print("script:", cmd("Runtime.evaluate", expression=script, returnByValue=True))
            time.sleep(8)
            handle = cmd("Runtime.evaluate", expression=RESIZE_HANDLE, returnByValue=True)["result"].get("value")
            if handle:  # widen the run-name column so the sweep's name is readable: drag its resize handle
                x, y = handle
                cmd("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
                cmd("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
                for dx in range(20, widen + 1, 20):
                    cmd("Input.dispatchMouseEvent", type="mouseMoved", x=x + dx, y=y, button="left", buttons=1)
                cmd("Input.dispatchMouseEvent", type="mouseReleased", x=x + widen, y=y, button="left", clickCount=1)
                time.sleep(3)
            shot = cmd("Page.captureScreenshot", format="png")
            with open(out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
