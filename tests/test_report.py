import json
import os
import re
import shutil
import subprocess

import pytest

from sdtune.cli import main
from sdtune.monitor.report import svg_chart


def test_svg_chart_carries_the_numbers():
    svg = svg_chart("loss", {"loss": [(1, 0.5), (2, 0.25)], "empty": []}, log_y=True)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'data-values="1:0.5 2:0.25"' in svg
    assert "loss: 0.25" in svg and "(log scale)" in svg
    assert svg_chart("nothing", {"a": []}) == ""


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
