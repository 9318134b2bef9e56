"""Ensembles on tiny presets, in process: the mean prediction, weight averages, LoRA sums and
their SVD into one LoRA, the greedy soup, and the one-line refusals."""

import copy

import pytest
import torch

from sdtune.config import LoraConfig
from sdtune.ensemble.merge import effective_state, merge
from sdtune.ensemble.predict import Ensemble, check_compatible, normalised
from sdtune.errors import UserError
from sdtune.evaluate.sampling import generate
from sdtune.models import save_bundle
from sdtune.models.lora import add_lora
from sdtune.models.presets import build_preset


def _prediction(model, seed=0):
    """The ensemble's (or model's) output on fixed latents, timesteps and a prompt."""
    ens = model if isinstance(model, Ensemble) else Ensemble([model], [1.0])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    conds = ens.condition(ens.conditioning(["a red square", "a blue one"], "cpu"), {})
    with torch.no_grad():
        return ens.predict(x, torch.tensor([10, 500]), conds)


def _lora(base, seed: int, rank: int = 4):
    """`base` with a LoRA (denoiser and text encoder) of random, non-zero weights."""
    bundle = copy.deepcopy(base)
    add_lora(bundle, LoraConfig(enabled=True, rank=rank, alpha=float(rank), text_encoder=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, p in bundle.text_encoder.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for m in bundle.components().values():
        m.eval()
    return bundle


def test_mean_prediction_is_the_weighted_mean_of_the_members():
    a, b = build_preset("tiny-sd", 1), build_preset("tiny-sd", 1)
    b.modules["unet"] = build_preset("tiny-sd", 2).unet
    pa, pb = _prediction(a), _prediction(b)
    assert (pa - pb).abs().max() > 1e-3
    mixed = _prediction(Ensemble([a, b], [0.25, 0.75]))
    torch.testing.assert_close(mixed, 0.25 * pa + 0.75 * pb, atol=1e-6, rtol=1e-5)
    assert torch.equal(_prediction(Ensemble([a], [1.0])), pa)  # one member: untouched


def test_an_ensemble_of_one_model_samples_and_validates_as_the_model(tiny_image_folder):
    from sdtune.config import DataConfig
    from sdtune.data import build_datasets
    from sdtune.evaluate.validation import validation_loss

    a = build_preset("tiny-sd", 1)
    alone = generate(a, ["a red square"], seed=3, steps=2, resolution=32)
    twice = generate(Ensemble([a, a], [0.5, 0.5]), ["a red square"], seed=3, steps=2, resolution=32)
    torch.testing.assert_close(alone, twice, atol=1e-5, rtol=1e-4)
    data = build_datasets(
        DataConfig(path=tiny_image_folder, resolution=32, val_fraction=0.5), 3, 0, lambda *_: None
    )
    assert validation_loss(Ensemble([a], [1.0]), data.val, 2, 2, "cpu") == validation_loss(
        a, data.val, 2, 2, "cpu"
    )


def test_members_must_share_family_and_vae():
    a, b = build_preset("tiny-sd", 1), build_preset("tiny-sd", 2)
    with pytest.raises(UserError, match="B: its VAE differs from A's"):
        check_compatible([a, b], ["A", "B"])
    with pytest.raises(UserError, match="one family"):
        check_compatible([a, build_preset("tiny-sdxl", 1)], ["A", "B"])
    with pytest.raises(UserError, match="2 weight"):
        normalised([1.0, 2.0], 3)
    with pytest.raises(UserError, match="not all 0"):
        normalised([0.0, 0.0], 2)
    assert normalised([1.0, 3.0], 2) == [0.25, 0.75]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two full models of one architecture and two LoRAs on one base, as model folders."""
    root = tmp_path_factory.mktemp("members")
    base = build_preset("tiny-sd", 1)
    save_bundle(base, root / "base")
    full = {}
    for seed in (1, 2):
        bundle = build_preset("tiny-sd", seed)
        full[seed] = bundle
        save_bundle(bundle, root / f"full{seed}")
    from sdtune.checkpoint.adapters import write_adapter_folder

    loras = {}
    for seed in (1, 2):
        bundle = _lora(base, seed)
        loras[seed] = bundle
        write_adapter_folder(
            bundle, root / f"lora{seed}", str(root / "base"), None, 0, None, {"steps": 1}
        )
    return root, base, full, loras


def _load(path):
    from sdtune.ensemble.members import load_member

    return load_member(str(path), lambda *_: None).bundle


def test_uniform_and_weighted_averages(members, tmp_path):
    root, _, full, _ = members
    result = merge([str(root / "full1"), str(root / "full2")], tmp_path / "u", say=print)
    assert result.mode == "average" and result.weights == [0.5, 0.5]
    merged = _load(tmp_path / "u")
    a, b, m = (dict(x.unet.named_parameters()) for x in (full[1], full[2], merged))
    name = "conv_in.weight"
    torch.testing.assert_close(m[name], (a[name] + b[name]) / 2)
    result = merge(
        [str(root / "full1"), str(root / "full2")],
        tmp_path / "w.safetensors",
        weights=[3.0, 1.0],
        say=print,
    )
    assert result.weights == [0.75, 0.25]
    from safetensors.torch import load_file

    single = load_file(str(tmp_path / "w.safetensors"))
    key = "model.diffusion_model.input_blocks.0.0.weight"  # conv_in under the SD names
    torch.testing.assert_close(single[key], 0.75 * a[name] + 0.25 * b[name])
    # self-describing, as an export is: it loads with no config source named
    again = dict(_load(tmp_path / "w.safetensors").unet.named_parameters())
    torch.testing.assert_close(again[name], 0.75 * a[name] + 0.25 * b[name])


def test_lora_sum_into_the_base_and_into_one_lora(members, tmp_path):
    root, base, _, loras = members
    specs = [str(root / "lora1"), str(root / "lora2")]
    result = merge(specs, tmp_path / "sum", weights=[1.0, 0.5], say=print)
    assert result.mode == "lora-sum" and result.weights == [1.0, 0.5]
    want_state = {}
    b0 = effective_state(base)
    d1, d2 = effective_state(loras[1]), effective_state(loras[2])
    for k, v in b0.items():
        want_state[k] = v + 1.0 * (d1[k] - v) + 0.5 * (d2[k] - v) if v.is_floating_point() else v
    got = effective_state(_load(tmp_path / "sum"))
    for k in want_state:
        torch.testing.assert_close(got[k], want_state[k], atol=1e-6, rtol=1e-5, msg=k)
    want = _prediction(_load(tmp_path / "sum"))
    # rank 8 = 4 + 4 holds the sum exactly: the one LoRA predicts as the merged model does
    merge(specs, tmp_path / "r8", weights=[1.0, 0.5], lora_rank=8, say=print)
    r8 = _load(tmp_path / "r8")
    assert (tmp_path / "r8" / "lora_kohya.safetensors").is_file()
    torch.testing.assert_close(_prediction(r8), want, atol=1e-5, rtol=1e-4)
    # rank 2 is the truncated SVD: it keeps less, and what it keeps is the SVD's share
    low = merge(specs, tmp_path / "r2", weights=[1.0, 0.5], lora_rank=2, say=print)
    kept = low.record["kept_norm_fraction"]
    assert 0.3 < kept < 0.999
    assert (_prediction(_load(tmp_path / "r2")) - want).abs().max() > 1e-5


def test_greedy_soup_leaves_out_a_member_that_hurts(members, tmp_path, tiny_image_folder):
    root, _, _, _ = members
    config = tmp_path / "cfg.toml"
    config.write_text(
        f'[data]\npath = "{tiny_image_folder}"\nresolution = 32\nval_fraction = 0.5\n'
        "[train]\nbatch_size = 2\n[evaluate]\nval_batches = 2\n"
    )
    specs = [str(root / "full1"), str(root / "full2"), str(root / "lora1")]
    result = merge(specs, tmp_path / "g", soup="greedy", config=config, say=print)
    losses = result.record["member_val_loss"]
    best = min(range(3), key=lambda i: losses[i])
    assert result.record["chosen"][0] == specs[best]
    assert result.record["val_loss"] <= losses[best]
    assert sum(result.weights) == pytest.approx(1.0)
    merged = _load(tmp_path / "g")
    from sdtune.ensemble.merge import _validator

    assert _validator(config, merged, print)(merged) == pytest.approx(result.record["val_loss"])


def test_merge_refusals(members, tmp_path):
    root, _, _, _ = members
    full = [str(root / "full1"), str(root / "full2")]
    with pytest.raises(UserError, match="at least two"):
        merge(full[:1], tmp_path / "x")
    with pytest.raises(UserError, match="named twice"):
        merge([full[0], full[0]], tmp_path / "x")
    with pytest.raises(UserError, match="full1 and .*full1/ named twice"):
        merge([full[0], full[0] + "/"], tmp_path / "x")  # one folder, spelt two ways
    with pytest.raises(UserError, match="1 weight"):
        merge(full, tmp_path / "x", weights=[1.0])
    with pytest.raises(UserError, match="not all LoRAs on one base"):
        merge(full, tmp_path / "x", lora_rank=4, say=lambda *_: None)
    with pytest.raises(UserError, match="name a folder"):
        merge(full, tmp_path / "x.safetensors", lora_rank=4)
    with pytest.raises(UserError, match="out of range"):
        merge(full, tmp_path / "x", weights=[1e300, 1e300])
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\n")
    with pytest.raises(UserError, match="broken.toml"):
        merge(full, tmp_path / "x", soup="greedy", config=broken, say=lambda *_: None)
    with pytest.raises(UserError, match="pass --config"):
        merge(full, tmp_path / "x", soup="greedy", say=lambda *_: None)
    with pytest.raises(UserError, match="no such run"):
        merge([full[0], str(tmp_path / "missing")], tmp_path / "x", say=lambda *_: None)
    save_bundle(build_preset("tiny-sdxl", 1), tmp_path / "xl")
    with pytest.raises(UserError, match="one family"):
        merge([full[0], str(tmp_path / "xl")], tmp_path / "x", say=lambda *_: None)
    assert not (tmp_path / "x").exists()  # nothing half-written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a merge"):
        merge(full, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="is not a merge"):  # a model folder, an input even
        merge(full, root / "full2", overwrite=True)
    assert (root / "full2" / "sdtune_model.json").is_file()
    with pytest.raises(UserError, match="at most 1024"):
        merge(full, tmp_path / "x", lora_rank=100000)
    with pytest.raises(UserError, match="a folder or a .safetensors"):
        merge(full, tmp_path / "m.ckpt")


def test_sigterm_during_a_merge_leaves_nothing_half_written(members, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import sdtune.models.bundle as bundle_module
    from sdtune.cli import main

    root = members[0]

    def killed(bundle, folder, *args, **kwargs):
        (folder / "model_index.json").write_text("{}")  # part of it written, then the signal
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bundle_module, "save_bundle", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "m"
    assert main(["merge", str(root / "full1"), str(root / "full2"), "--out", str(out)]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back


def test_sample_names_its_models_and_folders_as_given(members, tmp_path, capsys):
    from sdtune.cli import main

    root = members[0]
    missing = tmp_path / "nothing-here"
    args = ["sample", "--prompt", "a digit", "--out", str(tmp_path / "g.png"), "--steps", "1"]
    assert main([*args[:1], str(missing), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "model.base" not in err  # a positional, not a config key
    (tmp_path / "file").write_text("x")
    folder = ["--images-dir", str(tmp_path / "file")]
    assert main([*args[:1], str(root / "full1"), *args[1:], *folder]) == 2
    assert "--images-dir" in (err := capsys.readouterr().err) and "is a file" in err
