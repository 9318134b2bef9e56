"""Training from the latent/text cache: the same run as without it, exact resume, reuse."""

import pytest
import torch

from tests.e2e.test_finetune import _config
from tests.e2e.test_resume import _assert_identical, _final_state, _train


@pytest.mark.parametrize("hflip", [0.5])  # flips: both orientations cached
def test_cached_training_matches_and_resumes_exactly(tmp_path, tiny_image_folder, hflip):
    cache = tmp_path / "cache"
    extra = f"[data]\nhflip = {hflip}\ncaption_dropout = 0.3\n"
    config = _config(tmp_path, tiny_image_folder, "")
    text = config.read_text().replace("[data]\n", extra, 1)
    text = text.replace("learning_rate = 0.01", "learning_rate = 0.0001")  # Adam at 1e-2 would
    # turn the encoders' batching rounding (~1e-6) into lr-sized steps on near-zero gradients
    config.write_text(text)
    on = ["--set", "data.cache_latents=true", "--set", "data.cache_text=true",
          "--set", f"data.cache_dir={cache}"]  # fmt: skip
    plain = _train(config, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    first = _train(config, tmp_path / "a", *on)
    assert first.returncode == 0, first.stderr
    assert "to encode" in first.stdout
    _assert_same_run(tmp_path / "plain", tmp_path / "a")

    killed = _train(config, tmp_path / "b", *on, crash="step:4")
    assert killed.returncode != 0
    assert "0 to encode" in killed.stdout or "to encode" not in killed.stdout  # all reused
    resumed = _train(config, tmp_path / "b", *on, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def test_cache_refuses_random_crops_and_a_trained_text_encoder(tmp_path, tiny_image_folder):
    from tests.e2e.test_finetune import main

    config = _config(tmp_path, tiny_image_folder, "")
    args = ["train", str(config), "--output", str(tmp_path / "r"), "--set"]
    assert main(args + ["data.cache_latents=true", "--set", "data.rotation=5"]) == 2
    assert main(args + ["data.cache_text=true", "--set", "lora.enabled=true",
                        "--set", "lora.text_encoder=true"]) == 2  # fmt: skip


@pytest.mark.slow  # over 40 s: run with -m slow
def test_curriculum_stages_read_their_own_cache_entries_and_resume_exactly(
    tmp_path, tiny_image_folder
):
    """A stage at 16 px on the easier images (the metadata's difficulty column) and then the
    whole set at 32 px, from the cache: one entry per image and resolution, the same run as
    without the cache, and a kill at the stage boundary resumes bit for bit."""
    rows = [f"img{i}.png,a photo of a red square number {i},{i / 5:g}" for i in range(6)]
    (tiny_image_folder / "metadata.csv").write_text(
        "file_name,text,difficulty\n" + "\n".join(rows) + "\n"
    )
    stages = "[[curriculum.stages]]\nuntil_step = 3\nresolution = 16\ndifficulty = [0, 0.6]\n"
    config = _config(tmp_path, tiny_image_folder, stages)
    text = config.read_text().replace("learning_rate = 0.01", "learning_rate = 0.0001")
    config.write_text(text)
    cache = tmp_path / "cache"
    on = ["--set", "data.cache_latents=true", "--set", f"data.cache_dir={cache}"]
    plain = _train(config, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    first = _train(config, tmp_path / "a", *on)
    assert first.returncode == 0, first.stderr
    encoded = [line for line in first.stdout.splitlines() if "to encode" in line]
    assert len(encoded) == 2, first.stdout  # the whole at 32 px, then the stage's view at 16
    counts = [int(line.split("latents: ")[1].split(" to encode")[0]) for line in encoded]
    assert 4 == counts[0] > counts[1] > 0, encoded  # 4 training images; the easier at 16 px
    _assert_same_run(tmp_path / "plain", tmp_path / "a")

    killed = _train(config, tmp_path / "b", *on, crash="step:3")
    assert killed.returncode != 0
    resumed = _train(config, tmp_path / "b", *on, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert all(
        " 0 to encode" in line for line in resumed.stdout.splitlines() if "to encode" in line
    )
    _assert_identical(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def _assert_same_run(plain, cached):
    """The cached run is the plain one: only the encoders' batching rounding (~1e-6) differs."""
    w_plain, _, _, rows_plain = _final_state(plain)
    w_cached, _, _, rows_cached = _final_state(cached)
    loss = [r["loss"] for r in rows_plain if "loss" in r]
    assert [r["loss"] for r in rows_cached if "loss" in r] == pytest.approx(loss, rel=1e-3)
    for key in w_plain:
        torch.testing.assert_close(w_cached[key], w_plain[key], atol=1e-3, rtol=1e-2)
