"""A corpus of bad inputs: each is refused with exit code 2 (a full disk during a checkpoint:
its own code), exactly one stderr line naming the file or key, no traceback, and nothing the
user had on disk changed or gone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main

TINY = """seed = 0
[model]
base = "preset:tiny-digits"
[data]
source = "digits"
resolution = 16
labels = [0, 1]
limit = 8
val_fraction = 0.2
[train]
max_steps = 2
batch_size = 4
log_every = 1
[evaluate]
sample_steps = 2
num_per_prompt = 1
prompts = ["a handwritten digit one"]
"""


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under `roots` (the user's files a case must not touch)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return out


def refused(capsys, argv, *names: str, protect=(), code: int = 2) -> str:
    """Run the CLI in-process on `argv`; check the refusal and return its one stderr line."""
    before = snapshot(*protect)
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("sdtune: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    assert snapshot(*protect) == before, "a user's file changed"
    return lines[0]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_cfg) -> Path:
    """A finished two-step run of the quickstart model (kept read-only: cases copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(tiny_cfg), "--output", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ---------------------------------------------------------------- configs


def test_config_files(capsys, tmp_path):
    refused(capsys, ["train", tmp_path / "missing.toml"], "missing.toml", "does not exist")
    refused(capsys, ["train", tmp_path], str(tmp_path), "directory")
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n\n")
    refused(capsys, ["train", empty], "empty.toml", "empty", protect=[empty])
    latin = tmp_path / "latin.toml"
    latin.write_bytes("seed = 1\n# caf\xe9\n".encode("latin-1"))
    refused(capsys, ["train", latin], "latin.toml:2", "UTF-8", protect=[latin])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    refused(capsys, ["config", "show", broken], "broken.yaml", "not valid YAML")


def test_metric_names_are_checked_at_load(capsys, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    line = refused(
        capsys,
        ["train", tiny_cfg, "--output", run, "--set", "checkpoint.keep_best=val_los"],
        "checkpoint.keep_best",
        "'val_loss'",
    )
    assert "val_loss_ema" in line
    refused(
        capsys,
        ["train", tiny_cfg, "--output", run, "--set", "evaluate.early_stop.metric=judged_acc"],
        "evaluate.early_stop.metric",
    )
    refused(  # measured only with generator metrics on
        capsys,
        ["config", "show", tiny_cfg, "--set", "checkpoint.keep_best=gen_recall"],
        "checkpoint.keep_best",
        "gen_recall",
    )
    assert not run.exists()  # refused before any work


def test_yaml_no_is_the_string_no(capsys, tmp_path):
    assert main(["config", "show", "--set", "train.mixed_precision=no"]) == 0
    assert 'mixed_precision = "no"' in capsys.readouterr().out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  mixed_precision: no\n  ema: true\n")
    assert main(["config", "show", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert 'mixed_precision = "no"' in out and "ema = true" in out
    refused(capsys, ["config", "show", "--set", "train.max_steps"], "train.max_steps", "KEY=VALUE")


# ---------------------------------------------------------------- data


def _folder(tmp_path: Path, n: int = 6) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (20, 20), (30 * i, 200, 90)).save(folder / f"p{i}.png")
    return folder


def _folder_cfg(tmp_path: Path, folder: Path) -> Path:
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        TINY.replace('source = "digits"\n', f'path = "{folder}"\n')
        .replace("labels = [0, 1]\n", "")
        .replace('base = "preset:tiny-digits"', 'base = "preset:tiny-sd"')
        .replace("resolution = 16", "resolution = 32")
    )
    return cfg


@pytest.mark.parametrize(
    "name, content, where",
    [
        (
            "metadata.jsonl",
            '{"file_name": "p0.png", "text": "ok"}\n{"file_name": "p1.png", "text": null}\n',
            "metadata.jsonl:2",
        ),
        (
            "metadata.jsonl",
            '{"file_name": "p0.png", "text": "ok"}\n{"file_name": 3, "text": "x"}\n',
            "metadata.jsonl:2",
        ),
        ("metadata.jsonl", b'{"file_name": "p0.png", "text": "caf\xe9"}\n', "metadata.jsonl:1"),
        ("metadata.csv", b"file_name,text\np0.png,caf\xe9\n", "metadata.csv:2"),
        ("metadata.csv", "file_name,text\np0.png\n", "metadata.csv:2"),
        ("p0.txt", b"caf\xe9 au lait\n", "p0.txt"),
    ],
)
def test_bad_metadata_and_captions(capsys, tmp_path, name, content, where):
    folder = _folder(tmp_path)
    for i in range(6):
        (folder / f"p{i}.txt").write_text(f"photo {i}\n")
    target = folder / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(
        capsys,
        ["train", _folder_cfg(tmp_path, folder), "--output", tmp_path / "run"],
        where,
        protect=[folder],
    )


def test_sixteen_bit_grey_and_transparent_palette_images_train(cli, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    ramp = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    for i in range(3):
        Image.fromarray(ramp).save(folder / f"grey{i}.png")  # mode I;16
        palette = Image.new("P", (40, 40), 1)
        palette.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
        palette.save(folder / f"pal{i}.png", transparency=0)
    for path in folder.glob("*.png"):
        path.with_suffix(".txt").write_text("an odd image\n")
    proc = cli("train", _folder_cfg(tmp_path, folder), "--output", tmp_path / "run")
    assert "Palette" not in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- run directories


def test_resume_never_replaces_a_finished_run(capsys, tiny_cfg, run_copy):
    shutil.rmtree(run_copy / "checkpoints")
    refused(
        capsys,
        ["train", tiny_cfg, "--output", run_copy, "--resume"],
        "--resume",
        str(run_copy),
        "--overwrite",
        protect=[run_copy],
    )


def test_overwrite_never_deletes_a_users_folder(capsys, tiny_cfg, tmp_path):
    folder = tmp_path / "my-photos"
    folder.mkdir()
    (folder / "config.toml").write_text("# my own notes\n")
    Image.new("RGB", (8, 8)).save(folder / "holiday.png")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("buy milk\n")
    for extra in (["--overwrite"], ["--resume"], []):
        refused(
            capsys,
            ["train", tiny_cfg, "--output", folder, *extra],
            str(folder),
            "sdtune did not create",
            protect=[folder],
        )


def test_overwrite_removes_only_what_sdtune_wrote(capsys, tiny_cfg, run_copy):
    mine = run_copy / "my-notes.txt"
    mine.write_text("keep me\n")
    (run_copy / "class_images").mkdir()
    Image.new("RGB", (8, 8)).save(run_copy / "class_images" / "my-dog.png")
    Image.new("RGB", (8, 8)).save(run_copy / "class_images" / "class-00000.png")
    stale = run_copy / "checkpoints" / "step-0000099"
    stale.mkdir()
    assert main(["train", str(tiny_cfg), "--output", str(run_copy), "--overwrite"]) == 0
    assert mine.read_text() == "keep me\n"
    assert (run_copy / "class_images" / "my-dog.png").is_file()
    assert not (run_copy / "class_images" / "class-00000.png").exists()
    assert not stale.exists() and (run_copy / "model").is_dir()


def test_every_bad_file_is_listed_and_reported_before_the_run_stops(capsys, tmp_path):
    folder = _folder(tmp_path)
    for i in range(6):
        (folder / f"p{i}.txt").write_text(f"photo {i}\n")
    (folder / "p1.png").write_bytes(b"not a png")
    (folder / "p2.txt").unlink()
    (folder / "p4.txt").write_bytes(b"caf\xe9\n")
    run = tmp_path / "run"
    capsys.readouterr()
    line = refused(capsys, ["train", _folder_cfg(tmp_path, folder), "--output", run],
                   "3 bad files in total", protect=[folder])  # fmt: skip
    assert str(run / "data_report.json") in line
    report = json.loads((run / "data_report.json").read_text())
    assert report["on_bad_file"] == "error"
    assert sorted(Path(e["file"]).name for e in report["bad_files"]) == [
        "p1.png",
        "p2.png",
        "p4.txt:1",
    ]


def test_a_run_that_failed_before_its_first_step_can_be_run_again(capsys, tmp_path):
    folder = _folder(tmp_path)
    for i in range(6):
        (folder / f"p{i}.txt").write_text(f"photo {i}\n")
    (folder / "p3.txt").write_bytes(b"caf\xe9\n")
    config, run = _folder_cfg(tmp_path, folder), tmp_path / "run"
    refused(capsys, ["train", config, "--output", run], "p3.txt", protect=[folder])
    (folder / "p3.txt").write_text("photo 3\n")  # fixed: the same command now trains
    assert main(["train", str(config), "--output", str(run)]) == 0
    assert "stopped before its first step: starting it again" in capsys.readouterr().out
    assert (run / "model").is_dir()
    refused(capsys, ["train", config, "--output", run], "already holds a training run")


# ---------------------------------------------------------------- exports and sampling


def test_merged_export_of_a_run_without_lora_says_what_it_wrote(capsys, run_copy, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(run_copy), "--format", "merged", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert (
        "as merged (this run has no LoRA: the whole model as trained, a diffusers folder)" in said
    )
    assert (out / "unet").is_dir()


def test_export_never_replaces_a_users_folder(capsys, run_copy, tmp_path):
    folder = tmp_path / "keep"
    folder.mkdir()
    (folder / "a.txt").write_text("mine\n")
    for fmt in ("diffusers", "ckpt"):
        refused(
            capsys,
            ["export", run_copy, "--format", fmt, "--out", folder, "--overwrite"],
            str(folder),
            protect=[folder],
        )


def test_numbers_and_flags(capsys, run_copy, tmp_path):
    out = tmp_path / "g.png"
    for argv, name in [
        (["sample", run_copy, "--prompt", "x", "--num", "0", "--out", out], "--num"),
        (["sample", run_copy, "--prompt", "x", "--steps", "0", "--out", out], "--steps"),
        (["sample", run_copy, "--prompt", "x", "--guidance", "nan", "--out", out], "--guidance"),
        (["eval", run_copy, "--num-images", "0"], "--num-images"),
        (["export", run_copy, "--format", "onnx", "--out", out], "--format"),
        (["export"], "required"),
    ]:
        refused(capsys, argv, name, protect=[run_copy])
    assert not out.exists()
    refused(
        capsys,
        ["sample", run_copy, "--prompt", "x", "--steps", "2", "--num", "1", "--out", tmp_path],
        str(tmp_path),
        "folder",
    )


def test_garbled_model_info_is_named(capsys, run_copy, tmp_path):
    info = run_copy / "model" / "sdtune_model.json"
    info.write_text('{"family": "pixel", ')
    refused(
        capsys,
        ["sample", run_copy / "model", "--prompt", "x", "--out", tmp_path / "g.png"],
        "sdtune_model.json",
        protect=[run_copy],
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_are_readable_by_other_users(run_copy, tmp_path):
    from sdtune.checkpoint.export import export_model
    from sdtune.models.presets import build_preset

    old = os.umask(0o022)
    try:
        assert (
            main(["export", str(run_copy), "--format", "diffusers", "--out", str(tmp_path / "d")])
            == 0
        )
        latent = build_preset("tiny-sd", 0)  # the single-file layouts need a VAE
        for name in ("m.safetensors", "m.ckpt"):
            fmt = "single-file" if name.endswith(".safetensors") else "ckpt"
            export_model(latent, {"base_model": "preset:tiny-sd"}, fmt, tmp_path / name)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file()]
    files += [tmp_path / "m.safetensors", tmp_path / "m.ckpt"]
    assert any(p.suffix == ".safetensors" for p in files)  # what safetensors writes 0600
    assert {_mode(p) for p in files} == {0o644}
    assert {_mode(p) for p in (tmp_path / "d").rglob("*") if p.is_dir()} == {0o755}
    assert not list(tmp_path.glob(".*.tmp"))


def test_temporary_configs_of_a_preset_are_removed(tmp_path):
    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.models import load_model

    before = set(Path(tempfile.gettempdir()).glob("sdtune-preset-*"))
    from sdtune.errors import ModelError

    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ModelError, match="x.safetensors"
    ):  # after the preset's configs were written
        load_model(
            ModelConfig(base=str(bogus), config_source="preset:tiny-sd"), DiffusionConfig(), 0
        )
    assert set(Path(tempfile.gettempdir()).glob("sdtune-preset-*")) == before


# ---------------------------------------------------------------- checkpoints


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_rng_state_is_not_a_pickle_and_old_pickles_run_no_code(
    capsys, tiny_cfg, run_copy, tmp_path, monkeypatch
):
    ckpt = run_copy / "checkpoints" / "step-0000002"
    rng = ckpt / "rng-0.safetensors"
    assert rng.is_file() and not list(ckpt.glob("*.pt")) == [] and not (ckpt / "rng-0.pt").exists()
    # an older checkpoint's pickled RNG state that would run code is refused, not run
    rng.unlink()
    (ckpt / "rng-0.pt").write_bytes(pickle.dumps({"python": _Boom()}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["rng-0.safetensors"]
    data = (ckpt / "rng-0.pt").read_bytes()
    manifest["files"]["rng-0.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    refused(
        capsys,
        ["train", tiny_cfg, "--output", run_copy, "--resume", "--set", "train.max_steps=3"],
        "rng-0.pt",
        "does not load safely",
    )
    assert not (tmp_path / "pwned").exists()


def test_old_numpy_rng_pickles_still_resume(tmp_path):
    from sdtune.checkpoint.state import _load_old_rng_state, rng_state

    state = rng_state()
    torch.save(state, tmp_path / "rng-0.pt")
    loaded = _load_old_rng_state(tmp_path / "rng-0.pt")
    assert loaded["python"] == state["python"]
    assert np.array_equal(loaded["numpy"][1], state["numpy"][1])


def test_rng_state_round_trips_exactly(tmp_path):
    import random

    from sdtune.checkpoint.state import load_rng_state, save_rng_state

    random.gauss(0, 1)  # a cached gaussian in Python's and numpy's states
    np.random.standard_normal()
    save_rng_state(tmp_path / "rng.safetensors")
    want = (random.random(), np.random.standard_normal(), torch.rand(3))
    from sdtune.checkpoint.state import set_rng_state

    set_rng_state(load_rng_state(tmp_path / "rng.safetensors"))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    import errno

    from sdtune.checkpoint.store import LATEST, write_checkpoint
    from sdtune.files import NoSpaceError

    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, {"a.bin": lambda p: p.write_bytes(b"1")})

    def full(path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(NoSpaceError, match="step-0000002"):
        write_checkpoint(root, 2, {"a.bin": lambda p: p.write_bytes(b"2"), "b.bin": full})
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-0000001"]
    assert (root / LATEST).read_text().strip() == "step-0000001"


# ---------------------------------------------------------------- read-only and full disks


@contextlib.contextmanager
def _mounted(*mount_args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", *mount_args, str(target)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs root with mount (a read-only or full disk of its own)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) read-only, for root too (a read-only bind mount)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with _mounted("--bind", str(path), target=path):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path


def test_read_only_targets_are_one_line(capsys, tiny_cfg, run_copy, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.txt").write_text("there before\n")
    with read_only(locked):
        refused(
            capsys, ["train", tiny_cfg, "--output", locked / "run"], str(locked), protect=[locked]
        )
        refused(
            capsys,
            ["export", run_copy, "--format", "ckpt", "--out", locked / "m.ckpt"],
            str(locked),
            protect=[locked],
        )
        refused(
            capsys,
            [
                "sample",
                run_copy,
                "--prompt",
                "x",
                "--steps",
                "2",
                "--num",
                "1",
                "--out",
                locked / "g.png",
            ],
            str(locked),
            protect=[locked],
        )


def test_full_disk_at_the_first_checkpoint(cli, tiny_cfg, tmp_path):
    from sdtune.train.parts import EXIT_NO_SPACE

    with _mounted("-t", "tmpfs", "-o", "size=640k", "tmpfs", target=tmp_path / "small"):
        run = tmp_path / "small" / "run"
        proc = cli(
            "train", tiny_cfg, "--output", run, "--set", "evaluate.val_batches=0", check=False
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == EXIT_NO_SPACE, proc.stderr
        assert len(lines) == 1 and "MiB" in lines[0] and "--resume" in lines[0], proc.stderr
        assert (
            not [p for p in (run / "checkpoints").iterdir() if p.name != "latest"]
            if (run / "checkpoints").exists()
            else True
        )


def test_more_config_values(capsys, tmp_path):
    for override, key in [
        ("train.max_steps=true", "train.max_steps"),
        ("seed=-1", "seed"),
        ("seed=99999999999999999999999", "seed"),
        ("data.caption_extension=txt", "data.caption_extension"),
        ("train..max_steps=3", "train..max_steps"),
    ]:
        refused(capsys, ["config", "show", "--set", override], key)
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeffseed = 3\n".encode())  # Windows editors write one
    assert main(["config", "show", str(bom)]) == 0
    assert "seed = 3" in capsys.readouterr().out


def test_sampling_inputs(capsys, run_copy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a caf\xe9\n")
    out = tmp_path / "g.png"
    refused(capsys, ["sample", run_copy, "--prompt-file", prompts, "--out", out], "prompts.txt:1")
    mine = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(mine)
    fast = ["--prompt", "x", "--steps", "1", "--num", "1"]
    refused(
        capsys,
        ["sample", run_copy, *fast, "--out", mine],
        "photo.png",
        "--overwrite",
        protect=[mine],
    )
    refused(capsys, ["sample", run_copy, *fast, "--out", tmp_path / "g.txt"], "g.txt", ".png")
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    refused(capsys, ["sample", run_copy, *fast, "--lora", f"{lora}:nan", "--out", out], "nan")
    assert main(["sample", str(run_copy), *fast, "--out", str(mine), "--overwrite"]) == 0


def test_damaged_checkpoints_are_named(capsys, run_copy, tmp_path):
    (run_copy / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    ckpt = run_copy / "checkpoints" / "step-0000002"
    with (ckpt / "model.safetensors").open("r+b") as fh:
        fh.truncate(100)
    line = refused(
        capsys,
        ["export", run_copy, "--format", "diffusers", "--out", tmp_path / "d"],
        "model.safetensors",
        "sdtune inspect",
    )
    assert "truncated" in line


def test_model_folders_missing_parts(capsys, run_copy, tmp_path):
    model = tmp_path / "m"
    assert main(["export", str(run_copy), "--format", "diffusers", "--out", str(model)]) == 0
    shutil.rmtree(model / "tokenizer")
    refused(capsys, ["sample", model, "--prompt", "x", "--out", tmp_path / "g.png"], "tokenizer/")


def test_a_closed_pipe_is_not_a_traceback(run_copy):
    """`sdtune inspect RUN | head`: the reader went away before sdtune wrote."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtune", "inspect", str(run_copy)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # closed before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_model_folder_with_missing_weights_is_named(capsys, run_copy, tmp_path, tiny_cfg):
    """A component whose files lack weights its config needs: one line, never random weights."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(run_copy / "model", model)
    for component, prefix in (("text_encoder", "encoder.layers.0."), ("unet", "up_")):
        files = list((model / component).glob("*.safetensors"))
        state = load_file(str(files[0]))
        save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, str(files[0]))
        line = refused(capsys, ["sample", model, "--prompt", "a", "--out", tmp_path / "g.png"],
                       f"{component} has no", "of its weights", protect=[model])  # fmt: skip
        shutil.rmtree(model)
        shutil.copytree(run_copy / "model", model)
        assert "export or download it again" in line


def test_sampling_sizes_and_embeddings_are_checked(capsys, run_copy, tmp_path):
    from safetensors.torch import save_file

    out = ["--prompt", "a", "--steps", "2", "--out", tmp_path / "g.png"]
    refused(capsys, ["sample", run_copy, *out, "--width", "16"], "--width and --height go together")
    refused(capsys, ["sample", run_copy, *out, "--height", "400000", "--width", "16"],
            "above the largest allowed value, 8192")  # fmt: skip
    refused(capsys, ["sample", run_copy, *out, "--resolution", "16", "--width", "16",
                     "--height", "16"], "exclude each other")  # fmt: skip
    for name, vectors, said in (
        ("zero", torch.zeros(0, 32), "shape [0, 32]"),
        ("nan", torch.full((1, 32), float("nan")), "NaN or infinity"),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file({"emb_params": vectors}, str(path))
        refused(capsys, ["sample", run_copy, *out, "--embedding", f"{path}:<e>"], said,
                protect=[path])  # fmt: skip


def test_sdxl_only_keys_and_truncated_files(capsys, tiny_cfg, tmp_path, run_copy):
    refused(capsys, ["train", tiny_cfg, "--output", tmp_path / "r", "--set",
                     "train.text_encoder_2_lr=1e-5"], "train.text_encoder_2_lr",
            "no second text encoder")  # fmt: skip
    source = next((run_copy / "model" / "unet").glob("*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    refused(capsys, ["inspect", cut], "truncated", protect=[cut])
