"""Screenshot a study's record in the MLflow UI with a real headless Chromium.

Developer tool: it shows what a researcher sees when they open a study in the MLflow UI, so that the record
can be made readable. It

1. starts ``mlflow server`` (the ``mlflow`` next to this Python) on a free loopback port in its own process
   group and stops that group at the end, or uses ``--ui-url`` when a UI is already running;
2. finds the newest study parent run (nslab's own lookup, orchestrator.record.tracking.find_study, or
   ``--run-id``) and its child runs, by the tag names nslab writes (orchestrator/record/tags.py);
3. drives Debian's ``/usr/bin/chromium`` through Playwright (no browser download) and saves
   ``01_runs.png`` (experiment runs table, study expanded), ``02_compare.png`` (compare view of the search
   and baseline trials), ``03_parent.png`` (parent run overview), ``04_confirmation.png`` (parent artifacts,
   ``study/confirmation.png`` selected; ``04b_*`` for the report and the verdict, each selected by a click on
   its node in the artifact tree), ``05_trial.png`` (one search trial), each first screen plus a
   ``*_full.png`` of the whole scrolled page;
4. prints one line per file (bytes, what it shows) and the visible text of the compare view's first screen.

    .venv/bin/python tools/mlflow_screenshots.py --tracking-uri sqlite:////abs/mlflow.db \
        --experiment nslab-quick --out shots/

Every failure the user can fix is one line on stderr and exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.record import tags

if TYPE_CHECKING:  # imported lazily at run time, so that --help and the error messages work without it
    from mlflow.entities import Run
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = "/usr/bin/chromium"
APT_COMMAND = "apt-get install -y chromium chromium-driver"
PIP_COMMAND = "pip install playwright==1.65.2"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COMPARE_ROLES = ("search", "baseline")
EXTRA_PARENT_ARTIFACTS = ("study/report.md", "study/verdict.txt")
# MLflow 3.17's artifact view: each tree node carries its file name; the pane beside the tree shows the selected
# file's full path. Going to another artifact's URL changes no selection in the page already open, so a file
# is selected by a click on its node, and the shot waits until the pane names it.
TREE_NODE = '[data-testid="artifact-tree-node"][artifact-name={name}]'
SELECTED_PATH = ".mlflow-artifact-info-path .mlflow-artifact-info-text"
MAX_FULL_HEIGHT = 16000

# Browser-side preferences of the MLflow 3.x UI (localStorage, JSON values): the "Model training" workflow
# instead of "GenAI", and the MLflow Assistant side panel closed (it opens itself on a first visit and takes
# a third of the width). Not set with --as-first-visit.
UI_PREFERENCES = {
    "mlflow.workflowType_v1": '"machine_learning"',
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
BUSY = (
    '[role="progressbar"], [aria-busy="true"], .du-bois-light-spin-spinning, .du-bois-light-skeleton, '
    '[data-testid="loading-spinner"]'
)

# Text nodes of the main panel (not the side bar) inside the viewport, in reading order: lines top to bottom
# (within 4 px), each left to right.
VISIBLE_TEXT_JS = """
() => {
  const W = window.innerWidth, H = window.innerHeight, items = [];
  const root = document.querySelector('main') || document.body;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const text = n.textContent.replace(/\\s+/g, ' ').trim();
    const el = n.parentElement;
    if (!text || !el || el.closest('script, style, noscript, title')) continue;
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || style.display === 'none' || Number(style.opacity) === 0) continue;
    const range = document.createRange();
    range.selectNodeContents(n);
    const r = range.getBoundingClientRect();
    if (r.width < 1 || r.height < 1 || r.bottom <= 0 || r.top >= H || r.right <= 0 || r.left >= W) continue;
    items.push({text, x: Math.round(r.left), y: Math.round(r.top + r.height / 2)});
  }
  items.sort((a, b) => a.y - b.y || a.x - b.x);
  const lines = [];
  for (const it of items) {
    const last = lines[lines.length - 1];
    if (last && Math.abs(last.y - it.y) <= 4) last.parts.push(it); else lines.push({y: it.y, parts: [it]});
  }
  return lines.map(l => l.parts.sort((a, b) => a.x - b.x).map(p => p.text).join('  |  '));
}
"""

# The compare page's sections (Run details, Parameters, Metrics, Artifacts, Tags): each one's row names in the
# order shown and how many of them fit in its scroll box without scrolling (Parameters is an HTML table and
# Metrics a virtualized grid, both in boxes of a fixed height), and the parallel-coordinates plot's axis titles
# left to right.
COMPARE_STRUCTURE_JS = """
() => {
  const clean = s => (s || '').replace(/\\s+/g, ' ').trim();
  // the band of the page a section's box shows: its clipping ancestors below page size, intersected
  const band = el => {
    let top = -Infinity, bottom = Infinity;
    for (let e = el.parentElement; e && e.tagName !== 'MAIN' && e !== document.body; e = e.parentElement) {
      if (getComputedStyle(e).overflowY === 'visible') continue;
      const r = e.getBoundingClientRect();
      top = Math.max(top, r.top);
      bottom = Math.min(bottom, r.bottom);
    }
    return {top, bottom};
  };
  const out = {axes: [], sections: []};
  const titles = [...document.querySelectorAll('.js-plotly-plot .parcoords .axis-title')];
  out.axes = titles.map(t => ({text: clean(t.textContent), x: t.getBoundingClientRect().left}))
    .sort((a, b) => a.x - b.x).map(a => a.text);
  const root = document.querySelector('main') || document.body;
  for (const item of root.querySelectorAll('.du-bois-light-collapse-item')) {
    const name = clean((item.querySelector('.du-bois-light-collapse-header') || {}).textContent);
    const box = item.querySelector('.du-bois-light-collapse-content-box');
    if (!name || !box || name === 'Visualizations') continue;
    let cells = [];
    const table = box.querySelector('table');
    const grid = box.querySelector('.ReactVirtualized__Grid__innerScrollContainer');
    if (table) {
      cells = [...table.querySelectorAll('tr')].map(tr => tr.querySelector('th, td')).filter(Boolean);
    } else if (grid) {
      cells = [...grid.children].sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top));
    }
    const switchEl = box.querySelector('button[role="switch"]');
    const diffOnly = switchEl ? switchEl.getAttribute('aria-checked') === 'true' : null;
    if (!cells.length) {
      out.sections.push({name, rows: [], visible: 0, diffOnly, text: clean(box.textContent).slice(0, 300)});
      continue;
    }
    const b = band(cells[0]);
    let visible = 0;
    for (const c of cells) {
      const r = c.getBoundingClientRect();
      if (r.top >= b.top - 1 && r.bottom <= b.bottom + 1) visible++;
    }
    out.sections.push({name, rows: cells.map(c => clean(c.textContent)), visible, diffOnly});
  }
  return out;
}
"""

# How much taller the viewport must be to show the whole page. MLflow scrolls its <main> panel, so a plain
# full-page screenshot equals the viewport; what counts is <main>, its ancestors and the panels in it of
# about its height, not the tables that scroll inside a smaller box (those stay as a user sees them).
EXTRA_HEIGHT_JS = """
() => {
  let extra = Math.max(0, document.documentElement.scrollHeight - window.innerHeight);
  const main = document.querySelector('main');
  for (const el of document.querySelectorAll('*')) {
    const pageSized = main
      ? el.contains(main) || (main.contains(el) && el.clientHeight >= main.clientHeight * 0.6)
      : el.clientHeight >= window.innerHeight * 0.6;
    if (!pageSized || !/(auto|scroll)/.test(getComputedStyle(el).overflowY)) continue;
    extra = Math.max(extra, el.scrollHeight - el.clientHeight);
  }
  return extra;
}
"""


class ToolError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


@dataclass
class Study:
    experiment_id: str
    experiment_name: str
    parent: Run
    children: list[Run]

    def by_role(self, *roles: str) -> list[Run]:
        return [r for r in self.children if r.data.tags.get(tags.ROLE) in roles]


@dataclass
class Shot:
    path: Path
    what: str


@dataclass
class Report:
    shots: list[Shot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compare_text: list[str] = field(default_factory=list)
    compare_structure: dict[str, Any] = field(default_factory=dict)
    compare_diff_structure: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- the study


def find_study(tracking_uri: str, experiment: str, run_id: str | None) -> Study:
    """The study parent run (the newest study, or run_id) and its children, oldest first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from orchestrator.record.tracking import find_study as newest_study

    if tracking_uri.startswith("sqlite:///"):
        db = Path(urllib.parse.urlparse(tracking_uri).path)
        if not db.is_file():  # MLflow would create an empty store there
            raise ToolError(
                f"no MLflow store at {db} (from --tracking-uri {tracking_uri}; an absolute path is "
                "sqlite:////abs/path/mlflow.db, four slashes)"
            )
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if run_id:
            parent = client.get_run(run_id)
        else:
            try:
                parent = newest_study(tracking_uri, experiment)
            except LookupError as err:
                raise ToolError(f"{err}; run `python -m pipelines.study` first or pass --run-id") from None
        exp = client.get_experiment(parent.info.experiment_id)
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{tags.PARENT}` = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ToolError(f"cannot read the MLflow store {tracking_uri}: {first[:300]}") from err
    return Study(exp.experiment_id, exp.name, parent, list(children))


def artifact_paths(tracking_uri: str, run_id: str, folder: str) -> set[str]:
    from mlflow import MlflowClient

    try:
        return {a.path for a in MlflowClient(tracking_uri=tracking_uri).list_artifacts(run_id, folder)}
    except Exception:  # an unreachable artifact store only costs the artifact screenshots
        return set()


# ------------------------------------------------------------------------------------------- the UI server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_executable() -> str:
    here = Path(sys.executable).parent / "mlflow"
    if here.exists():
        return str(here)
    found = shutil.which("mlflow")
    if not found:
        raise ToolError(
            "no `mlflow` executable next to this Python or on PATH: run this tool with the project's .venv/bin/python"
        )
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 (loopback only)
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _supports_workers(mlflow: str) -> bool:
    try:
        out = subprocess.run([mlflow, "server", "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the server's process group (the server and its uvicorn/gunicorn workers), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, timeout: float, log: Callable[[str], None]) -> Iterator[str]:
    """Run `mlflow server` for tracking_uri on a free loopback port; yield its URL; always stop it."""
    mlflow = _mlflow_executable()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [mlflow, "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port)]
    if _supports_workers(mlflow):
        cmd += ["--workers", "1"]
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-srv-") as cwd:
        logfile = Path(cwd) / "server.log"
        with open(logfile, "wb") as out:
            # its own session = its own process group, so that stopping it reaches the workers it forks;
            # a scratch cwd, so that a default ./mlartifacts or ./mlruns lands nowhere that matters
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        log(f"started mlflow server (pid {proc.pid}) at {url}")
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if proc.poll() is not None:
                    raise ToolError(
                        f"the MLflow UI did not come up (mlflow server exited with {proc.returncode}): "
                        f"{_last_line(logfile)}"
                    )
                if time.monotonic() > deadline:
                    raise ToolError(
                        f"the MLflow UI did not come up within {timeout:.0f} s at {url}/health "
                        f"(raise --timeout?): {_last_line(logfile)}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)
            log(f"stopped mlflow server (pid {proc.pid})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no server log"
    return lines[-1].strip()[:300] if lines else "the server printed nothing"


# ------------------------------------------------------------------------------------------------ the URLs


def runs_url(ui: str, exp_id: str) -> str:
    return f"{ui}/#/experiments/{exp_id}/runs"


def compare_url(ui: str, exp_id: str, run_ids: Sequence[str]) -> str:
    runs = urllib.parse.quote(json.dumps(list(run_ids)))
    exps = urllib.parse.quote(json.dumps([exp_id]))
    return f"{ui}/#/compare-runs?runs={runs}&experiments={exps}"


def run_url(ui: str, exp_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{exp_id}/runs/{run_id}"


def artifact_url(ui: str, exp_id: str, run_id: str, path: str) -> str:
    return f"{ui}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{urllib.parse.quote(path)}"


# --------------------------------------------------------------------------------------------- the browser


def check_browser(chromium: str) -> None:
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        raise ToolError(f"no Chromium at {chromium}: install it with `{APT_COMMAND}` (or pass --chromium PATH)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        raise ToolError(
            f"the playwright package is missing: `.venv/bin/{PIP_COMMAND}` "
            "(never `playwright install`: this tool uses the system Chromium)"
        ) from err


class Shooter:
    def __init__(
        self,
        ctx: BrowserContext,
        out: Path,
        timeout_ms: int,
        width: int,
        height: int,
        first_visit: bool,
        full: bool,
        log: Callable[[str], None],
    ) -> None:
        self.ctx, self.out, self.timeout_ms = ctx, out, timeout_ms
        self.width, self.height, self.first_visit, self.full, self.log = width, height, first_visit, full, log
        self.page: Page = ctx.pages[0] if ctx.pages else ctx.new_page()
        self.page.set_default_timeout(timeout_ms)

    def open(self, url: str, ready: str, what: str) -> bool:
        """Go to url and wait until `ready` (a selector) shows and nothing spins; False (with a note) if not."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        page = self.page
        page.goto(url, wait_until="load")
        # The UI polls (auto-refresh), so network idle may never come: wait for it only briefly.
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_load_state("networkidle", timeout=min(self.timeout_ms, 4000))
        try:
            page.wait_for_selector(ready, state="visible", timeout=self.timeout_ms)
        except PlaywrightTimeout:
            self.log(
                f"warning: {what}: {ready!r} did not show within {self.timeout_ms / 1000:.0f} s; "
                "taking the screenshot anyway"
            )
            return False
        if not self.first_visit:
            with contextlib.suppress(PlaywrightError):
                close = page.locator(ASSISTANT_CLOSE)
                if close.count() and close.first.is_visible():
                    close.first.click(timeout=2000)
        self.settle()
        return True

    def settle(self) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        with contextlib.suppress(PlaywrightTimeout):
            self.page.wait_for_function(
                f"() => ![...document.querySelectorAll({json.dumps(BUSY)})].some(e => e.offsetParent !== null)",
                timeout=self.timeout_ms,
            )
        self.page.wait_for_timeout(800)  # plots and tables animate in

    def shoot(self, name: str, what: str, report: Report, first_screen: bool = True) -> None:
        """Save <name>.png (the first screen, unless not first_screen) and <name>_full.png (the whole page)."""
        if first_screen:
            path = self.out / f"{name}.png"
            self.page.screenshot(path=str(path))
            report.shots.append(Shot(path, what))
        if not self.full:
            return
        tall, cut = self.height, ""
        try:
            for _ in range(4):  # a taller window can lay out taller (plots, lazy sections): grow until it fits
                extra = int(self.page.evaluate(EXTRA_HEIGHT_JS))
                if extra <= 8:
                    break
                if tall >= MAX_FULL_HEIGHT:
                    cut = f" (cut at {MAX_FULL_HEIGHT} px)"
                    break
                tall = min(tall + extra, MAX_FULL_HEIGHT)
                self.page.set_viewport_size({"width": self.width, "height": tall})
                self.page.wait_for_timeout(1000)  # re-layout, plots resize
            if tall == self.height and first_screen:
                return  # it all fits: the first screen is the whole page
            full = self.out / f"{name}_full.png"
            self.page.screenshot(path=str(full))
        finally:
            if tall != self.height:
                self.page.set_viewport_size({"width": self.width, "height": self.height})
                self.page.wait_for_timeout(500)
        report.shots.append(Shot(full, f"{what}; whole page, {tall} px tall{cut}"))


def take_screenshots(
    study: Study, ui: str, tracking_uri: str, out: Path, args: argparse.Namespace, log: Callable[[str], None]
) -> Report:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    report = Report()
    exp, parent = study.experiment_id, study.parent
    pid, pname = parent.info.run_id, parent.info.run_name or parent.info.run_id
    width, height = args.viewport
    set_pref = "if (localStorage.getItem({k}) === null) localStorage.setItem({k}, {v});"
    prefs = "".join(set_pref.format(k=json.dumps(k), v=json.dumps(v)) for k, v in UI_PREFERENCES.items())
    if args.as_first_visit:
        prefs = ""
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-chromium-") as profile, sync_playwright() as pw:
        try:
            ctx = pw.chromium.launch_persistent_context(
                profile,
                executable_path=args.chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height},
                device_scale_factor=1,
                locale="en-US",
                timezone_id="UTC",
                color_scheme="light",
            )
        except PlaywrightError as err:
            raise ToolError(f"Chromium at {args.chromium} did not start: {str(err).strip().splitlines()[0]}") from err
        try:
            if prefs:
                ctx.add_init_script(f"try {{ {prefs} }} catch (e) {{}}")
            shooter = Shooter(
                ctx, out, int(args.timeout * 1000), width, height, args.as_first_visit, not args.no_full, log
            )
            _shoot_runs(shooter, study, ui, report)
            _shoot_compare(shooter, study, ui, report)
            shooter.open(run_url(ui, exp, pid), "text=Parameters", "parent run page")
            shooter.shoot(
                "03_parent", f"parent run {pname!r} ({pid}): overview (description, params, metrics, tags)", report
            )
            _shoot_artifacts(shooter, study, ui, tracking_uri, report)
            _shoot_trial(shooter, study, ui, report)
        finally:
            ctx.close()
    return report


def _shoot_runs(shooter: Shooter, study: Study, ui: str, report: Report) -> None:
    from playwright.sync_api import Error as PlaywrightError

    pid = study.parent.info.run_id
    page = shooter.page
    shooter.open(runs_url(ui, study.experiment_id), f'a[href$="/runs/{pid}"]', "runs table")
    row = page.locator(".ag-row", has=page.locator(f'a[href$="/runs/{pid}"]')).first
    expander = row.locator('button[data-component-id*="runnamecellrenderer"]').first
    expanded = False
    try:
        child = study.children[-1].info.run_id if study.children else None
        if expander.count() and child and not page.locator(f'a[href$="/runs/{child}"]').count():
            expander.dispatch_event("click")  # a click event without moving the focus (no focus frame)
            page.wait_for_selector(f'a[href$="/runs/{child}"]', timeout=shooter.timeout_ms)
            expanded = True
            shooter.settle()
    except PlaywrightError as err:
        report.notes.append(f"runs table: could not expand the study's row: {str(err).splitlines()[0]}")
    shooter.shoot(
        "01_runs",
        f"experiment {study.experiment_name!r} runs table"
        + (
            f", study {study.parent.info.run_name!r} expanded to its {len(study.children)} child runs"
            if expanded
            else ""
        ),
        report,
    )


def _shoot_compare(shooter: Shooter, study: Study, ui: str, report: Report) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    runs = study.by_role("baseline") + study.by_role("search")  # as nslab's trial table: the baseline first
    if len(runs) < 2:
        report.notes.append(f"compare view: skipped, {len(runs)} child run(s) with {tags.ROLE} in {COMPARE_ROLES}")
        return
    url = compare_url(ui, study.experiment_id, [r.info.run_id for r in runs])
    page = shooter.page
    shooter.open(url, ".js-plotly-plot", "compare view")
    for what, ready in (
        ("the parallel-coordinates plot", ".js-plotly-plot .parcoords"),
        ("the Parameters table", "main table.mlflow-compare-table"),
        ("the Metrics grid", "main .ReactVirtualized__Grid"),
    ):
        try:
            page.wait_for_selector(ready, timeout=shooter.timeout_ms)
        except PlaywrightTimeout:
            report.notes.append(
                f"compare view: {what} ({ready}) did not render within {shooter.timeout_ms / 1000:.0f} s"
            )
    shooter.settle()
    names = ", ".join(f"{r.info.run_name} ({r.data.tags.get(tags.ROLE)})" for r in runs)
    report.compare_text = list(page.evaluate(VISIBLE_TEXT_JS))
    report.compare_structure = dict(page.evaluate(COMPARE_STRUCTURE_JS))
    shooter.shoot("02_compare", f"compare view of {len(runs)} trials: {names}", report)

    # The same page with every "Show diff only" switch on: what differs between the trials.
    switches = page.locator('main button[role="switch"][aria-checked="false"]')
    try:
        for _ in range(switches.count()):
            switches.first.dispatch_event("click")
            page.wait_for_timeout(300)
    except PlaywrightError as err:
        report.notes.append(f"compare view: could not switch on 'Show diff only': {str(err).splitlines()[0]}")
        return
    shooter.settle()
    report.compare_diff_structure = dict(page.evaluate(COMPARE_STRUCTURE_JS))
    # its first screen is 02_compare's (the sections start below it): the whole page only
    shooter.shoot(
        "02b_compare_diff_only",
        f"the compare view with 'Show diff only' on in every section: {names}",
        report,
        first_screen=False,
    )


def _shoot_artifacts(shooter: Shooter, study: Study, ui: str, tracking_uri: str, report: Report) -> None:
    pid = study.parent.info.run_id
    present = artifact_paths(tracking_uri, pid, "study") | artifact_paths(tracking_uri, pid, "")
    wanted = "study/confirmation.png"
    if wanted not in present:
        report.notes.append(f"parent artifacts: no {wanted} (artifacts: {', '.join(sorted(present)) or 'none'})")
    shooter.open(artifact_url(ui, study.experiment_id, pid, wanted), "text=Artifacts", "artifact view")
    with contextlib.suppress(Exception):
        shooter.page.wait_for_selector(
            "img[src*='confirmation.png'], img[src^='blob:'], img[src^='data:']", timeout=min(shooter.timeout_ms, 15000)
        )
        shooter.settle()
    shooter.shoot("04_confirmation", f"parent run artifacts, {wanted} selected", report)
    for i, extra in enumerate(p for p in EXTRA_PARENT_ARTIFACTS if p in present):
        problem = select_artifact(shooter, extra)
        name = f"04{'bcdefg'[i]}_{Path(extra).stem}"
        shooter.shoot(name, f"parent run artifacts, {extra} selected", report)
        first = report.shots[-1].path
        if problem is None and same_bytes(first, shooter.out / "04_confirmation.png"):
            problem = "the page did not change after the click"
        if problem is not None:
            report.notes.append(f"parent artifacts: {name}.png may not show {extra}: {problem}")


def select_artifact(shooter: Shooter, path: str) -> str | None:
    """Select `path` in the open artifact view by clicking its tree node (opening its folders on the way) and
    wait until the pane beside the tree names it; None when it does, else what went wrong."""
    from playwright.sync_api import Error as PlaywrightError

    page = shooter.page
    *folders, leaf = path.split("/")
    try:
        for folder in folders:
            child = page.locator(TREE_NODE.format(name=json.dumps(leaf)))
            if not (child.count() and child.first.is_visible()):
                page.locator(TREE_NODE.format(name=json.dumps(folder))).first.click()
        page.locator(TREE_NODE.format(name=json.dumps(leaf))).first.click()
        page.wait_for_function(
            f"() => (document.querySelector({json.dumps(SELECTED_PATH)}) || {{}}).textContent?.includes("
            f"{json.dumps(path)})",
            timeout=shooter.timeout_ms,
        )
    except PlaywrightError as err:
        return f"selecting it in the artifact tree failed: {str(err).splitlines()[0]}"
    shooter.settle()
    return None


def same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _shoot_trial(shooter: Shooter, study: Study, ui: str, report: Report) -> None:
    trials = study.by_role("search") or study.by_role(*COMPARE_ROLES) or study.children
    if not trials:
        report.notes.append("trial page: skipped, the study has no child runs")
        return
    run = trials[0]
    shooter.open(run_url(ui, study.experiment_id, run.info.run_id), "text=Parameters", "trial run page")
    shooter.shoot(
        "05_trial",
        f"trial run {run.info.run_name!r} ({run.data.tags.get(tags.ROLE, '?')}, {run.info.run_id}): overview",
        report,
    )


# --------------------------------------------------------------------------------------------------- main


def _viewport(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1600x1000 (got {text!r})") from err
    if not (320 <= w <= 4000 and 320 <= h <= 4000):
        raise argparse.ArgumentTypeError(f"width and height must be 320-4000 (got {text!r})")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlflow_screenshots",
        description="Screenshot a study's runs, compare view, parent run, confirmation plot and one trial in the "
        "MLflow UI, with Debian's headless Chromium driven by Playwright.",
    )
    p.add_argument("--tracking-uri", help="MLflow store, e.g. sqlite:////abs/mlflow.db (default: --ui-url)")
    p.add_argument("--experiment", default="nslab-quick", help="MLflow experiment name (default: %(default)s)")
    p.add_argument("--run-id", help="the study's parent run (default: the newest run tagged nslab.kind=study)")
    p.add_argument("--out", type=Path, default=Path("shots"), help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--ui-url", help="use this running MLflow UI (http://host:port) instead of starting one")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the UI to come up and for each page to render (default: %(default)s)",
    )
    p.add_argument("--chromium", default=CHROMIUM, help="Chromium executable (default: %(default)s)")
    p.add_argument("--viewport", type=_viewport, default=(1600, 1000), help="WIDTHxHEIGHT (default: 1600x1000)")
    p.add_argument("--no-full", action="store_true", help="first screens only, no *_full.png")
    p.add_argument(
        "--as-first-visit",
        action="store_true",
        help="leave the UI as a first visit shows it (GenAI workflow, MLflow Assistant panel open) "
        "instead of the Model training workflow with the assistant closed",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return 2
    if args.ui_url and not args.ui_url.startswith(("http://", "https://")):
        print(f"error: --ui-url must be an http(s):// URL (got {args.ui_url!r})", file=sys.stderr)
        return 2
    tracking_uri = args.tracking_uri or args.ui_url
    if not tracking_uri:
        print("error: give --tracking-uri (the store) or --ui-url (a running MLflow UI)", file=sys.stderr)
        return 2
    try:
        check_browser(args.chromium)
        for url in {args.ui_url, tracking_uri} - {None}:  # MLflow's HTTP client would retry for minutes
            if url.startswith(("http://", "https://")) and not _healthy(url.rstrip("/")):
                raise ToolError(f"the MLflow server at {url} does not answer {url.rstrip('/')}/health")
        study = find_study(tracking_uri, args.experiment, args.run_id)
        log(
            f"study {study.parent.info.run_name!r} ({study.parent.info.run_id}) in experiment "
            f"{study.experiment_name!r} ({study.experiment_id}): {len(study.children)} child runs"
        )
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ToolError(f"cannot create --out {args.out}: {err.strerror}") from err
        if args.ui_url:
            report = take_screenshots(study, args.ui_url.rstrip("/"), tracking_uri, args.out, args, log)
        else:
            with mlflow_ui(tracking_uri, args.timeout, log) as ui:
                report = take_screenshots(study, ui, tracking_uri, args.out, args, log)
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    _print_report(report)
    return 0


def _print_report(report: Report) -> None:
    for shot in report.shots:
        size = shot.path.stat().st_size if shot.path.exists() else 0
        print(f"{shot.path}  {size} bytes  {shot.what}")
    for note in report.notes:
        print(f"note: {note}")
    for title, structure in (
        ("compare view", report.compare_structure),
        ("compare view, 'Show diff only' on", report.compare_diff_structure),
    ):
        if not structure:
            continue
        print(f"\n{title}: parallel-coordinates axes, left to right: {', '.join(structure.get('axes', [])) or '-'}")
        for sec in structure.get("sections", []):
            rows = sec.get("rows", [])
            if rows:
                print(
                    f"{title}: {sec['name']}: {len(rows)} rows, {sec.get('visible', 0)} in view without scrolling "
                    f"its box: {', '.join(rows)}"
                )
            else:
                print(f"{title}: {sec['name']}: {sec.get('text', '') or '(empty)'}")
    if report.compare_text:
        print("\ncompare view, visible text of the first screen's main panel (top to bottom; ' | ' between cells):")
        for line in report.compare_text:
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
