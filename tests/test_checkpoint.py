import json
import os

import pytest

from sdtune.checkpoint.rotation import best_step, rotate
from sdtune.checkpoint.state import (
    CheckpointError,
    check_resume_config,
    clean_temporaries,
    find_checkpoint,
)
from sdtune.checkpoint.store import verify_checkpoint, write_checkpoint


def _write(root, step, payload=b"x" * 100):
    return write_checkpoint(
        root,
        step,
        {"a.bin": lambda p: p.write_bytes(payload), "b.json": lambda p: p.write_text("{}")},
    )


def test_write_is_complete_and_verifies(tmp_path):
    path = _write(tmp_path, 5)
    assert path.name == "step-0000005"
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 5 and set(manifest["files"]) == {"a.bin", "b.json"}
    assert manifest["files"]["a.bin"]["size"] == 100
    assert (tmp_path / "latest").read_text().strip() == "step-0000005"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "damage",
    [
        "missing",
        "truncated",
        "bitflip",
        "manifest",
        "manifest-edit",
        "manifest-garbage",
        "manifest-shape",
    ],
)
def test_every_corruption_is_detected_and_named(tmp_path, damage):
    path = _write(tmp_path, 1)
    target = path / "a.bin"
    if damage == "missing":
        target.unlink()
        expected = "a.bin: missing"
    elif damage == "truncated":
        target.write_bytes(b"x" * 99)
        expected = "a.bin: size 99 != 100"
    elif damage == "bitflip":
        data = bytearray(target.read_bytes())
        data[50] ^= 0x01
        target.write_bytes(bytes(data))
        expected = "a.bin: sha256 does not match"
    elif damage == "manifest":
        (path / "manifest.json").unlink()
        expected = "no manifest.json"
    elif damage == "manifest-edit":
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["a.bin"]["sha256"] = "0" * 64
        (path / "manifest.json").write_text(json.dumps(manifest))
        expected = "a.bin: sha256 does not match"
    elif damage == "manifest-garbage":
        (path / "manifest.json").write_bytes(b"\xff\x00{")
        expected = "unreadable manifest"
    else:
        (path / "manifest.json").write_text('{"files": [1, 2]}')
        expected = "malformed manifest"
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(path)


def test_fast_verify_checks_sizes_only(tmp_path):
    path = _write(tmp_path, 1)
    data = bytearray((path / "a.bin").read_bytes())
    data[0] ^= 0x01
    (path / "a.bin").write_bytes(bytes(data))
    verify_checkpoint(path, fast=True)
    with pytest.raises(CheckpointError):
        verify_checkpoint(path)


