"""`sdtune report RUN`: one self-contained HTML page (no network, plots inline) of a run.

Written by hand because the page must open anywhere with nothing but the file: the plots are
inline SVG drawn from metrics.jsonl, the sample grids are embedded PNGs, and the numbers behind
every plot are embedded as JSON (id="sdtune-data") for anyone who wants them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from sdtune.files import atomic_output

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
MAX_GRIDS = 12


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a live run
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append((int(row["step"]), float(value)))
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def svg_chart(title: str, series: dict[str, list[tuple[int, float]]], log_y: bool = False) -> str:
    """A line chart of step -> value series as inline SVG (axes with min/max labels, legend)."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    width, height, left, right, top, bottom = 560, 240, 64, 12, 28, 36
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    use_log = log_y and min(ys) > 0
    fy = math.log10 if use_log else (lambda v: v)
    x0, x1 = min(xs), max(xs)
    y0, y1 = fy(min(ys)), fy(max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12 + abs(y0) * 1e-6)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - (fy(y) - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="title">{html.escape(title)}{" (log scale)" if use_log else ""}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 4}" class="tick" text-anchor="end">{_fmt(max(ys))}</text>',
        f'<text x="{left - 4}" y="{height - bottom}" class="tick" text-anchor="end">{_fmt(min(ys))}</text>',
        f'<text x="{left}" y="{height - bottom + 14}" class="tick">{x0}</text>',
        f'<text x="{width - right}" y="{height - bottom + 14}" class="tick" text-anchor="end">{max(xs)}</text>',
        f'<text x="{(left + width) / 2}" y="{height - 4}" class="tick" text-anchor="middle">step</text>',
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        values = " ".join(f"{x}:{y!r}" for x, y in pts)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}" '
            f'data-series="{html.escape(name)}" data-values="{values}"/>'
        )
        if len(pts) == 1:
            parts.append(
                f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{colour}"/>'
            )
        parts.append(
            f'<text x="{width - right - 4}" y="{top + 12 + 13 * i}" class="legend" text-anchor="end" '
            f'fill="{colour}">{html.escape(name)}: {_fmt(pts[-1][1])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _grids(run_dir: Path) -> list[tuple[int, str]]:
    files = sorted((run_dir / "samples").glob("step-*.png"))
    if len(files) > MAX_GRIDS:  # evenly spaced, always with the first and the last
        idx = sorted({round(i * (len(files) - 1) / (MAX_GRIDS - 1)) for i in range(MAX_GRIDS)})
        files = [files[i] for i in idx]
    return [(int(f.stem.split("-")[1]), base64.b64encode(f.read_bytes()).decode()) for f in files]


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #e4e4e4;background:#fff}
.title{font-size:13px;font-weight:600}.tick{font-size:10px;fill:#555}.legend{font-size:11px}
.axis{stroke:#999}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.grids{display:flex;flex-wrap:wrap;gap:12px}.grids figure{margin:0}.grids img{image-rendering:pixelated;width:220px}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto}
"""


def build_report(run_dir: Path) -> str:
    """The HTML text of the report of `run_dir`."""
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    events = _read_jsonl(run_dir / "events.jsonl")
    summary = (
        json.loads((run_dir / "run_summary.json").read_text())
        if (run_dir / "run_summary.json").is_file()
        else {}
    )
    judge = (
        json.loads((run_dir / "judge.json").read_text())
        if (run_dir / "judge.json").is_file()
        else {}
    )
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""
    keys = sorted({k for r in rows for k in r if k != "step"})
    data = {k: _series(rows, k) for k in keys}
    val_keys = [k for k in keys if k.startswith("val_loss")]
    charts = [
        svg_chart(
            "training and validation loss",
            {k: data[k] for k in ["loss", "val_loss", "val_loss_ema", "train_loss"] if k in data},
            log_y=True,
        ),
        svg_chart(
            "validation loss by noise level",
            {k: data[k] for k in val_keys if k.endswith(("_low", "_mid", "_high"))},
            log_y=True,
        ),
        svg_chart("learning rate", {"lr": data.get("lr", [])}),
        svg_chart("gradient norm", {"grad_norm": data.get("grad_norm", [])}, log_y=True),
        svg_chart("images per second", {"images_per_s": data.get("images_per_s", [])}),
    ]
    known = {
        "loss",
        "lr",
        "grad_norm",
        "images_per_s",
        "epoch",
        "skipped_steps",
        "train_loss",
        *val_keys,
    }
    charts += [svg_chart(k, {k: data[k]}) for k in keys if k not in known and data[k]]
    last = rows[-1]["step"] if rows else 0
    facts = [("run", str(run_dir)), ("last step logged", str(last))]
    for key in ("steps", "stopped", "best_checkpoint", "final_val_loss", "skipped_steps"):
        if key in summary and summary[key] is not None:
            facts.append((key.replace("_", " "), str(summary[key])))
    if summary.get("best_metric"):
        facts.append(
            (
                "best metric",
                f"{summary['best_metric']['name']} = {_fmt(summary['best_metric']['value'])}",
            )
        )
    if judge:
        facts.append(
            (
                "judged accuracy",
                f"{judge['judged_accuracy']:.3f} (judge held-out {judge['judge_held_out_accuracy']:.3f})",
            )
        )
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>sdtune report: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>sdtune run report: {html.escape(run_dir.name)}</h1>",
        "<table>"
        + "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in facts)
        + "</table>",
        '<h2>Curves</h2><div class="charts">' + "".join(c for c in charts if c) + "</div>",
    ]
    grids = _grids(run_dir)
    if grids:
        out.append('<h2>Samples over time (same prompts and seed)</h2><div class="grids">')
        out += [
            f'<figure><img alt="samples at step {s}" src="data:image/png;base64,{b}"><figcaption>step {s}</figcaption></figure>'
            for s, b in grids
        ]
        out.append("</div>")
    out.append("<h2>Events</h2>")
    if events:
        out.append("<table><tr><th>step</th><th>event</th><th>message</th></tr>")
        out += [
            f"<tr><td>{e.get('step')}</td><td>{html.escape(str(e.get('event')))}</td><td>{html.escape(str(e.get('message')))}</td></tr>"
            for e in events
        ]
        out.append("</table>")
    else:
        out.append("<p>None: no skipped steps, rollbacks, warnings or early stop.</p>")
    out.append(f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    payload = json.dumps({"series": data, "events": events, "summary": summary}).replace(
        "</", "<\\/"
    )
    out.append(f'<script type="application/json" id="sdtune-data">{payload}</script>')
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (atomically) to `out` or RUN_DIR/report.html."""
    target = out or run_dir / "report.html"
    page = build_report(run_dir)
    with atomic_output(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target
