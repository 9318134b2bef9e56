import json

import pytest
import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.data import DataPosition, build_datasets, next_batch
from sdtune.data.order import epoch_order
from sdtune.data.transforms import TransformSpec, apply_transform
from sdtune.errors import ConfigError, DataError


def _cfg(**sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()]).data


def test_digits_source_is_real_and_split_deterministically():
    a = build_datasets(_cfg(**{"data.resolution": 16}), 1, seed=0, say=lambda s: None)
    b = build_datasets(_cfg(**{"data.resolution": 16}), 1, seed=0, say=lambda s: None)
    c = build_datasets(_cfg(**{"data.resolution": 16}), 1, seed=1, say=lambda s: None)
    assert len(a.train) + len(a.val) == 1797
    assert len(a.val) == 180
    assert [r.name for r in a.val.records] == [r.name for r in b.val.records]
    assert [r.name for r in a.val.records] != [r.name for r in c.val.records]
    item = a.train[(0, 0)]
    assert item["pixel_values"].shape == (1, 16, 16)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["caption"].startswith("a handwritten digit ")
    assert 0 <= item["label"] <= 9
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert item["caption"].endswith(words[item["label"]])


def test_split_seed_holds_out_the_same_images_whatever_the_seed():
    cfg = _cfg(**{"data.resolution": 16, "data.split_seed": 4})
    a = build_datasets(cfg, 1, seed=0, say=lambda s: None)
    b = build_datasets(cfg, 1, seed=1, say=lambda s: None)
    plain = build_datasets(_cfg(**{"data.resolution": 16}), 1, seed=4, say=lambda s: None)
    names = [r.name for r in a.val.records]
    assert names == [r.name for r in b.val.records] == [r.name for r in plain.val.records]
    assert a.train.seed == 0 and b.train.seed == 1  # augmentation and order keep the run's seed


def test_folder_with_captions(tiny_image_folder):
    split = build_datasets(
        _cfg(**{"data.path": tiny_image_folder, "data.resolution": 32, "data.val_fraction": 0.34}),
        3,
        0,
        lambda s: None,
    )
    assert len(split.train) == 4 and len(split.val) == 2
    item = split.train[(0, 1)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["caption"].startswith("a photo of a red square")


def test_metadata_jsonl_and_csv(tmp_path):
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"cap {i}"}) for i in range(3))
    )
    split = build_datasets(
        _cfg(**{"data.path": tmp_path, "data.resolution": 16, "data.val_fraction": 0}),
        3,
        0,
        lambda s: None,
    )
    assert sorted(r.caption for r in split.train.records) == ["cap 0", "cap 1", "cap 2"]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\n0.png,zero\n1.png,one\n")
    split = build_datasets(
        _cfg(**{"data.path": tmp_path, "data.resolution": 16, "data.val_fraction": 0}),
        3,
        0,
        lambda s: None,
    )
    assert sorted(r.caption for r in split.train.records) == ["one", "zero"]


