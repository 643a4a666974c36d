"""The visualiser's HTML and images, read back as XML/bytes (the browser test renders them)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings

from launcher.cli import main
from tests.mangle import mangled
from topology.errors import ConfigError
from topology.planning.plan import Plan, RankPlacement
from topology.planning.planner import make_plan
from topology.network.presets import load_topology
from topology.viz.page import render_html, render_image, save
from topology.viz.layout import cycle_hops

SVG = "{http://www.w3.org/2000/svg}"


def _svg(page: str, svg_id: str) -> ET.Element:
    m = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S)
    assert m, f"no svg#{svg_id}"
    return ET.fromstring(m.group(0))


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


@pytest.mark.parametrize("preset, cp", [("l40s-host", 8), ("g6e-4x", 32), ("leafspine-64x-2to1", 32)])
def test_page_has_one_box_per_host_and_one_cycle_per_ring(preset, cp):
    topo = load_topology(preset)
    plan = make_plan(topo, topo.num_gpus, cp)
    page = render_html(topo, plan)
    root = _svg(page, "topology")
    assert len(_groups(root, "host")) == len(topo.hosts)
    rings = _groups(root, "ring")
    assert sorted(int(g.get("data-ring")) for g in rings) == list(range(len(plan.groups.ring_groups)))
    gpus = _groups(root, "gpu")
    assert sorted(int(g.get("data-rank")) for g in gpus) == list(range(plan.world_size))
    assert len(_groups(root, "dp")) == (len(plan.groups.dp_groups) if plan.dp > 1 else 0)
    # Offline: nothing fetched (the SVG namespace is a name, not a download).
    assert not re.search(r'(src|href)=["\']https?:|url\(\s*["\']?https?:|@import', page)
    # Readable at 512 GPUs: rings drawn host to host, every host's GPU segments kept for expanding.
    level = re.search(r'<div id="viz" data-level="(\w+)"', page)
    assert level.group(1) == ("gpus" if topo.num_gpus <= 64 else "hosts")


def test_tooltips_carry_the_figures():
    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 32)
    root = _svg(render_html(topo, plan), "topology")
    rank5 = next(g for g in _groups(root, "gpu") if g.get("data-rank") == "5")
    info = next(g for g in plan.placements if g.rank == 5)
    tip = rank5.find(f"{SVG}title").text
    assert f"{info.host}/gpu{info.gpu}" in tip and "rank 5, ring 0" in tip and "DP group" in tip
    links = [p for p in root.iter(f"{SVG}path") if "link" in (p.get("class") or "").split()]
    assert links and all(re.search(r"\d+(\.\d)? GB/s, \d+(\.\d)? µs", p.find(f"{SVG}title").text) for p in links)
    # The ring's tooltip names its slowest hop, which must be the topology's own figure.
    gpus = [topo.gpu_id(plan.placements[r].host, plan.placements[r].gpu) for r in plan.groups.ring_groups[0]]
    slowest = min(h.bw for h in cycle_hops(topo, gpus))
    ring_tip = _groups(root, "ring")[0].find(f"{SVG}title").text
    assert f"slowest hop {slowest:.1f} GB/s" in ring_tip


def test_heatmap_shows_host_pairs_and_the_degraded_host():
    topo = load_topology("leafspine-64x-2to1-degraded")
    heat = _svg(render_html(topo), "heatmap")
    cells = [c for c in heat.iter(f"{SVG}rect") if c.get("class") == "cell"]
    assert len(cells) == 64 * 64
    tips = {(c.get("data-a"), c.get("data-b")): c.find(f"{SVG}title").text for c in cells}
    assert "3.1 GB/s" in tips[("h13", "h14")]  # its cable runs at a quarter of 12.5 GB/s
    assert "12.5 GB/s" in tips[("h12", "h14")]


def test_plan_for_another_topology_is_refused():
    small = load_topology("g6e-4x")
    plan = make_plan(load_topology("g6e-64x"), 32, 32, hosts=["h40", "h41", "h42", "h43"])
    with pytest.raises(ConfigError, match="host 'h4[0-3]', which topology 'g6e-4x' does not have"):
        render_html(small, plan)
    bad_gpu = Plan("naive", 1, 2, 1, 64, [RankPlacement(0, "h00", 0), RankPlacement(1, "h00", 9)])
    with pytest.raises(ConfigError, match="GPU 9 of host 'h00'"):
        render_html(small, bad_gpu)


def test_images_are_written_as_png_and_svg(tmp_path):
    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 32)
    render_image(topo, plan, tmp_path / "rings.png")
    assert (tmp_path / "rings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save(topo, plan, tmp_path / "rings.svg", show_dp=True)
    assert b"<svg" in (tmp_path / "rings.svg").read_bytes()[:2000]
    with pytest.raises(ConfigError, match=r"\.html, \.png or \.svg"):
        save(topo, plan, tmp_path / "rings.pdf")


@pytest.mark.parametrize("case", ["missing-topology", "malformed-plan", "missing-plan", "mismatched-plan", "other-topology", "bad-suffix"])
def test_cli_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    topology = "g6e-4x"
    if case == "missing-topology":
        topology = str(tmp_path / "nope.yaml")
        make_plan(load_topology("g6e-4x"), 32, 32).save(plan_path)
    elif case == "malformed-plan":
        plan_path.write_text("{not json")
    elif case == "mismatched-plan":
        data = make_plan(load_topology("g6e-4x"), 32, 32).to_dict()
        data["placements"][3]["host"] = "h99"
        plan_path.write_text(json.dumps(data))
    elif case == "other-topology":  # its hosts exist here too, but its figures are another cluster's
        make_plan(load_topology("g6e-64x"), 32, 32, hosts=["h00", "h01", "h02", "h03"]).save(plan_path)
    elif case == "bad-suffix":
        make_plan(load_topology("g6e-4x"), 32, 32).save(plan_path)
    out = tmp_path / ("out.txt" if case == "bad-suffix" else "out.html")
    args = ["viz", topology, "-o", str(out), "--plan", str(tmp_path / "none.json" if case == "missing-plan" else plan_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringleader: error:") and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


PLAN = make_plan(load_topology("g6e-1x"), 8, 4, ulysses=2).to_dict()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mangled({"plan": PLAN}))
def test_any_mangled_plan_draws_or_is_refused_in_one_line(tmp_path_factory, capsys, case):
    """A plan file with a field dropped, repeated or given a wrong value (its cost figures included) is drawn, or
    refused in one line with exit 2, and then nothing is written."""
    _, data, changes = case
    folder = tmp_path_factory.mktemp("mangled")
    (folder / "plan.json").write_text(json.dumps(data))
    capsys.readouterr()
    code = main(["viz", "g6e-1x", "--plan", str(folder / "plan.json"), "-o", str(folder / "out.html")])
    err = capsys.readouterr().err
    assert code in (0, 2), (changes, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("ringleader: error: "), (changes, err)
        assert not (folder / "out.html").exists()


def test_cli_writes_html_for_a_preset_without_plan(tmp_path, capsys):
    out = tmp_path / "topo.html"
    assert main(["viz", "leafspine-64x-4to1", "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count('<g class="host"') == 64 and page.count('<g class="leaf"') == 8
    assert "64 hosts, 512 GPUs" in capsys.readouterr().out


def test_cli_cpu_slots_leaves_out_the_gpu_predictions(tmp_path):
    make_plan(load_topology("g6e-4x"), 32, 8).save(tmp_path / "plan.json")
    for flag, out in (([], tmp_path / "gpu.html"), (["--cpu-slots"], tmp_path / "cpu.html")):
        assert main(["viz", "g6e-4x", "--plan", str(tmp_path / "plan.json"), "-o", str(out)] + flag) == 0
    gpu, cpu = (tmp_path / "gpu.html").read_text(), (tmp_path / "cpu.html").read_text()
    assert "tokens/s" in gpu and "CPU slots" not in gpu
    assert "tokens/s" not in cpu and "MFU" not in cpu and "CPU slots" in cpu


def test_measured_profile_draws_direct_host_links_and_never_limiting_ties():
    from topology.network.model import MEASURED_FORMAT, Topology

    profile = {
        "format": MEASURED_FORMAT, "version": 1, "name": "ray-cluster",
        "hosts": [{"name": "10.0.0.1", "gpus": 2, "leaf": "rack-a"}, {"name": "10.0.0.2", "gpus": 2, "leaf": "rack-a"},
                  {"name": "10.0.0.3", "gpus": 2, "leaf": "rack-b"}],
        "host_bw_gbps": [[0, 40.0, 9.5], [40.0, 0, 9.5], [9.5, 9.5, 0]],
        "host_lat_us": [[0, 5, 30], [5, 0, 30], [30, 30, 0]],
    }
    topo = Topology.from_measured(profile)
    plan = Plan("naive", 1, 6, 1, 96, [RankPlacement(i, f"10.0.0.{i // 2 + 1}", i % 2) for i in range(6)])
    root = _svg(render_html(topo, plan), "topology")
    tips = [p.find(f"{SVG}title").text for p in root.iter(f"{SVG}path") if "link" in (p.get("class") or "").split()]
    assert any(t.startswith("10.0.0.1/nic0 — 10.0.0.3/nic0: 9.5 GB/s, 30.0 µs") for t in tips)
    assert sum("never limits" in t for t in tips) == 6  # each GPU's tie to its NIC stands for "no bottleneck"
    assert sorted(g.get("data-leaf") for g in _groups(root, "leaf")) == ["rack-a", "rack-b"]
    ring = _groups(root, "ring")[0].find(f"{SVG}title").text
    assert "slowest hop 9.5 GB/s" in ring


def _link_colours(page: str) -> dict[float, set[str]]:
    out: dict[float, set[str]] = {}
    for bw, colour in re.findall(r'<path class="link[^"]*" data-bw="([\d.]+)"[^>]* stroke="(#[0-9a-f]{6})"', page):
        out.setdefault(float(bw), set()).add(colour)
    return out


def test_one_absolute_bandwidth_scale_for_every_picture(tmp_path):
    from topology.viz.colour_scale import BANDWIDTH

    small, big = load_topology("g6e-4x"), load_topology("leafspine-64x-2to1")
    a, b = _link_colours(render_html(small)), _link_colours(render_html(big))
    # PCIe runs at 25 GB/s in both clusters, whose slowest and fastest links differ: one colour all the same.
    assert a[25.0] == b[25.0] == {BANDWIDTH.colour(25.0)}
    assert BANDWIDTH.colour(12.5) != BANDWIDTH.colour(25.0) != BANDWIDTH.colour(50.0)
    cells = {c.get("fill") for c in _svg(render_html(big), "heatmap").iter(f"{SVG}rect") if c.get("data-bw") == "12.5"}
    assert cells == {BANDWIDTH.colour(12.5)}
    # The image's colour bar reads in plain numbers over the same fixed range.
    plan = make_plan(small, 32, 8)
    save(small, plan, tmp_path / "rings.svg")
    svg = (tmp_path / "rings.svg").read_text()
    ticks = re.findall(r"<!-- ([^>]*?) -->", svg)
    assert {"0.1", "1", "10", "100", "1000", "0%", "100%", "200%"} <= set(ticks)
    assert not [t for t in ticks if "times" in t or "^" in t]


def test_load_heatmap_marks_the_oversubscribed_links():
    from topology.network.load import link_loads, ring_flows

    topo = load_topology("leafspine-64x-2to1")
    naive, aware = (make_plan(topo, 512, 64, strategy=s) for s in ("naive", "aware"))
    loads = link_loads(topo, ring_flows(naive, topo))
    # Eight hosts of a leaf each send one ring flow out at 12.5 GB/s; the leaf has 50 GB/s up: 2:1.
    up = [loads[l].utilisation for l in loads if {topo.kind(l[0]), topo.kind(l[1])} == {"leaf", "spine"}]
    assert up and max(up) == pytest.approx(2.0)
    heat = _svg(render_html(topo, naive), "load-heatmap")
    hosts = [h for leaf in sorted({topo.leaf_of(h) for h in topo.hosts}) for h in sorted(h for h in topo.hosts if topo.leaf_of(h) == leaf)]
    over = {(c.get("data-a"), c.get("data-b")) for c in heat.iter(f"{SVG}rect") if "over" in c.get("class").split()}
    nodes = [topo.gpu_id(p.host, p.gpu) for p in naive.placements]
    crossing = {(topo.host_of(nodes[a]), topo.host_of(nodes[b])) for g in naive.groups.ring_groups
                for a, b in zip(g, g[1:] + g[:1]) if topo.leaf_of(topo.host_of(nodes[a])) != topo.leaf_of(topo.host_of(nodes[b]))}
    assert over == crossing and len(hosts) == 64
    # The aware plan keeps every ring inside a leaf: nothing over 100%, and the page says so.
    page = render_html(topo, aware)
    assert not [c for c in _svg(page, "load-heatmap").iter(f"{SVG}rect") if "over" in c.get("class").split()]
    assert "No link is oversubscribed" in page


def test_neighbouring_rings_get_different_hues():
    import colorsys

    from matplotlib.colors import to_rgb

    from topology.viz.layout import group_colours, host_cycle, layout

    topo = load_topology("leafspine-64x-2to1")
    for cp in (32, 8):  # two rings per leaf row; eight per row
        plan = make_plan(topo, 512, cp)
        lay, ranks = layout(topo), plan.placements
        hosts = [host_cycle(topo, [topo.gpu_id(ranks[r].host, ranks[r].gpu) for r in g]) for g in plan.groups.ring_groups]
        colours = group_colours(lay, hosts)
        assert len(set(colours)) == len(colours)
        rows = lay.rows()
        for i in range(len(hosts)):
            for j in range(i):
                if {rows[h] for h in hosts[i]} & {rows[h] for h in hosts[j]}:
                    hi, hj = (colorsys.rgb_to_hls(*to_rgb(colours[k]))[0] for k in (i, j))
                    assert min(abs(hi - hj), 1 - abs(hi - hj)) > 0.04, (cp, i, j, colours[i], colours[j])


def test_header_is_formatted_and_cpu_runs_show_no_gpu_predictions():
    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 8)
    header = re.search(r'<div class="figures">(.*?)</div>\s*</header>', render_html(topo, plan), re.S).group(1)
    tps = plan.cost["tokens_per_s"]
    assert f"{float(f'{tps:.3g}'):,.0f} tokens/s" in header and f"MFU <b>{plan.cost['mfu'] * 100:.1f}%" in header
    assert "_" not in re.sub(r"<[^>]*>", "", header) and "e+" not in header and "L40S" in header
    cpu = re.search(r'<div class="figures">(.*?)</div>\s*</header>', render_html(topo, plan, on_gpus=False), re.S).group(1)
    assert "CPU slots" in cpu and "slowest ring hop" in cpu
    assert not re.search(r"tokens/s|MFU|µs|\d ms|\d s<|L40S", cpu) and "step_time_s" not in cpu, cpu


def test_svg_is_deterministic_with_hover_titles_and_a_ring_legend(tmp_path):
    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 8)
    save(topo, plan, tmp_path / "a.svg")
    save(topo, plan, tmp_path / "b.svg")
    data = (tmp_path / "a.svg").read_bytes()
    assert data == (tmp_path / "b.svg").read_bytes()
    assert b"<dc:date>" not in data
    root = ET.fromstring(data)
    titled = {(g.get("id") or g.find(f"{SVG}image").get("id")): g.find(f"{SVG}title").text
              for g in root.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None}
    assert {f"ring-{i}" for i in range(4)} <= set(titled) and "32 ranks" not in titled["ring-0"]
    assert titled["ring-0"].startswith("ring 0: 8 ranks on")
    assert {"heatmap-bw", "heatmap-load"} <= set(titled)
    legend = set(re.findall(r"<!-- (ring \d+: [^>]*?) -->", data.decode()))
    assert all(any(titled[f"ring-{i}"].startswith(entry) for entry in legend) for i in range(4))  # one legend entry per ring


@pytest.mark.parametrize("module", ["topology.viz.colour_scale", "topology.network.load", "topology.viz.figures"])
def test_hand_checked_examples_in_docstrings(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_nvlink_switches_are_a_layer_above_the_hosts(tmp_path):
    """nvl-2x16: each NVLink switch is a box of its own above every host, every GPU's NVLink runs up to it."""
    topo = load_topology("nvl-2x16")
    plan = make_plan(topo, 32, 16)
    root = _svg(render_html(topo, plan), "topology")
    boxes = {g.get("data-switch"): g.find(f"{SVG}rect") for g in _groups(root, "nvswitch")}
    assert sorted(boxes) == sorted(topo.nodes_of_kind("nvswitch"))
    assert not {g.get("data-leaf") for g in _groups(root, "leaf")} & set(boxes)  # not drawn as a leaf
    top = min(float(g.find(f"{SVG}rect").get("y")) for g in _groups(root, "host"))
    assert all(float(r.get("y")) + float(r.get("height")) < top for r in boxes.values())
    # One group of switches per NVLink domain, side by side.
    xs = {s: float(r.get("x")) for s, r in boxes.items()}
    assert max(x for s, x in xs.items() if s.startswith("nvl0/")) < min(x for s, x in xs.items() if s.startswith("nvl1/"))
    uplinks = [p for p in root.iter(f"{SVG}path") if "uplink" in (p.get("class") or "").split()]
    for s, r in boxes.items():
        end = (float(r.get("x")) + float(r.get("width")) / 2, float(r.get("y")) + float(r.get("height")))
        ends = [p for p in uplinks if p.get("d").endswith(f"{end[0]:.1f},{end[1]:.1f}")]
        assert len(ends) == topo.graph.degree(s) == 16
        assert all(f" — {s}:" in p.find(f"{SVG}title").text or p.find(f"{SVG}title").text.startswith(s) for p in ends)
    render_image(topo, plan, tmp_path / "nvl.png")
    assert (tmp_path / "nvl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save(topo, plan, tmp_path / "nvl.svg")
    svg = (tmp_path / "nvl.svg").read_text()
    assert all(s in svg for s in boxes)  # the switches are labelled in the image too
