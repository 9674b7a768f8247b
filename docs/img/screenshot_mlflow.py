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
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const close = [...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Close');
  if (close) close.click();  // the assistant side panel
  const expand = [...document.querySelectorAll('button[data-component-id*=runnamecellrenderer]')];
  expand.forEach(b => b.click());  // the sweep parents' rows: show their children
  // Show the swept param and the main metrics as columns (Columns menu).
  const menu = document.querySelector('[data-testid=column-selection-dropdown]');
  const shown = [];
  if (menu) {
    menu.click();
    await sleep(2500);
    for (const want of COLUMNS) {
      const hits = [...document.querySelectorAll('body *')].filter(
        e => e.children.length === 0 && (e.textContent || '').trim() === want);
      if (hits.length) { hits[hits.length - 1].click(); shown.push(want); await sleep(400); }
    }
    menu.click();
    await sleep(1000);
  }
  // Fit the run-name column to the sweep's name (ag-grid: double-click on the resize handle).
  const handle = document.querySelector('.ag-header-cell[col-id^="attributes.`Run Name`"] .ag-header-cell-resize');
  if (handle) handle.dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));
  await sleep(1000);
  // The chosen columns come last: scroll the unpinned part of the grid to its end (run names stay pinned left).
  for (const v of document.querySelectorAll('.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport')) {
    v.scrollLeft = v.scrollWidth;
  }
  const sidebar = [...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Toggle sidebar');
  if (sidebar) sidebar.click();
  return {expanded: expand.length, columns: shown};
})()
"""


COLUMNS = ["backbone.finetune.lora_r", "val/mmeb/overall", "val/visdoc/overall", "best/val/mmeb/overall"]


def main(url: str, out: str, script: str = EXPAND, width: int = 1600, height: int = 600) -> None:
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
            for _ in range(180):  # the single-page app loads and queries the runs (slow on a loaded machine)
                time.sleep(1)
                found = cmd("Runtime.evaluate", expression="document.querySelectorAll('.ag-row').length",
                            returnByValue=True)["result"].get("value")
                if found:
                    break
            time.sleep(5)
            script = script.replace("COLUMNS", json.dumps(COLUMNS))
            print("script:", cmd("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True))
            time.sleep(8)
            shot = cmd("Page.captureScreenshot", format="png")
            with open(out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