def test_metadata_difficulty_scores_and_curriculum_stages_by_them(tmp_path):
    from sdtune.models.presets import build_preset
    from sdtune.train.curriculum import Curriculum

    for i in range(4):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    lines = [
        {"file_name": "0.png", "text": "a", "difficulty": 0.1},
        {"file_name": "1.png", "text": "b", "difficulty": 3},
        {"file_name": "2.png", "text": "c", "difficulty": 0.5},
        {"file_name": "3.png", "text": "d"},
    ]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(line) for line in lines))
    settings = {"data.path": tmp_path, "data.resolution": 16, "data.val_fraction": 0}
    split = build_datasets(_cfg(**settings), 3, 0, lambda s: None)
    scores = {r.name: r.difficulty for r in split.train.records}
    assert scores == {"0.png": 0.1, "1.png": 3.0, "2.png": 0.5, "3.png": None}
    config = tmp_path / "cfg.toml"
    stage = "[train]\nmax_steps = 4\n[[curriculum.stages]]\nuntil_step = 2\ndifficulty = [{}]\n"
    config.write_text(stage.format("0, 0.5"))
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=r"difficulty: 1 training image\(s\) have no .*3.png"):
        Curriculum(cfg, split, build_preset("tiny-sd", 0))
    meta.write_text("\n".join(json.dumps(line) for line in lines[:3]))
    split = build_datasets(_cfg(**settings), 3, 0, lambda s: None)
    curriculum = Curriculum(cfg, split, build_preset("tiny-sd", 0))
    assert sorted(r.name for r in curriculum.view(0, None).records) == ["0.png", "2.png"]
    assert "difficulty 0-0.5" in curriculum.describe(0)
    meta.unlink()
    csv = tmp_path / "metadata.csv"
    csv.write_text("file_name,text,difficulty\n0.png,a,0.2\n1.png,b,\n2.png,c,hard\n")
    with pytest.raises(DataError, match=r"metadata.csv:4: 'difficulty' must be a number .*'hard'"):
        build_datasets(_cfg(**settings), 3, 0, lambda s: None)
    csv.write_text("file_name,text,difficulty\n0.png,a,0.2\n1.png,b,\n")
    split = build_datasets(_cfg(**settings), 3, 0, lambda s: None)
    assert {r.name: r.difficulty for r in split.train.records} == {"0.png": 0.2, "1.png": None}
    config.write_text(stage.format("1, 0"))
    with pytest.raises(ConfigError, match=r"low <= high"):
        load_config(config)


def test_bad_metadata_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: not valid JSON"):
        build_datasets(_cfg(**{"data.path": tmp_path}), 3, 0, lambda s: None)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("name,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"metadata.csv: missing column\(s\) file_name, text"):
        build_datasets(_cfg(**{"data.path": tmp_path}), 3, 0, lambda s: None)


def _break_folder(folder):
    (folder / "img0.png").write_bytes(b"not an image at all")
    data = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "img2.txt").unlink()  # caption missing


def test_bad_files_are_fatal_by_default_and_named(tiny_image_folder):
    _break_folder(tiny_image_folder)
    with pytest.raises(DataError) as info:
        build_datasets(
            _cfg(**{"data.path": tiny_image_folder, "data.resolution": 32}), 3, 0, lambda s: None
        )
    message = str(info.value)
    assert "img2.png: no caption file img2.txt" in message
    assert "3 bad files in total" in message
    assert "data.on_bad_file='skip'" in message


def test_bad_files_skipped_with_names_and_count(tiny_image_folder):
    _break_folder(tiny_image_folder)
    lines = []
    split = build_datasets(
        _cfg(
            **{
                "data.path": tiny_image_folder,
                "data.resolution": 32,
                "data.on_bad_file": "skip",
                "data.val_fraction": 0,
            }
        ),
        3,
        0,
        lines.append,
    )
    assert len(split.train) == 3
    text = "\n".join(lines)
    assert "img0.png: cannot read image" in text
    assert "img1.png: cannot read image" in text
    assert "img2.png: no caption file img2.txt" in text
    assert "skipped 3 bad file(s)" in text
    assert len(split.report.to_dict()["skipped"]) == 3


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(_cfg(**{"data.path": tmp_path / "nope"}), 3, 0, lambda s: None)
    with pytest.raises(DataError, match="holds no images"):
        build_datasets(_cfg(**{"data.path": tmp_path}), 3, 0, lambda s: None)


def test_small_images_are_reported(tiny_image_folder):
    lines = []
    build_datasets(
        _cfg(**{"data.path": tiny_image_folder, "data.resolution": 64, "data.buckets": "false"}),
        3,
        0,
        lines.append,
    )
    assert any("smaller than data.resolution=64" in line for line in lines)