def test_latest_falls_back_to_newest_good(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    bad = _write(tmp_path, 3)
    (bad / "a.bin").write_bytes(b"short")
    said = []
    found = find_checkpoint(tmp_path, said.append)
    assert found.name == "step-0000002"
    assert any("refusing step-0000003" in s for s in said)
    assert any("falling back to step-0000002" in s for s in said)


def test_temporaries_are_cleaned_with_a_message(tmp_path):
    _write(tmp_path, 1)
    (tmp_path / ".tmp-step-0000002-99").mkdir()
    said = []
    clean_temporaries(tmp_path, said.append)
    assert not (tmp_path / ".tmp-step-0000002-99").exists()
    assert said == ["checkpoint: removed .tmp-step-0000002-99, left by an interrupted save"]


def test_rotation_keeps_last_every_and_best(tmp_path):
    for step in range(1, 11):
        _write(tmp_path, step)
    evaluations = [{"step": s, "val_loss": abs(s - 3) + 0.5} for s in range(1, 11)]
    removed = rotate(
        tmp_path,
        keep_last=2,
        keep_every=5,
        keep_best="val_loss",
        mode="min",
        evaluations=evaluations,
    )
    kept = sorted(p.name for p in tmp_path.glob("step-*"))
    assert kept == ["step-0000003", "step-0000005", "step-0000009", "step-0000010"]
    assert len(removed) == 6
    assert rotate(tmp_path, None, 0, None, "min", []) == []  # keep_last unset keeps all


def test_best_step_modes():
    rows = [{"step": 1, "acc": 0.5}, {"step": 2, "acc": 0.9}, {"step": 3, "acc": float("nan")}]
    assert best_step(rows, "acc", "max", {1, 2, 3}) == 2
    assert best_step(rows, "acc", "min", {1, 2, 3}) == 1
    assert best_step(rows, "acc", "max", {1}) == 1


def test_resume_config_changes(tmp_path):
    saved = "seed = 1\n[train]\nmax_steps = 10\nlearning_rate = 0.001\n"
    assert check_resume_config(
        saved, {"seed": 1, "train": {"max_steps": 20, "learning_rate": 0.001}}, tmp_path
    ) == ["train.max_steps"]
    with pytest.raises(CheckpointError, match="differs from the one .* in train.learning_rate"):
        check_resume_config(
            saved, {"seed": 1, "train": {"max_steps": 10, "learning_rate": 0.01}}, tmp_path
        )


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default(tmp_path):
    """An older sdtune wrote no curriculum section: the default now is no change; a stage is."""
    from sdtune.config import load_config, to_dict, to_toml

    cfg = load_config(None, ["train.max_steps=10"])
    saved = to_toml(cfg).replace("[curriculum]\nstages = []\n", "")
    assert "curriculum" not in saved or "stages" not in saved
    assert check_resume_config(saved, to_dict(cfg), tmp_path) == []
    staged = to_dict(load_config(None, ["train.max_steps=10", "data.split_seed=3"]))
    with pytest.raises(CheckpointError, match="data.split_seed"):
        check_resume_config(saved, staged, tmp_path)


def test_write_fsyncs_and_replaces_latest_atomically(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    _write(tmp_path, 1)
    assert len(calls) >= 5  # each file, manifest, the directory, the parent, latest
    assert (
        json.loads((tmp_path / "step-0000001" / "manifest.json").read_text())["format_version"] == 1
    )


def test_truncate_metrics_on_resume(tmp_path):
    from sdtune.train.parts import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.9},
        {"step": 2, "val_loss": 0.8},
        {"step": 3, "loss": 0.7},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'
    path.write_text(text)
    truncate_metrics(path, 2, evaluated_at_step=True)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    truncate_metrics(path, 2, evaluated_at_step=False)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:2]


def test_inspect_reads_what_sdtune_exports(tmp_path, capsys):
    """`sdtune inspect` names an export's kind from its header alone: single file (both
    containers), diffusers folder, diffusers and kohya LoRA (rank, targets, metadata)."""
    from sdtune.checkpoint.export import export_model
    from sdtune.cli import main
    from sdtune.config import LoraConfig
    from sdtune.models.lora import add_lora
    from sdtune.models.presets import build_preset

    bundle, meta = build_preset("tiny-sd", 0), {"base_model": "preset:tiny-sd"}
    for fmt, name in (("single-file", "m.safetensors"), ("ckpt", "m.ckpt"), ("diffusers", "d")):
        export_model(bundle, meta, fmt, tmp_path / name)
    add_lora(bundle, LoraConfig(enabled=True, rank=4, text_encoder=True))
    for fmt in ("lora", "kohya"):
        export_model(bundle, meta, fmt, tmp_path / f"{fmt}.safetensors")
    said = {}
    for name in ("m.safetensors", "m.ckpt", "d", "lora.safetensors", "kohya.safetensors"):
        capsys.readouterr()
        assert main(["inspect", str(tmp_path / name)]) == 0
        said[name] = capsys.readouterr().out
    for name in ("m.safetensors", "m.ckpt"):
        assert "single-file checkpoint, 368 tensors" in said[name]
        assert "model.diffusion_model" in said[name] and "preset:tiny-sd" in said[name]
    assert "diffusers model folder (StableDiffusionPipeline)" in said["d"]
    assert "unet                        792,964 values" in said["d"]
    for name, kind in (("lora.safetensors", "diffusers"), ("kohya.safetensors", "kohya")):
        assert f"{kind} LoRA" in said[name]
        assert "rank 4; adapters on 12 text_encoder modules, 48 unet modules" in said[name]
        assert "to_out.0, to_q, to_v, v_proj" in said[name]
    assert "metadata ss_network_dim: 4" in said["kohya.safetensors"]
    (tmp_path / "x.bin").write_bytes(b"junk")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    for name in ("x.bin", "bad.safetensors"):
        assert main(["inspect", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
