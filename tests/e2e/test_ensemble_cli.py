"""Ensembles through the real CLI on tiny presets: `sdtune train --ensemble N` killed midway and
resumed (bit for bit), its soup and evaluation; `sdtune merge`; `sdtune sample` and `sdtune
eval` with several --model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from tests.e2e.test_resume import _train

CONFIG = """
seed = 5
[model]
base = "{base}"
[data]
path = "{images}"
val_fraction = 0.34
resolution = 32
[train]
max_steps = 4
batch_size = 2
learning_rate = 0.01
[checkpoint]
every_steps = 2
[evaluate]
sample_steps = 2
num_per_prompt = 1
val_batches = 1
metrics_images = 10
"""


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tiny_image_folder_module):
    root = tmp_path_factory.mktemp("ensemble")
    config = root / "cfg.toml"
    from sdtune.models import save_bundle
    from sdtune.models.presets import build_preset

    save_bundle(build_preset("tiny-sd", 3), root / "base")  # members fine-tune one base
    config.write_text(CONFIG.format(images=tiny_image_folder_module, base=root / "base"))
    out = root / "ens"
    killed = _train(config, out, "--ensemble", "2", crash="step:3")
    assert killed.returncode != 0  # member-1 killed after step 3 (its checkpoint: step 2)
    assert (out / "member-1" / "checkpoints" / "step-0000002").is_dir()
    assert not (out / "member-2").exists()
    again = _train(config, out, "--ensemble", "2")
    assert again.returncode != 0 and "--resume to continue it" in again.stderr
    resumed = _train(config, out, "--ensemble", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return root, config, out, resumed.stdout


def test_ensemble_members_differ_only_in_seed_and_resume_exactly(ensemble):
    root, config, out, stdout = ensemble
    assert "resumed from" in stdout and "member-2 of 2 (seed 6)" in stdout
    # member 1 is the plain run of seed 5 on the config's split, killed or not
    alone = root / "alone"
    run = _train(config, alone, "--set", "data.split_seed=5")
    assert run.returncode == 0, run.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(alone / "checkpoints" / "step-0000004" / name))
        b = load_file(str(out / "member-1" / "checkpoints" / "step-0000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seeds = [
        json.loads((out / m / "run_summary.json").read_text()) for m in ("member-1", "member-2")
    ]
    assert all(s["steps"] == 4 for s in seeds)
    m2 = load_file(str(out / "member-2" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert any(not torch.equal(m2[k], b[k]) for k in m2)  # another seed: another model


def test_ensemble_writes_its_soup_and_evaluation(ensemble):
    _, _, out, stdout = ensemble
    result = json.loads((out / "ensemble.json").read_text())
    assert set(result["results"]) == {"member-1", "member-2", "soup", "ensemble"}
    assert result["seeds"] == [5, 6] and result["split_seed"] == 5
    for row in result["results"].values():
        assert row["val_loss"] > 0 and "diversity" in row
    assert (out / "soup" / "sdtune_model.json").is_file()
    info = json.loads((out / "soup" / "sdtune_model.json").read_text())
    assert info["merge"]["mode"] == "average" and info["merge"]["weights"] == [0.5, 0.5]
    # a finished ensemble is kept on a later --resume: nothing is trained or evaluated again
    root = out.parent
    again = _train(root / "cfg.toml", out, "--ensemble", "2", "--resume")
    assert again.returncode == 0
    assert "every member has finished" in again.stdout and "up to date; kept" in again.stdout
    mismatch = _train(root / "cfg.toml", out, "--ensemble", "3", "--resume")
    assert mismatch.returncode != 0 and "an ensemble of 2 members, not 3" in mismatch.stderr
    preset = _train(
        root / "cfg.toml", root / "p", "--ensemble", "2", "--set", "model.base=preset:tiny-sd"
    )
    assert preset.returncode == 2 and "draws its frozen VAE from the seed" in preset.stderr


def test_merge_sample_and_eval_several_models(ensemble, tmp_path, capsys):
    _, _, out, _ = ensemble
    a, b = str(out / "member-1"), str(out / "member-2")
    assert main(["merge", a, b, "--out", str(tmp_path / "m"), "--weights", "3", "1"]) == 0
    info = json.loads((tmp_path / "m" / "sdtune_model.json").read_text())
    assert info["merge"]["weights"] == [0.75, 0.25]
    grid = tmp_path / "ens.png"
    args = ["sample", "--model", a, "--model", b, "--prompt", "a photo", "--num", "1"]
    assert main([*args, "--steps", "2", "--weights", "1", "1", "--out", str(grid)]) == 0
    assert grid.is_file() and "the mean prediction of" in capsys.readouterr().out
    assert main(["eval", a, "--model", b, "--num-images", "10"]) == 0
    evaluated = out / "member-1" / "checkpoints" / "eval-ensemble-step-0000004.json"
    record = json.loads(evaluated.read_text())
    assert record["ensemble"]["weights"] == [0.5, 0.5] and record["val_loss"] > 0
    # the one-line refusals
    assert (
        main(["sample", a, "--weights", "1", "--prompt", "x", "--out", str(tmp_path / "o.png")])
        == 2
    )
    assert "weighs the members of an ensemble" in capsys.readouterr().err
    assert main(["merge", a, "--out", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["merge", a, b, "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