def test_conversions_are_stated_once(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (40, 40), 128).save(folder / "grey.png")
    Image.new("LA", (40, 40), (128, 100)).save(folder / "grey-alpha.png")
    Image.new("RGB", (80, 40), (1, 2, 3)).save(folder / "wide.png")
    Image.new("RGBA", (40, 44), (1, 2, 3, 0)).save(folder / "tall.png")
    for path in folder.glob("*.png"):
        path.with_suffix(".txt").write_text("x\n")
    lines = []
    cfg = _cfg(
        **{"data.path": folder, "data.resolution": 32, "data.val_fraction": 0.0},
        **{"data.buckets": "false"},  # the square crop's statement (buckets have a table)
    )
    split = build_datasets(cfg, 3, 0, lines.append)
    said = [line for line in lines if line.startswith("data: ")]
    assert "data: 2 greyscale image(s) converted to RGB" in said
    assert "data: 2 image(s) with transparency flattened onto white" in said
    cut = [line for line in said if "not square" in line]
    assert cut == [
        f"data: 2 image(s) not square: the square crop cuts off up to 50% of an image "
        f"({folder / 'wide.png'}); 1 lose more than 10%"
    ]
    lines.clear()
    build_datasets(cfg, 1, 0, lines.append)  # a one-channel model: colour becomes grey
    assert "data: 2 colour image(s) converted to one (grey) channel" in lines
    report = split.report.to_dict()
    assert report["modes"] == {"L": 1, "LA": 1, "RGB": 1, "RGBA": 1}
    assert report["transparent"] == 2 and len(report["square_crop_cuts"]) == 2


def test_augmentations_are_seeded_per_epoch_and_example(tiny_image_folder):
    cfg = _cfg(
        **{
            "data.path": tiny_image_folder,
            "data.resolution": 24,
            "data.center_crop": False,
            "data.hflip": 0.5,
            "data.rotation": 10,
            "data.color_jitter": 0.3,
            "data.caption_dropout": 0.5,
            "data.val_fraction": 0,
        }
    )
    split = build_datasets(cfg, 3, 7, lambda s: None)
    a, b = split.train[(2, 1)], split.train[(2, 1)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    changed = [
        not torch.equal(split.train[(e, 1)]["pixel_values"], a["pixel_values"])
        for e in range(3, 10)
    ]
    assert any(changed)
    captions = {split.train[(e, 1)]["caption"] for e in range(40)}
    assert "" in captions and len(captions) == 2


def test_transform_geometry():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    spec = TransformSpec(resolution=16, channels=3)
    out = apply_transform(image, spec, None)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[0], torch.ones(16, 16))
    torch.testing.assert_close(out[1], -torch.ones(16, 16))
    grey = apply_transform(image, TransformSpec(resolution=8, channels=1), None)
    assert grey.shape == (1, 8, 8)


def test_data_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert sorted(epoch_order(10, 0, 1)) == list(range(10))
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    position = DataPosition()
    seen = []
    for _ in range(3):
        keys, position = next_batch(position, 3, 10, 0)
        seen += keys
    assert position == DataPosition(0, 9)
    assert len({k for k in seen}) == 9
    keys, position = next_batch(position, 3, 10, 0)  # a partial batch is dropped: next epoch
    assert position == DataPosition(1, 3) and all(e == 1 for e, _ in keys)


def test_shards_of_a_batch_are_the_global_batch_split_by_rank():
    position = DataPosition(0, 8)  # 8 + 2 x 3 > 10 for the global batch: next epoch for both
    full, after = next_batch(position, 6, 10, 0)
    shards = [next_batch(position, 3, 10, 0, (rank, 2)) for rank in range(2)]
    assert shards[0][0] + shards[1][0] == full
    assert shards[0][1] == shards[1][1] == after == DataPosition(1, 6)


