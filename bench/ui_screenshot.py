"""Screenshots of the Dagster UI showing the summaries, plots and checks, in headless Chromium.

    python bench/ui_screenshot.py --out screenshots/ [--sources 6] [--keep]

Under a throw-away ASTRA_HOME (embedded PostgreSQL, Dagster on dagster-postgres as `astra init`
sets it up) it generates a small synthetic release, trains a small Cannon model, runs spectra and
thecannon over the release (with their checks) and the thecannon_summary asset, then starts
dagster-webserver on that instance and saves, with ``chromium --headless --screenshot``:

* ``thecannon.png``: the label asset's page (latest materialisation: Kiel diagram, accuracy table,
  Δ vs truth);
* ``thecannon_checks.png``: its Checks tab;
* ``thecannon_summary.png``: the summary asset's page (files, rows, sha256, plots).

Needs Debian's chromium (``apt-get install -y chromium``); CHROMIUM names another binary. Prints
one line per screenshot and, last, JSON ``{"screenshots": [...], "url": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

#: name → (page, text that shows it has loaded, metadata row whose markdown plot to open)
PAGES = {
    "thecannon_summary": ("/assets/thecannon_summary", "astraAllStarTheCannon", None),
    "thecannon_summary_kiel": ("/assets/thecannon_summary", "astraAllStarTheCannon", "kiel_diagram"),
    "thecannon_summary_delta": ("/assets/thecannon_summary", "astraAllStarTheCannon", "delta_vs_truth"),
    "thecannon": ("/assets/thecannon", "thecannon", None),
    "thecannon_events_kiel": ("/assets/thecannon?view=events", "kiel_diagram", "kiel_diagram"),
    "thecannon_checks": ("/assets/thecannon?view=checks", "finite_labels", None),
}
CANNON = {"n_train": 300, "seed": 5, "regions": "none"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium() -> str:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit("ui_screenshot: no chromium (apt-get install -y chromium, or set CHROMIUM)")
    return exe


def prepare(home: Path, n_sources: int) -> None:
    """Release, model, label run with checks, summary: all on the persistent instance."""
    import dagster as dg

    from astra_dagster.cli.main import initialise
    from astra_dagster.orchestration.build import load_definitions, materialize_assets
    from astra_dagster.orchestration.instance import get_instance
    from astra_dagster.orchestration.planned_runs import run_planned
    from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
    from astra_dagster.spectra.release import generate_release

    initialise(echo=False)
    generate_release(home / "data", "dr-ui", n_sources, seed=23, progress=False)
    instance = get_instance()
    defs = load_definitions()
    if not materialize_assets(defs, [dg.AssetKey("thecannon_model")], instance=instance, log_level="WARNING",
                              run_config={"ops": {"thecannon_model": {"config": CANNON}}}).success:
        raise SystemExit("ui_screenshot: training failed")
    plan = plan_new_releases(instance, home / "data", None, block_size=100)
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    if not all(o.success for o in run_planned(defs, plan.runs, [dg.AssetKey("spectra"), dg.AssetKey("thecannon")],
                                              instance=instance)):
        raise SystemExit("ui_screenshot: the label run failed")
    if not materialize_assets(defs, [dg.AssetKey("thecannon_summary")], instance=instance,
                              log_level="WARNING").success:
        raise SystemExit("ui_screenshot: the summary failed")
    instance.dispose()


class Browser:
    """Headless Chromium driven over the DevTools protocol (websockets, which Dagster's webserver
    already installs): open a page, wait for text, click, check an image, screenshot."""

    def __init__(self, exe: str, width: int = 1500, height: int = 2400):
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.size = (width, height)
        self._id = 0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    async def _call(self, ws: Any, method: str, **params: Any) -> dict:
        self._id += 1
        await ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(await ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def _eval(self, ws: Any, expression: str) -> Any:
        result = await self._call(ws, "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def _wait(self, ws: Any, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self._eval(ws, expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        return None

    async def visit(self, url: str, wait_text: str, path: Path, click_row: str | None = None) -> dict:
        """Open ``url``, wait until the page shows ``wait_text``; with ``click_row`` press the
        "Show Markdown" of the metadata row whose key contains it and wait for the image in the
        dialog to decode. Saves the screenshot at ``path``; returns what it saw."""
        import websockets

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    target = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise SystemExit("ui_screenshot: chromium did not start") from None
                await asyncio.sleep(0.5)
        seen: dict[str, Any] = {"url": url, "screenshot": str(path)}
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            await self._call(ws, "Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                             deviceScaleFactor=1, mobile=False)
            await self._call(ws, "Page.navigate", url=url)
            text = json.dumps(wait_text)
            seen["loaded"] = bool(await self._wait(ws, f"document.body && document.body.innerText.includes({text})"))
            if click_row:
                row = json.dumps(click_row)
                seen["clicked"] = await self._eval(ws, f"""(() => {{
                    const row = [...document.querySelectorAll('tr')].find(r => r.innerText.includes({row}));
                    if (!row) return 'no row';
                    const button = [...row.querySelectorAll('a, button')]
                        .find(e => e.innerText.includes('Show Markdown'));
                    if (!button) return 'no button';
                    button.click();
                    return 'clicked';
                }})()""")
                seen["image_width"] = await self._wait(ws, """(() => {
                    const img = document.querySelector('[role=dialog] img[src^="data:image/png"]')
                        || document.querySelector('img[src^="data:image/png"]');
                    return img && img.complete && img.naturalWidth; })()""", timeout=20)
            await asyncio.sleep(1.0)  # let the layout settle
            shot = await self._call(ws, "Page.captureScreenshot", format="png")
            path.write_bytes(base64.b64decode(shot["data"]))
        return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the throw-away ASTRA_HOME")
    args = parser.parse_args()
    exe = chromium()

    home = Path(tempfile.mkdtemp(prefix="astra-ui-"))
    env = {"ASTRA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "ASTRA_SOURCES_PER_PARTITION": "100"}
    os.environ.update(env)
    for var in ("ASTRA_DATABASE_URL", "ASTRA_DAGSTER_DATABASE_URL", "ASTRA_DATA_ROOT"):
        os.environ.pop(var, None)  # no release sensor activity while the pages load
    from astra_dagster.db.connection import close_pools
    from astra_dagster.db.embedded import stop_server

    webserver = None
    log = home / "webserver.log"
    shots = []
    try:
        t0 = time.perf_counter()
        prepare(home, args.sources)
        print(f"prepared the instance in {time.perf_counter() - t0:.0f} s", flush=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(log, "w") as handle:
            webserver = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "astra_dagster.definitions",
                 "-h", "127.0.0.1", "-p", str(port)], env=dict(os.environ), stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or webserver.poll() is not None:
                    raise SystemExit("ui_screenshot: the webserver did not start:\n"
                                     + log.read_text()[-2000:]) from None
                time.sleep(1)
        args.out.mkdir(parents=True, exist_ok=True)
        browser = Browser(exe)
        try:
            for name, (page, wait_text, row) in PAGES.items():
                seen = asyncio.run(browser.visit(base + page, wait_text, args.out / f"{name}.png", row))
                shots.append(seen)
                print(json.dumps(seen), flush=True)
        finally:
            browser.close()
    finally:
        if webserver is not None:
            webserver.terminate()
            try:
                webserver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                webserver.kill()
        close_pools()
        stop_server(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    images = [s for s in shots if "image_width" in s]
    print(json.dumps({"screenshots": shots, "url": base,
                      "markdown_images_rendered": bool(images) and all(s["image_width"] for s in images)}))


if __name__ == "__main__":
    main()
