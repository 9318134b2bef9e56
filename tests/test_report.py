import json
import os
import re
import shutil
import subprocess

import pytest

from sdtune.cli import main
from sdtune.monitor.report import log_ticks, nice_ticks, svg_chart


def test_svg_chart_carries_the_numbers():
    svg = svg_chart("loss", {"loss": [(1, 0.5), (2, 0.25)], "empty": []}, log_y=True)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'data-values="1:0.5 2:0.25"' in svg
    assert "loss: 0.25" in svg and "(log scale)" in svg
    assert svg_chart("nothing", {"a": []}) == ""


def test_charts_read_like_tensorboards():
    """Gridlines at round values (decades on a log axis), a legend under the plot, the value
    of every point on hover, and dots on the evaluation series."""
    assert nice_ticks(0.13, 0.91) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(0, 700, 6) == [0, 200, 400, 600]
    assert log_ticks(0.03, 2.0) == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert log_ticks(1e-6, 1.0) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    steps = [(s, 1.0 / s) for s in range(1, 101)]
    svg = svg_chart("loss", {"train": steps, "val": steps[::50]}, log_y=True, marked={"val"})
    assert svg.count('class="grid"') >= 5 and ">0.1<" in svg and ">1<" in svg
    assert "<title>train at step 37: 0.02703</title>" in svg  # hover
    assert "val: 0.01961 at step 51" in svg  # the legend's last value, under the plot
    legend_y = float(re.search(r'<text x="\d+" y="([\d.]+)" class="legend">train', svg).group(1))
    axis_y = float(
        re.search(r'<line x1="64" y1="([\d.]+)" x2="544" y2="[\d.]+" class="axis"', svg).group(1)
    )
    assert legend_y > axis_y  # below the plot: it covers no curve
    dots = re.findall(r'<circle[^>]*fill="(#[0-9a-f]+|transparent)"', svg)
    assert dots.count("transparent") == 100 and len(dots) == 102  # val's 2 points are drawn


@pytest.fixture(scope="module")
def run_with_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    args = [
        "train",
        "examples/quickstart.toml",
        "--output",
        str(run),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.log_every=1",
        "--set",
        "evaluate.every_steps=3",
        "--set",
        "evaluate.judge=false",
        "--set",
        "evaluate.sample_steps=2",
        "--set",
        "evaluate.num_per_prompt=1",
    ]
    assert main(args) == 0
    return run


def test_report_is_written_during_and_after_training(run_with_report):
    run = run_with_report
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )
    data = json.loads(
        re.search(
            r'<script type="application/json" id="sdtune-data">(.*?)</script>', page, re.S
        ).group(1)
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert data["series"]["loss"] == [[r["step"], r["loss"]] for r in rows if "loss" in r]
    assert [s for s, _ in data["series"]["val_loss"]] == [3, 6]
    losses = " ".join(f"{r['step']}:{r['loss']!r}" for r in rows if "loss" in r)
    assert f'data-values="{losses}"' in page  # the plotted points are the run's numbers
    assert page.count("data:image/png;base64,") == 2  # the grids of steps 3 and 6
    assert "validation loss by noise level" in page and "learning rate" in page
    assert "max_steps = 6" in page
    # what each curve is, raw and EMA weights apart; the grids' prompts; rounded numbers
    assert "training loss (each step)" in page and "validation loss (EMA weights)" in page
    assert "validation loss (raw weights)" in page
    assert "<li>a handwritten digit seven</li>" in page and "Rows, top to bottom, 1 images" in page
    assert "Samples over time (the same prompts and seed 1234)" in page
    final = re.search(r"<th>final validation loss \(EMA weights\)</th><td>([^<]+)</td>", page)
    assert final and len(final.group(1)) <= 7  # 4 significant digits


def test_several_runs_compare_on_one_page(run_with_report, tmp_path, capsys):
    other = tmp_path / "lr-low"
    argv = ["train", "examples/quickstart.toml", "--output", str(other), "--set",
            "train.max_steps=6", "--set", "train.batch_size=8", "--set", "train.log_every=1",
            "--set", "evaluate.every_steps=3", "--set", "evaluate.judge=false", "--set",
            "evaluate.sample_steps=2", "--set", "evaluate.num_per_prompt=1", "--set",
            "train.learning_rate=1e-4"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "compare.html"
    capsys.readouterr()
    assert main(["report", str(run_with_report), str(other), "--out", str(out)]) == 0
    assert "comparison of 2 runs written to" in capsys.readouterr().out
    page = out.read_text()
    assert "<th>train.learning_rate</th><td>0.001</td><td>0.0001</td>" in page
    assert "<th>train.max_steps</th>" not in page  # the same in both: not a difference
    assert page.count('data-series="run"') >= 3 and page.count('data-series="lr-low"') >= 3
    assert page.count("<th>step 3</th>") == 1 and page.count("<th>step 6</th>") == 1
    assert page.count("data:image/png;base64,") == 4  # two steps, two runs
    assert "<th>final validation loss (EMA weights)</th>" in page
    assert main(["report", str(run_with_report), str(other)]) == 2  # where to write it?
    assert "--out FILE names the comparison page" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"),  # CI installs it (Makefile)
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
def test_report_renders_in_headless_chromium_without_console_errors(run_with_report, tmp_path):
    page = run_with_report / "report.html"
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={tmp_path / 'shot.png'}",
            "--window-size=1200,2000",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count("<svg") >= 4 and dom.count("<polyline") >= 5