def test_paired_order_gives_every_batch_half_of_each_kind():
    # 30 instance examples (0-29, DreamBooth's repeated instances) and 27 class images: every
    # batch of 6 (and each process's 3 of a global 6) holds as many of one kind as the other
    # while both kinds last, each kind in its own shuffle; the order is still (seed, epoch)'s
    for epoch in range(3):
        order = epoch_order(57, 4, epoch, paired=30)
        assert sorted(order) == list(range(57)) and order == epoch_order(57, 4, epoch, paired=30)
        kinds = [i < 30 for i in order]
        assert all(kinds[j] != kinds[j + 1] for j in range(0, 54, 2))
        assert order[54:] == tuple(i for i in order if i < 30)[27:]  # the instances left over
    assert epoch_order(57, 4, 0, paired=30) != epoch_order(57, 4, 1, paired=30)
    position = DataPosition()
    for _ in range(9):
        keys, after = next_batch(position, 6, 57, 4, paired=30)
        assert sum(i < 30 for _, i in keys) == 3
        for rank in range(2):
            shard, _ = next_batch(position, 3, 57, 4, (rank, 2), paired=30)
            assert shard == keys[3 * rank : 3 * rank + 3]
        position = after
    assert position == DataPosition(0, 54)


def test_sixteen_bit_grey_is_scaled_and_transparency_is_flattened(tmp_path):
    import warnings

    import numpy as np

    from sdtune.data.transforms import to_tensor

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")
        rgb, grey = to_tensor(im, 3), to_tensor(im, 1)
    assert rgb.shape == (3, 32, 32) and grey.shape == (1, 32, 32)
    assert abs(float(grey.mean()) - 0.5) < 0.01  # PIL's convert("RGB") made this all white
    assert float(grey.min()) == 0.0 and float(grey.max()) == 1.0

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "pal.png", transparency=0)
    with Image.open(tmp_path / "pal.png") as im, warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on converting such an image to RGB
        x = to_tensor(im, 3)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # the transparent pixel: white
    assert torch.allclose(x[:, 1, 1], torch.tensor([200, 30, 30]) / 255)


def test_photos_as_cameras_and_editors_write_them(tmp_path):
    """A phone's rotated JPEG is turned upright (its size too, for the buckets), CMYK becomes
    RGB, and transparency goes onto data.background; each said once."""
    folder = tmp_path / "photos"
    folder.mkdir()
    stored = Image.new("RGB", (60, 30), (200, 10, 10))
    stored.paste((10, 10, 200), (0, 0, 30, 30))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    stored.save(folder / "phone.jpg", exif=exif, quality=95)
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "print.jpg")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(folder / "cutout.png")
    for path in folder.iterdir():
        path.with_suffix(".txt").write_text("x\n")
    lines = []
    cfg = _cfg(
        **{"data.path": folder, "data.resolution": 32, "data.val_fraction": 0.0},
        **{"data.background": "[0, 0, 0]"},
    )
    split = build_datasets(cfg, 3, 0, lines.append)
    assert "data: 1 image(s) turned upright by their EXIF orientation" in lines
    assert "data: 1 CMYK image(s) converted to RGB" in lines
    assert "data: 1 image(s) with transparency flattened onto black" in lines
    by_name = {r.name: i for i, r in enumerate(split.train.records)}
    phone = split.train.records[by_name["phone.jpg"]]
    assert phone.size == (30, 60) and phone.open().size == (30, 60)  # upright: portrait
    top = phone.open().crop((0, 0, 30, 30)).resize((1, 1)).getpixel((0, 0))
    assert top[2] > 150 and top[0] < 80  # the stored left (blue) half is now on top
    red = split.train[(0, by_name["print.jpg"])]["pixel_values"]
    assert red[0].mean() > 0.5 and red[1].mean() < -0.5  # cyan-free CMYK: red in RGB
    cutout = split.train[(0, by_name["cutout.png"])]["pixel_values"]
    assert cutout.max() == -1.0  # on black, not white


