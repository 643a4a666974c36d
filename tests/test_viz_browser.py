"""The visualiser's page in headless Chromium: the rendered DOM, its controls, and a screenshot each.

Screenshots go to ``$RINGLEADER_ARTIFACTS/viz`` when that is set (CI keeps
them), else to pytest's temporary directory; the test prints where.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from topology.planning.planner import make_plan
from topology.network.presets import load_topology
from topology.viz.page import save

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")

CASES = [("l40s-host", 8), ("g6e-4x", 32), ("leafspine-64x-2to1", 32)]
"""The recipe's three cluster sizes: 8, 32 and 512 GPUs."""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    base = os.environ.get("RINGLEADER_ARTIFACTS")
    out = Path(base) / "viz" if base else tmp_path_factory.mktemp("viz-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.parametrize("preset, cp", CASES)
def test_rendered_page_shows_every_host_ring_and_figure(browser, shots, tmp_path, preset, cp):
    topo = load_topology(preset)
    plan = make_plan(topo, topo.num_gpus, cp)
    page_path = tmp_path / f"{preset}.html"
    save(topo, plan, page_path)
    requests: list[str] = []
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(10_000)
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())

    assert page.locator("svg#topology g.host").count() == len(topo.hosts)
    assert page.locator("svg#topology g.ring").count() == len(plan.groups.ring_groups)
    assert page.locator("svg#topology g.gpu[data-rank]").count() == plan.world_size
    assert page.locator("svg#heatmap rect.cell").count() == (len(topo.hosts) ** 2 if len(topo.hosts) > 1 else 64)

    # Hovering a GPU puts its figures in the side panel (its <title> is the browser's own tooltip).
    gpu = page.locator('svg#topology g.gpu[data-rank="3"] rect')
    gpu.hover()
    info = page.locator("#info").inner_text()
    assert "rank 3" in info and "ring" in info and "DP group" in info
    for selector in ("svg#topology g.host path.link", "svg#topology path.link.uplink"):
        if page.locator(selector).count():
            x, y = _reachable_point(page, selector)
            page.mouse.move(x, y)
            assert re.search(r" — .*: \d+\.\d GB/s, \d+\.\d µs", page.locator("#info").inner_text()), selector

    # Every ring is drawn (some path of it visible) at the level the page opens with.
    visible = page.evaluate("""() => [...document.querySelectorAll('svg#topology g.ring')].filter(g =>
        [...g.querySelectorAll('path')].some(p => getComputedStyle(p).display !== 'none')).length""")
    assert visible == len(plan.groups.ring_groups) or topo.num_gpus > 64

    # DP groups appear only when asked for.
    if plan.dp > 1:
        dp = page.locator("svg#topology g.dp").first
        assert not dp.is_visible()
        page.locator("#show-dp").check()
        assert dp.evaluate("g => getComputedStyle(g).display") != "none"
        page.locator("#show-dp").uncheck()

    if topo.num_gpus > 64:
        # Overview: host-to-host cycles; a host's GPU-level segments appear when it is clicked.
        host = plan.placements[0].host
        local = page.locator(f'svg#topology g.ring path.ring-local[data-local-host="{host}"]')
        assert local.count() >= 1 and not local.first.is_visible()
        page.locator(f'svg#topology g.host[data-host="{host}"] g.gpu').first.click()
        assert local.first.is_visible()

    shot = shots / f"viz-{preset}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    page.close()


def _reachable_point(page, selector: str) -> tuple[float, float]:
    """Screen point on some element matching ``selector`` that the pointer would really hit there."""
    point = page.evaluate("""(sel) => {
        for (const el of document.querySelectorAll(sel)) {
            const len = el.getTotalLength();
            for (const f of [0.5, 0.3, 0.7, 0.9, 0.1]) {
                const p = el.getPointAtLength(len * f).matrixTransform(el.getScreenCTM());
                if (document.elementFromPoint(p.x, p.y) === el) return [p.x, p.y];
            }
        }
        return null;
    }""", selector)
    assert point, f"no {selector} can be reached by the pointer"
    return point[0], point[1]


