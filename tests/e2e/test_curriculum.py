"""Curriculum stages end to end on the digits: each stage's data, resolution, timesteps and
rate; the easiest-first scores; events and the report's stage lines; a run killed at a stage
boundary (and inside a scored stage) resumes bit for bit."""

import json

import pytest
import torch

from sdtune.config import load_config
from sdtune.errors import ConfigError
from tests.e2e.test_resume import _assert_identical, _final_state, _train

CONFIG = """
seed = 4
[model]
base = "preset:tiny-digits"
[data]
source = "digits"
labels = [0, 1, 2]
resolution = 16
val_fraction = 0.05
[train]
max_steps = 8
batch_size = 8
learning_rate = 0.001
ema = true
log_every = 1
[checkpoint]
every_steps = 1
[evaluate]
sample_steps = 2
num_per_prompt = 1
val_batches = 1
[[curriculum.stages]]
until_step = 3
resolution = 8
labels = [0, 1]
timesteps = [0.5, 1.0]
lr_scale = 0.5
[[curriculum.stages]]
until_step = 6
easiest = 0.25
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    config = root / "cfg.toml"
    config.write_text(CONFIG)
    run = _train(config, root / "a")
    assert run.returncode == 0, run.stderr
    return root, config, run.stdout


def test_stages_change_at_their_steps_and_are_logged_and_drawn(straight):
    root, _, stdout = straight
    run = root / "a"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    changes = [(e["step"], e["message"]) for e in events if e["event"] == "curriculum"]
    assert [s for s, _ in changes] == [0, 3, 6]
    assert "8 px" in changes[0][1] and "labels 0, 1" in changes[0][1] and "lr x0.5" in changes[0][1]
    assert "the easiest 25%" in changes[1][1] and "after the last stage" in changes[2][1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lr[2] == pytest.approx(0.0005) and lr[5] == pytest.approx(0.001)  # stage 1 at x0.5
    scores = json.loads((run / "curriculum" / "stage-2-scores.json").read_text())
    assert scores["step"] == 3 and scores["kept"] == round(0.25 * scores["of"])
    assert len(scores["scores"]) == scores["of"] > 400  # every training digit scored
    report = (run / "report.html").read_text()
    assert 'class="stage"' in report and "stage 2 of 2" in report


@pytest.mark.parametrize("crash", ["step:3", pytest.param("step:4", marks=pytest.mark.slow)])
def test_killed_at_a_stage_boundary_or_inside_a_scored_stage_resumes_exactly(straight, crash):
    root, config, _ = straight
    run = root / f"b-{crash.replace(':', '-')}"
    killed = _train(config, run, crash=crash)
    assert killed.returncode != 0
    resumed = _train(config, run, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(_final_state(root / "a", 8), _final_state(run, 8))
    a = json.loads((root / "a" / "curriculum" / "stage-2-scores.json").read_text())
    b = json.loads((run / "curriculum" / "stage-2-scores.json").read_text())
    assert a == b


def test_stage_views_timesteps_and_refusals(tmp_path):
    from sdtune.data import build_datasets
    from sdtune.diffusion.objective import DDPM
    from sdtune.models.presets import build_preset
    from sdtune.train.curriculum import Curriculum

    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    data = build_datasets(cfg.data, 1, cfg.seed, lambda *_: None)
    curriculum = Curriculum(cfg, data, build_preset("tiny-digits", 0))
    assert [curriculum.stage_of(s) for s in (0, 2, 3, 5, 6, 7)] == [0, 0, 1, 1, 2, 2]
    first = curriculum.view(0, None)
    assert {r.label for r in first.records} == {0, 1} and first.spec.resolution == 8
    assert curriculum.view(2, None) is data.train
    ddpm = DDPM(torch.linspace(0.99, 0.01, 1000), "epsilon")
    ddpm.timestep_range = curriculum.timestep_range(0)
    t = ddpm.draw(torch.zeros(256, 1, 4, 4), torch.Generator().manual_seed(0)).timesteps
    assert t.min() >= 500 and t.max() < 1000
    stage = "[[curriculum.stages]]\nuntil_step = {}\n"
    for text, message in [
        (stage.format(5) + stage.format(5), "must increase"),
        (stage.format(2000), "past train.max_steps"),
        (stage.format(5) + "timesteps = [0.8, 0.2]\n", "low < high"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text(stage.format(5) + "caption_contains = 'zebra'\n")
    with pytest.raises(ConfigError, match="no training example matches"):
        Curriculum(load_config(path), data, build_preset("tiny-digits", 0))