def test_caption_tags_template_and_column(tmp_path):
    from sdtune.data.dataset import TagSpec, apply_tags
    from sdtune.errors import ConfigError

    caption = "sks dog, red collar, grass, sunny, close up"
    spec = TagSpec(shuffle=True, keep=1, dropout=0.3)
    seen = {apply_tags(caption, spec, 0, epoch, 3) for epoch in range(20)}
    assert len(seen) > 5  # a new draw every epoch
    for text in seen:
        tags = text.split(", ")
        assert tags[0] == "sks dog" and set(tags[1:]) <= {
            "red collar",
            "grass",
            "sunny",
            "close up",
        }
    assert apply_tags(caption, spec, 0, 4, 3) == apply_tags(caption, spec, 0, 4, 3)
    assert apply_tags(caption, TagSpec(), 0, 4, 3) == caption
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(
            json.dumps({"file_name": f"{i}.png", "text": "unused", "tags": f"sks, t{i}, u{i}"})
            for i in range(4)
        )
    )
    cfg = _cfg(
        **{"data.path": tmp_path, "data.resolution": 16, "data.val_fraction": 0},
        **{"data.caption_column": "tags", "data.caption_template": "'a photo of {caption}'"},
        **{"data.shuffle_tags": "true", "data.keep_tokens": 1},
    )
    split = build_datasets(cfg, 3, 0, lambda s: None)
    assert sorted(r.caption for r in split.train.records)[0] == "a photo of sks, t0, u0"
    captions = {split.train[(epoch, 0)]["caption"] for epoch in range(12)}
    assert all(c.startswith("a photo of sks, ") for c in captions) and len(captions) == 2
    with pytest.raises(ConfigError, match="must hold '\\{caption\\}'"):
        _cfg(**{"data.caption_template": "'no place'"})
    with pytest.raises(ConfigError, match="data.cache_text: data.shuffle_tags"):
        _cfg(**{"data.cache_text": "true", "data.shuffle_tags": "true"})
    with pytest.raises(DataError, match="each line needs 'file_name' and 'caption'"):
        build_datasets(
            _cfg(**{"data.path": tmp_path, "data.caption_column": "caption"}), 3, 0, print
        )


def _images(folder, n, size=(16, 16), captions=True):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20, 0, 0)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"cap {i}\n")
    return folder


def test_kohya_folders_and_several_datasets(tmp_path):
    root = tmp_path / "kohya"
    _images(root / "10_sks dog", 2)
    (root / "10_sks dog" / "1.txt").unlink()  # no caption file: the folder's text alone
    _images(root / "2_cat", 1)
    cfg = _cfg(**{"data.path": root, "data.kohya_folders": "true", "data.val_fraction": 0})
    lines = []
    split = build_datasets(cfg, 3, 0, lines.append)
    captions = sorted(r.caption for r in split.train.records)
    assert captions == ["cat, cap 0"] * 2 + ["sks dog"] * 10 + ["sks dog, cap 0"] * 10
    assert any("2 in 'sks dog', 1 in 'cat'" in line for line in lines)
    (root / "stray").mkdir()
    with pytest.raises(DataError, match="stray: a subfolder that data.kohya_folders cannot read"):
        build_datasets(cfg, 3, 0, lambda s: None)

    a, b = _images(tmp_path / "a", 10), _images(tmp_path / "b", 4)
    toml = tmp_path / "cfg.toml"
    toml.write_text(
        f"""
[data]
val_fraction = 0.2
shuffle_tags = true
[[data.datasets]]
path = "{a}"
repeats = 1.5
caption_prefix = "style x, "
[[data.datasets]]
path = "{b}"
repeats = 2
caption_template = "a photo of {{caption}}"
shuffle_tags = false
"""
    )
    cfg = load_config(toml, []).data
    split = build_datasets(cfg, 3, 0, lambda s: None)
    held_out = {r.path for r in split.val.records}
    assert len(held_out) == 3 and not held_out & {r.path for r in split.train.records}
    from_a = [r for r in split.train.records if r.caption.startswith("style x, cap")]
    from_b = [r for r in split.train.records if r.caption.startswith("a photo of cap")]
    assert len(from_a) + len(from_b) == len(split.train)
    kept_a = len({r.path for r in from_a})
    kept_b = len({r.path for r in from_b})
    assert len(from_b) == 2 * kept_b  # twice each
    assert kept_a <= len(from_a) <= 2 * kept_a and len(from_a) > kept_a  # 1.5: some twice
    assert from_a[0].tags.shuffle and not from_b[0].tags.shuffle  # each its own options
    again = build_datasets(cfg, 3, 0, lambda s: None)
    assert [r.name for r in again.train.records] == [r.name for r in split.train.records]
    with pytest.raises(Exception, match="data.path and data.datasets are both set"):
        load_config(toml, [f"data.path={a}"])


