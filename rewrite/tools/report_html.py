"""report.html: one self-contained page (inline SVG, no scripts, no extra dependencies) from a report's
JSON form (`Report.to_dict()`, what spinfx_report.json holds):

* rules fired per pass, each with the file:line that defines it; notes, refusals, certificates;
* one decoder layer's graph before and after the rewrite, drawn as SVG (`graph_svg`): one box per
  op, layered by depth, spinfx's own ops highlighted;
* plots when the report has them: per-layer quantization error (quantize pass) and activation
  statistics at the linears' inputs before/after (max |x| and kurtosis, from a calibration run);
* the checkpoint's verification (logits of the reloaded model against the program).
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

_REF = re.compile(r"\b(?:v|ext|in)\d+\b")
_LINE = re.compile(r"^(v\d+) = ([\w.]+)\((.*)\)(?: : (.*))?$")
BOX_W, BOX_H, GAP_X, GAP_Y = 150, 26, 14, 22


def write_html(result, path: Path) -> None:
    """Render `result.report` into `path`."""
    Path(path).write_text(render(result.report.to_dict()))


def render(report: dict) -> str:
    esc = html.escape
    parts = [f"<h1>spinfx report — {esc(str(report.get('model', '')))}"
             + (f", recipe {esc(str(report['recipe']))}" if report.get("recipe") else "") + "</h1>"]
    ck = report.get("checkpoint")
    if ck and ck.get("streamed"):
        parts.append(f"<p class=ok>Checkpoint written window by window ({len(report.get('windows', []))} windows), "
                     f"each certified in float64; {esc(ck['why'])}.</p>")
        parts += [f"<p>{esc(n)}</p>" for n in ck.get("notes", [])]
    elif ck:
        parts.append(f"<p class=ok>Checkpoint verified: the reloaded model's logits match the program "
                     f"(max |Δ| {ck['max_abs']:.2e}, relative {ck['rel']:.2e} ≤ {ck['tolerance']:.0e}).</p>")
        parts += [f"<p>{esc(n)}</p>" for n in ck.get("notes", [])]
    if cal := report.get("calibration"):
        parts.append(f"<p>Calibrated on {esc(cal['text'])}: {cal['tokens']} tokens.</p>")
    for p in report.get("passes", []):
        parts.append(_pass_section(p))
    graph = report.get("layer_graph")
    if graph:
        parts.append(f"<h2>One decoder layer ({esc(graph['module'])}) before and after</h2><div class=pair>"
                     f"<figure><figcaption>before</figcaption>{graph_svg(graph['before'])}</figure>"
                     f"<figure><figcaption>after</figcaption>{graph_svg(graph['after'])}</figure></div>")
    quant = next((p["findings"]["layers"] for p in report.get("passes", [])
                  if isinstance(p.get("findings", {}).get("layers"), dict)), None)
    if quant:
        rows = [(m, v["error"]) for m, v in quant.items() if isinstance(v, dict) and "error" in v]
        parts.append("<h2>Quantization error per layer</h2>"
                     + bars_svg(rows, "relative weight error ‖W − Ŵ‖ / ‖W‖"))
    acts = report.get("activations", {}).get("layers")
    if acts:
        names = list(acts)
        for stat, label in (("max_abs", "max |x| at each linear's input"), ("kurtosis", "kurtosis at each linear's input")):
            series = {w: [acts[m][w][stat] for m in names] for w in ("before", "after")}
            parts.append(f"<h2>{label}</h2>" + lines_svg(names, series, log=True))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>spinfx report</title><style>{_CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def _pass_section(p: dict) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r['rule'])}</td><td><code>{esc(r['where'])}</code></td><td>{r['matches']}</td>"
        f"<td>{r.get('applied', 0)}</td><td>{r.get('declined', 0)}</td>"
        f"<td>{esc(r.get('nearest_miss') or '') if not r['matches'] else ''}</td></tr>" for r in p.get("rules", []))
    out = [f"<h2>{esc(p['pass'])} — {p.get('edits', 0)} edits, {p.get('seconds', 0) * 1e3:.0f} ms</h2>"]
    if rows:
        out.append("<table><tr><th>rule</th><th>defined at</th><th>matches</th><th>applied</th><th>declined</th>"
                   f"<th>nearest miss</th></tr>{rows}</table>")
    findings = {k: v for k, v in p.get("findings", {}).items() if k != "layers"}
    if findings:
        out.append(f"<details><summary>findings</summary><pre>{esc(json.dumps(findings, indent=1, default=str))}"
                   f"</pre></details>")
    out += [f"<p>note: {esc(n)}</p>" for n in p.get("notes", [])]
    out += [f"<p class=refused>refused: {esc(n)}</p>" for n in p.get("refusals", [])]
    c = p.get("certificate")
    if c:
        out.append(f"<p class=ok>certified in {esc(str(c.get('dtype', 'float64')))}: max |Δ| {c['max_abs']:.2e}, "
                   f"relative {c['rel']:.2e} ≤ {c['tolerance']:.0e}</p>")
    return "".join(out)


# ---- pictures -------------------------------------------------------------------------------------


def graph_svg(text: str) -> str:
    """A printed graph (spinfx.engine.printer: `v3 = aten.linear(v2, $w) : f32[…]`) as a layered SVG drawing."""
    nodes: dict[str, tuple[str, list[str], str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            name, op, args, _ = m.groups()
            consts = [c.rsplit(".", 2)[-2] if c.count(".") >= 2 else c for c in re.findall(r"\$([\w.]+)", args)]
            label = op.removeprefix("aten.") + (f" {consts[0]}" if consts else "")
            nodes[name] = (label, _REF.findall(args), op)
    depth: dict[str, int] = {}
    for name, (_, refs, _) in nodes.items():
        depth[name] = 1 + max((depth.get(r, 0) for r in refs), default=0)
    rows: dict[int, list[str]] = {}
    for name in nodes:
        rows.setdefault(depth[name], []).append(name)
    pos = {n: (GAP_X + i * (BOX_W + GAP_X), GAP_Y + (d - 1) * (BOX_H + GAP_Y))
           for d, names in rows.items() for i, n in enumerate(names)}
    width = GAP_X + max((len(v) for v in rows.values()), default=1) * (BOX_W + GAP_X)
    height = GAP_Y + max(rows, default=1) * (BOX_H + GAP_Y)
    edges, boxes = [], []
    for name, (label, refs, op) in nodes.items():
        x, y = pos[name]
        for r in refs:
            if r in pos:
                px, py = pos[r]
                edges.append(f"<line x1={px + BOX_W / 2} y1={py + BOX_H} x2={x + BOX_W / 2} y2={y} />")
        cls = "spinfx" if op.startswith("spinfx.") else "op"
        boxes.append(f"<g class={cls}><rect x={x} y={y} width={BOX_W} height={BOX_H} rx=4 />"
                     f"<text x={x + 6} y={y + 17}>{html.escape(label[:24])}</text><title>{name} = "
                     f"{html.escape(label)}</title></g>")
    return (f"<svg class=graph viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg'>"
            f"{''.join(edges)}{''.join(boxes)}</svg>")


def bars_svg(rows: list[tuple[str, float]], label: str) -> str:
    """One bar per (name, value), names as tooltips, the value axis labelled."""
    w, h, pad = max(400, 8 * len(rows) + 60), 220, 40
    top = max((v for _, v in rows), default=1.0) or 1.0
    step = (w - pad - 10) / max(len(rows), 1)
    bars = "".join(f"<rect x={pad + i * step:.1f} y={h - pad - (h - 2 * pad) * v / top:.1f} width={max(step - 1, 1):.1f} "
                   f"height={(h - 2 * pad) * v / top:.1f}><title>{html.escape(n)}: {v:.4g}</title></rect>"
                   for i, (n, v) in enumerate(rows))
    return (f"<svg class=plot width={w} height={h} xmlns='http://www.w3.org/2000/svg'>{_axes(w, h, pad, label, top)}"
            f"{bars}</svg>")


def lines_svg(names: list[str], series: dict[str, list[float]], log: bool = False) -> str:
    """One polyline per series over the layers (log10 scale if `log`), a legend."""
    w, h, pad = max(400, 8 * len(names) + 60), 220, 40
    f = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    vals = [f(v) for s in series.values() for v in s if v == v]  # drop NaN
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    step = (w - pad - 10) / max(len(names) - 1, 1)
    out = []
    for k, (name, s) in enumerate(series.items()):
        pts = [(pad + i * step, h - pad - (h - 2 * pad) * (f(v) - lo) / (hi - lo)) for i, v in enumerate(s) if v == v]
        dots = "".join(f"<circle class=s{k} cx={x:.1f} cy={y:.1f} r=2.5 />" for x, y in pts)
        out.append(f"<polyline class=s{k} points='{' '.join(f'{x:.1f},{y:.1f}' for x, y in pts)}' />{dots}"
                   f"<text class=s{k} x={w - 90} y={16 + 14 * k}>{name}</text>")
    label = f"log10 {lo:.2f} … {hi:.2f}" if log else f"{lo:.3g} … {hi:.3g}"
    return (f"<svg class=plot width={w} height={h} xmlns='http://www.w3.org/2000/svg'>"
            f"{_axes(w, h, pad, label, None)}{''.join(out)}</svg>")


def _axes(w: int, h: int, pad: int, label: str, top: float | None) -> str:
    y_top = f"<text x=2 y={pad - 4}>{top:.3g}</text>" if top is not None else ""
    return (f"<line class=axis x1={pad} y1={h - pad} x2={w - 10} y2={h - pad} />"
            f"<line class=axis x1={pad} y1={pad} x2={pad} y2={h - pad} />{y_top}"
            f"<text x={pad} y={h - 10}>{html.escape(label)} (per layer, in graph order)</text>")


_CSS = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
code { font-size: 12px; } .ok { color: #176117; } .refused { color: #a11; }
.pair { display: flex; gap: 24px; align-items: flex-start; }
.pair figure { flex: 1 1 0; min-width: 0; margin: 0; } figcaption { font-weight: bold; margin-bottom: 4px; }
svg.graph { width: 100%; height: auto; }
svg.graph line { stroke: #999; stroke-width: 1; }
svg.graph rect { fill: #eef3fb; stroke: #5b7db1; } svg.graph .spinfx rect { fill: #ffe2b3; stroke: #c77800; }
svg.graph text, svg.plot text { font: 11px monospace; fill: #222; }
svg.plot rect { fill: #5b7db1; } svg.plot .axis { stroke: #444; }
svg.plot polyline { fill: none; stroke-width: 2; } polyline.s0 { stroke: #c0392b; } polyline.s1 { stroke: #2471a3; }
text.s0, circle.s0 { fill: #c0392b !important; } text.s1, circle.s1 { fill: #2471a3 !important; }
"""
