import json

import pytest
import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.data import DataPosition, build_datasets, next_batch
from sdtune.data.order import epoch_order
from sdtune.data.transforms import TransformSpec, apply_transform
from sdtune.errors import DataError


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