def test_loss_masks_follow_their_images(tmp_path):
    """cat_mask.png weights cat.png's loss: found beside it (not trained as an image), checked
    for size, and cropped, resized and flipped with it (the cache's path gives the same)."""
    from sdtune.data.transforms import mask_at
    from sdtune.diffusion.targets import diffusion_loss

    folder = tmp_path / "masked"
    folder.mkdir()
    image = Image.new("RGB", (48, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, 32))  # left half red
    image.save(folder / "cat.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 32))  # learn the left half only
    mask.save(folder / "cat_mask.png")
    Image.new("RGB", (32, 32)).save(folder / "plain.png")
    Image.new("RGB", (40, 40)).save(folder / "odd.png")
    Image.new("L", (20, 20)).save(folder / "odd_mask.png")
    for stem in ("cat", "plain", "odd"):
        (folder / f"{stem}.txt").write_text("x\n")
    sets = {"data.path": folder, "data.resolution": 32, "data.val_fraction": 0, "data.hflip": 1.0}
    cfg = _cfg(**sets, **{"data.masks": "true", "data.on_bad_file": "skip"})
    lines = []
    split = build_datasets(cfg, 3, 0, lines.append)
    names = sorted(r.name for r in split.train.records)
    assert names == ["cat.png", "plain.png"]  # the masks are not images; odd's is refused
    assert any("odd_mask.png is 20x20 px, the image 40x40" in line for line in lines)
    assert "data: 1 image(s) with a loss mask (data.masks)" in lines
    cat = split.train.records.index(next(r for r in split.train.records if r.name == "cat.png"))
    item = split.train[(0, cat)]  # flipped (hflip 1.0): red and the mask's white on the right
    assert item["mask"].shape == (1, 32, 32)
    right = item["mask"][0, :, 20:].mean()
    assert right > 0.9 and item["mask"][0, :, :12].mean() < 0.1
    assert item["pixel_values"][0, :, 20:].mean() > 0.9  # red channel high where the mask is
    from_cache_path = mask_at(split.train.records[cat].open_mask(), (32, 32), True)
    assert torch.equal(from_cache_path, item["mask"])
    batch = __import__("sdtune.data.dataset", fromlist=["collate"]).collate(
        [split.train[(0, i)] for i in range(2)]
    )
    assert batch["masks"].shape == (2, 1, 32, 32)
    plain = 1 - cat
    assert torch.equal(batch["masks"][plain], torch.ones(1, 32, 32))  # no mask: counts whole
    # the loss: errors where the mask is 0 count for nothing
    target = torch.zeros(1, 4, 4, 4)
    pred = torch.zeros(1, 4, 4, 4)
    pred[..., :2] = 5.0
    weights = torch.ones(1, 1, 4, 4)
    weights[..., :2] = 0.0
    assert float(diffusion_loss(pred, target, None, weights)) == 0.0
    assert float(diffusion_loss(pred, target)) == 12.5