def test_512_gpu_page_focuses_a_ring_and_shows_oversubscription(browser, shots, tmp_path):
    """The 512-GPU page with a ring-64 plan in Ray's order (rings cross leaves on a 2:1 fabric)."""
    from topology.viz.colour_scale import LOAD
    from topology.viz.layout import layout, load_matrix

    topo = load_topology("leafspine-64x-2to1")
    plan = make_plan(topo, 512, 64, strategy="naive")
    page_path = tmp_path / "leafspine-512.html"
    save(topo, plan, page_path)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())
    page.screenshot(path=str(shots / "viz-512-overview.png"))
    # Overview: no rank number is drawn until a ring is focused (they would be unreadable at this scale).
    assert page.evaluate("() => [...document.querySelectorAll('svg#topology g.gpu text')].filter(t => t.getBBox().width && "
                         "getComputedStyle(t).display !== 'none').length") == 0

    # Focus: clicking ring 3 in the legend leaves it bright and thick, every other ring faint.
    page.locator('.ring-key[data-kind="ring"][data-index="3"]').click()
    page.mouse.move(1590, 990)  # off the legend: the click pins the focus
    style = page.evaluate("""() => [...document.querySelectorAll('svg#topology g.ring')].map(g => [g.dataset.ring,
        parseFloat(getComputedStyle(g).opacity),
        Math.max(...[...g.querySelectorAll('path')].filter(p => getComputedStyle(p).display !== 'none')
                 .map(p => parseFloat(getComputedStyle(p).strokeWidth)))])""")
    focused = [s for s in style if s[0] == "3"][0]
    others = [s for s in style if s[0] != "3"]
    assert focused[1] == 1.0 and all(o[1] <= 0.2 for o in others), style
    assert all(focused[2] > o[2] for o in others), style
    # Its 64 rank numbers, on top of everything, at least 8 px tall on a 1600 px screen.
    labels = page.evaluate("""() => [...document.querySelectorAll('#focus-labels text')].map(t =>
        [t.textContent, t.getBoundingClientRect().height])""")
    assert sorted(int(t) for t, _ in labels) == plan.groups.ring_groups[3]
    assert min(h for _, h in labels) >= 8, labels
    page.screenshot(path=str(shots / "viz-512-focus.png"))
    # Zoomed in far enough, every rank number shows; "fit" hides them again.
    shown = "() => [...document.querySelectorAll('svg#topology g.gpu text')].filter(t => getComputedStyle(t).display !== 'none').length"
    page.locator("#zoom-in").click()
    page.locator("#zoom-in").click()
    assert page.evaluate(shown) == 512
    page.locator("#zoom-fit").click()
    assert page.evaluate(shown) == 64  # the focused ring's (drawn again on top, larger)

    # Load heatmap: the cells whose ring flows cross an oversubscribed link are outlined, and the count is the model's.
    layout_names = [h for hosts in layout(topo).leaf_hosts.values() for h in hosts]
    expected = sum(c.worst.busiest.utilisation > 1 for c in load_matrix(topo, plan, layout_names).values())
    over = page.locator("svg#load-heatmap rect.cell.over")
    assert expected > 0 and over.count() == expected
    assert over.first.evaluate("c => getComputedStyle(c).stroke") != "none"
    assert "oversubscribed" in page.locator("#load-note").inner_text()
    # Links coloured by load: the 2:1 uplinks turn the scale's colour for 200%.
    page.locator("#colour-load").check()
    uplink = page.locator('svg#topology path.link.over[data-util="2"]').first
    rgb = uplink.evaluate("p => getComputedStyle(p).stroke")
    assert rgb == "rgb({}, {}, {})".format(*(int(LOAD.colour(2.0)[i:i + 2], 16) for i in (1, 3, 5)))
    page.locator("svg#load-heatmap").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "viz-512-load.png"))
    print(f"screenshots: {shots}")
    assert not errors, errors
    page.close()
