"""`sdtune report RUN [RUN ...]`: one self-contained HTML page (no network, plots inline) of a
run, or of several runs side by side.

Written by hand because the page must open anywhere with nothing but the file: the plots are
inline SVG drawn from metrics.jsonl (gridlines at round values, a legend under the plot, every
point's value on hover, evaluations marked), the sample grids are embedded PNGs labelled with
their prompts, and the numbers behind every plot are embedded as JSON (id="sdtune-data") for
anyone who wants them. With several runs, each metric is one chart with a line per run, the
sample grids of the steps all runs have sit side by side, and two tables give the config keys
that differ and the final numbers.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import tomllib

from sdtune.files import atomic_output

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
MAX_GRIDS = 12
MAX_HOVER_POINTS = 400  # hover targets per series (evenly chosen, always the last)
PROMPTS_FILE = "prompts.json"  # samples/prompts.json: what the grids' rows show

# what each logged key is, as the report names it (raw and EMA weights said as such)
LABELS = {
    "loss": "training loss",
    "train_loss": "training loss, mean since the last evaluation",
    "val_loss": "validation loss (raw weights)",
    "val_loss_ema": "validation loss (EMA weights)",
    "preserve_loss": "output-preservation loss",
    "lr": "learning rate",
    "lr_effective": "step size taken (Prodigy: its estimate d x lr; schedule-free: warmed up)",
    "grad_norm": "gradient norm",
    "images_per_s": "images per second",
    "update_ratio": "|update| / |weights|",
}
EVALUATED = ("val_", "gen_", "judged_", "diversity", "memorisation", "fid", "kid", "train_loss")


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or torn by a kill: the page does without it
        return {}
    return data if isinstance(data, dict) else {}


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append((int(row["step"]), float(value)))
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    for suffix, words in (("_low", "low noise"), ("_mid", "mid noise"), ("_high", "high noise")):
        for ema, weights in (("_ema", "EMA weights"), ("", "raw weights")):
            if key == f"val_loss{suffix}{ema}":
                return f"validation loss, {words} ({weights})"
    return key.replace("_", " ")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside [low, high]: the widest such
    spacing that gives at least three of them (or two, where the range allows no more)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    candidates = sorted({m * power * f for m in (1, 2, 5, 10) for f in (0.1, 1)}, reverse=True)
    best: list[float] = []
    for step in candidates:
        if step > raw * 2.5:
            continue
        first = math.ceil(low / step - 1e-9) * step
        ticks, value = [], first
        while value <= high + step * 1e-9:
            ticks.append(round(value, 12))
            value += step
        if len(ticks) > len(best):
            best = ticks
        if len(ticks) >= 3:
            return ticks
    return best


def log_ticks(low: float, high: float) -> list[float]:
    """Decades inside [low, high], with 2 and 5 between them when fewer than three decades;
    round linear values when the range is narrower than that."""
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1,) if hi - lo > 3 else (1, 2, 5)
    ticks = [m * 10.0**e for e in range(lo, hi + 1) for m in steps]
    inside = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
    if len(inside) >= 2:
        return inside
    linear = [t for t in nice_ticks(low, high) if t > 0]
    return linear if len(linear) >= 2 else [low, high]


def _tick_text(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.6g}"


def svg_chart(
    title: str,
    series: dict[str, list[tuple[int, float]]],
    log_y: bool = False,
    marked: frozenset[str] | set[str] = frozenset(),
    stages: list[tuple[int, str]] = (),
) -> str:
    """A line chart of step -> value series as inline SVG: gridlines and labels at round
    values, a legend under the plot with each series' last value, a hover title on every
    point, a dot on each point of the `marked` series (evaluations), and a dashed line at
    each of the `stages`' first step (curriculum stage changes, with their description)."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    width, left, right, top, plot_h = 560, 64, 16, 28, 190
    legend_h = 16 * len(series) + 6
    height = top + plot_h + 30 + legend_h
    bottom_y = top + plot_h
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    use_log = log_y and min(ys) > 0
    fy = math.log10 if use_log else (lambda v: v)
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    if use_log:
        yticks = log_ticks(min(ys), max(ys))
        lo, hi = min(min(ys), yticks[0]), max(max(ys), yticks[-1])
    else:
        yticks = nice_ticks(min(ys), max(ys))
        lo, hi = min(min(ys), yticks[0]), max(max(ys), yticks[-1])
    y0, y1 = fy(lo), fy(hi)
    y1 = y1 if y1 > y0 else y0 + 1e-12 + abs(y0) * 1e-6

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - (fy(y) - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="title">{html.escape(title)}'
        f"{' (log scale)' if use_log else ''}</text>",
    ]
    for tick in yticks:
        y = py(tick)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">'
            f"{_tick_text(tick)}</text>"
        )
    for tick in nice_ticks(x0, x1, 6):
        if x0 <= tick <= x1:
            x = px(tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom_y}" class="grid"/>'
                f'<text x="{x:.1f}" y="{bottom_y + 13}" class="tick" text-anchor="middle">'
                f"{_tick_text(tick)}</text>"
            )
    parts += [
        f'<line x1="{left}" y1="{bottom_y}" x2="{width - right}" y2="{bottom_y}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom_y}" class="axis"/>',
        f'<text x="{width - right}" y="{bottom_y + 26}" class="tick" text-anchor="end">step</text>',
    ]
    for step, what in stages:
        if x0 <= step <= x1:
            x = px(step)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom_y}" class="stage" '
                f'stroke="#888" stroke-dasharray="4 3"><title>{html.escape(what)}</title></line>'
            )
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        values = " ".join(f"{x}:{y!r}" for x, y in pts)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}" '
            f'data-series="{html.escape(name)}" data-values="{values}"/>'
        )
        dots = name in marked or len(pts) == 1
        chosen = pts
        if len(pts) > MAX_HOVER_POINTS:
            every = len(pts) / MAX_HOVER_POINTS
            chosen = [pts[int(i * every)] for i in range(MAX_HOVER_POINTS)] + [pts[-1]]
        for x, y in chosen:
            fill = colour if dots else "transparent"
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{3 if dots else 4}" fill="{fill}">'
                f"<title>{html.escape(name)} at step {x}: {_fmt(y)}</title></circle>"
            )
        ly = bottom_y + 42 + 16 * i
        parts.append(
            f'<rect x="{left}" y="{ly - 8}" width="14" height="3" fill="{colour}"/>'
            f'<text x="{left + 20}" y="{ly - 3}" class="legend">{html.escape(name)}: '
            f"{_fmt(pts[-1][1])} at step {pts[-1][0]}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _grid_files(run_dir: Path) -> dict[int, Path]:
    files = {}
    for f in (run_dir / "samples").glob("step-*.png"):
        try:
            files[int(f.stem.split("-")[1])] = f
        except (IndexError, ValueError):
            continue
    return dict(sorted(files.items()))


def _spread(steps: list[int], limit: int) -> list[int]:
    """At most `limit` of `steps`, evenly spaced, always with the first and the last."""
    if len(steps) <= limit:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)})
    return [steps[i] for i in idx]


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _step_caption(step: int) -> str:
    return "step 0 (the base, before training)" if step == 0 else f"step {step}"


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #e4e4e4;background:#fff}
.title{font-size:13px;font-weight:600}.tick{font-size:10px;fill:#555}.legend{font-size:11px}
.axis{stroke:#999}.grid{stroke:#eee}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.grids{display:flex;flex-wrap:wrap;gap:12px}.grids figure{margin:0}
img.grid{image-rendering:pixelated;width:220px}figcaption{font-size:12px}
ol.prompts{font-size:13px}pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto}
"""


def _page(title: str, body: list[str], payload: dict) -> str:
    data = json.dumps(payload).replace("</", "<\\/")
    return "\n".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            f'<script type="application/json" id="sdtune-data">{data}</script>',
            "</body></html>",
        ]
    )


def _table(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in rows)
        + "</table>"
    )


class RunView:
    """What the report reads of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.rows = _read_jsonl(run_dir / "metrics.jsonl")
        self.events = _read_jsonl(run_dir / "events.jsonl")
        self.summary = _read_json(run_dir / "run_summary.json")
        self.judge = _read_json(run_dir / "judge.json")
        self.prompts = _read_json(run_dir / "samples" / PROMPTS_FILE)
        config_path = run_dir / "config.toml"
        self.config_text = config_path.read_text() if config_path.is_file() else ""
        try:
            self.config = tomllib.loads(self.config_text)
        except tomllib.TOMLDecodeError:
            self.config = {}
        self.keys = sorted({k for r in self.rows for k in r if k != "step"})
        self.data = {k: _series(self.rows, k) for k in self.keys}

    @property
    def log_every(self) -> int | None:
        return self.config.get("train", {}).get("log_every")

    def loss_label(self) -> str:
        every = self.log_every
        if every is None or every == 1:
            return "training loss (each step)" if every == 1 else "training loss"
        return f"training loss, mean of each {every} steps"

    def facts(self) -> list[tuple[str, str]]:
        last = self.rows[-1]["step"] if self.rows else 0
        s = self.summary
        facts = [("run", str(self.dir)), ("last step logged", str(last))]
        if "steps" in s:
            facts.append(("steps trained", str(s["steps"])))
        if s.get("stopped"):
            facts.append(("stopped", str(s["stopped"])))
        if isinstance(s.get("train_seconds"), int | float):
            facts.append(("training time", f"{s['train_seconds']:.1f} s"))
        if isinstance(s.get("final_val_loss"), int | float):
            weights = "EMA weights" if "val_loss_ema" in self.data else "raw weights"
            facts.append((f"final validation loss ({weights})", _fmt(s["final_val_loss"])))
        if s.get("best_checkpoint"):
            facts.append(("best checkpoint", str(s["best_checkpoint"])))
        if s.get("best_metric"):
            m = s["best_metric"]
            facts.append(("best metric", f"{_label(m['name'])} = {_fmt(m['value'])}"))
        if isinstance(s.get("skipped_steps"), int):
            facts.append(("skipped steps", str(s["skipped_steps"])))
        if self.judge:
            facts.append(
                (
                    "judged accuracy",
                    f"{self.judge['judged_accuracy']:.3f} (judge held-out "
                    f"{self.judge['judge_held_out_accuracy']:.3f})",
                )
            )
        return facts

    def prompt_list(self) -> list[str]:
        prompts = self.prompts.get("prompts")
        if isinstance(prompts, list):
            return [str(p) for p in prompts]
        return list(self.config.get("evaluate", {}).get("prompts", []))


def _charts(run: RunView) -> list[str]:
    data, keys = run.data, run.keys
    val_keys = [k for k in keys if k.startswith("val_loss")]
    marked = {_label(k) for k in keys if k.startswith(EVALUATED)}
    losses = {"loss": run.loss_label()}
    losses.update({k: _label(k) for k in ("val_loss", "val_loss_ema", "train_loss")})

    def pick(names: dict[str, str]) -> dict[str, list[tuple[int, float]]]:
        return {label: data[k] for k, label in names.items() if k in data}

    stages = [
        (int(e["step"]), str(e.get("message", "")))
        for e in run.events
        if e.get("event") == "curriculum" and isinstance(e.get("step"), int)
    ]
    charts = [
        svg_chart(
            "training and validation loss", pick(losses), log_y=True, marked=marked, stages=stages
        ),
        svg_chart(
            "validation loss by noise level",
            pick({k: _label(k) for k in val_keys if k.endswith(("_low", "_mid", "_high"))}),
            log_y=True,
            marked=marked,
            stages=stages,
        ),
        svg_chart(
            "learning rate", pick({k: _label(k) for k in ("lr", "lr_effective")}), stages=stages
        ),
        svg_chart("gradient norm", pick({"grad_norm": _label("grad_norm")}), log_y=True),
        svg_chart("images per second", pick({"images_per_s": _label("images_per_s")})),
    ]
    known = {
        "loss",
        "lr",
        "lr_effective",
        "grad_norm",
        "images_per_s",
        "epoch",
        "skipped_steps",
        "train_loss",
    }
    charts += [
        svg_chart(_label(k), {_label(k): data[k]}, marked=marked)
        for k in keys
        if k not in known and k not in val_keys and data[k]
    ]
    return [c for c in charts if c]


def _prompts_html(prompts: list[str], per_prompt: int | None) -> str:
    if not prompts:
        return ""
    each = f", {per_prompt} images per row" if per_prompt else ""
    items = "".join(
        f"<li>{html.escape(p) if p else '<i>(the empty prompt)</i>'}</li>" for p in prompts
    )
    return f'<p>Rows, top to bottom{each}:</p><ol class="prompts">{items}</ol>'


def _buckets_html(run_dir: Path) -> list[str]:
    """The aspect-ratio bucket table of data_report.json (data.buckets), if the run has one."""
    try:
        table = json.loads((run_dir / "data_report.json").read_text()).get("buckets")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(table, dict) or not table.get("buckets"):
        return []
    rows = "".join(
        f"<tr><td>{b['width']}x{b['height']}</td><td>{b['images']}</td><td>{b['upscaled']}</td>"
        "<td>"
        + html.escape(
            ", ".join(f"{j['images']} from {j['width']}x{j['height']}" for j in b["joined_from"])
        )
        + "</td></tr>"
        for b in table["buckets"]
    )
    return [
        "<h2>Aspect-ratio buckets</h2>",
        f"<p>Sides multiples of {table.get('step')} px, about {table.get('area')} px each; "
        f"every global batch of {table.get('global_batch')} holds one size. "
        f"{html.escape(str(table.get('policy', '')))}.</p>",
        "<table><tr><th>size</th><th>images</th><th>upscaled</th><th>joined (too few for a "
        f"batch)</th></tr>{rows}</table>",
    ]


def build_report(run_dir: Path) -> str:
    """The HTML text of the report of `run_dir`."""
    run = RunView(run_dir)
    body = [_table(run.facts())]
    body.append('<h2>Curves</h2><div class="charts">' + "".join(_charts(run)) + "</div>")
    grids = _grid_files(run_dir)
    if grids:
        settings = run.prompts
        seed = settings.get("seed")
        title = "Samples over time (the same prompts and seed" + (
            f" {seed})" if seed is not None else ")"
        )
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(_prompts_html(run.prompt_list(), settings.get("num_per_prompt")))
        body.append('<div class="grids">')
        for step in _spread(list(grids), MAX_GRIDS):
            body.append(
                f'<figure><img class="grid" alt="samples at step {step}" '
                f'src="data:image/png;base64,{_png(grids[step])}">'
                f"<figcaption>{_step_caption(step)}</figcaption></figure>"
            )
        body.append("</div>")
    body.append("<h2>Events</h2>")
    if run.events:
        body.append("<table><tr><th>step</th><th>event</th><th>message</th></tr>")
        body += [
            f"<tr><td>{e.get('step')}</td><td>{html.escape(str(e.get('event')))}</td>"
            f"<td>{html.escape(str(e.get('message')))}</td></tr>"
            for e in run.events
        ]
        body.append("</table>")
    else:
        body.append("<p>None: no skipped steps, rollbacks, warnings, stops or early stop.</p>")
    body += _buckets_html(run_dir)
    prompts = run.prompt_list()
    if prompts:
        body.append("<h2>Prompts used for the sample grids</h2>")
        body.append(_prompts_html(prompts, run.prompts.get("num_per_prompt")))
    body.append(f"<h2>Config</h2><pre>{html.escape(run.config_text)}</pre>")
    payload = {"series": run.data, "events": run.events, "summary": run.summary}
    return _page(f"sdtune run report: {run_dir.name}", body, payload)


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _names(run_dirs: list[Path]) -> list[str]:
    """Short distinct names for the runs: the folder name, with its parent where two clash."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    return names


def build_comparison(run_dirs: list[Path]) -> str:
    """Several runs on one page: a chart per metric with a line per run, the sample grids of
    the steps every run has side by side, the config keys that differ, the final numbers."""
    runs = [RunView(d) for d in run_dirs]
    names = _names(run_dirs)
    body = [_table([(n, str(r.dir)) for n, r in zip(names, runs)])]
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    body.append("<h2>Config keys that differ</h2>")
    if differ:
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body.append(f"<table><tr><th>key</th>{head}</tr>")
        for key in differ:
            cells = "".join(
                f"<td>{html.escape(json.dumps(f[key], default=str)) if key in f else '(unset)'}</td>"
                for f in flat
            )
            body.append(f"<tr><th>{html.escape(key)}</th>{cells}</tr>")
        body.append("</table>")
    else:
        body.append("<p>None: the runs have the same config.</p>")
    body.append("<h2>Final numbers</h2>")
    facts = [dict(r.facts()[1:]) for r in runs]
    rows = [k for k in dict.fromkeys(k for f in facts for k in f)]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body.append(f"<table><tr><th></th>{head}</tr>")
    for key in rows:
        cells = "".join(f"<td>{html.escape(f.get(key, '–'))}</td>" for f in facts)
        body.append(f"<tr><th>{html.escape(key)}</th>{cells}</tr>")
    body.append("</table>")
    metrics = [
        k
        for k in dict.fromkeys(k for r in runs for k in r.keys)
        if k not in ("epoch", "skipped_steps")
    ]
    charts = []
    for key in metrics:
        series = {n: r.data.get(key, []) for n, r in zip(names, runs)}
        log = key.endswith(("loss", "_low", "_mid", "_high", "_ema")) or key == "grad_norm"
        title = runs[0].loss_label() if key == "loss" else _label(key)
        evaluated = set(names) if key.startswith(EVALUATED) else set()
        charts.append(svg_chart(title, series, log_y=log, marked=evaluated))
    body.append('<h2>Curves</h2><div class="charts">' + "".join(c for c in charts if c) + "</div>")
    grids = [_grid_files(r.dir) for r in runs]
    common = sorted(set.intersection(*(set(g) for g in grids))) if grids else []
    if common:
        body.append("<h2>Samples at the steps every run has</h2>")
        prompt_lists = [r.prompt_list() for r in runs]
        if all(p == prompt_lists[0] for p in prompt_lists):
            body.append(_prompts_html(prompt_lists[0], runs[0].prompts.get("num_per_prompt")))
        else:
            body.append("<p>The runs' grids show different prompts (see each run's report).</p>")
        body.append(f"<table><tr><th>step</th>{head}</tr>")
        for step in _spread(common, 6):
            cells = "".join(
                f'<td><img class="grid" alt="{html.escape(n)} at step {step}" '
                f'src="data:image/png;base64,{_png(g[step])}"></td>'
                for n, g in zip(names, grids)
            )
            body.append(f"<tr><th>{_step_caption(step)}</th>{cells}</tr>")
        body.append("</table>")
    elif any(grids):
        body.append("<h2>Samples</h2><p>The runs have no sample grid at a common step.</p>")
    payload = {n: {"series": r.data, "summary": r.summary} for n, r in zip(names, runs)}
    return _page(f"sdtune comparison: {', '.join(names)}", body, payload)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (atomically) to `out` or RUN_DIR/report.html."""
    target = out or run_dir / "report.html"
    page = build_report(run_dir)
    with atomic_output(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    """Write the comparison page of `run_dirs` (atomically) to `out`."""
    page = build_comparison(run_dirs)
    with atomic_output(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
