"""Aspect-ratio buckets: the table, each image's bucket, the policies for small buckets and
remainders, and the order that keeps every global batch in one bucket."""

import json

import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.data import DataPosition, build_datasets, next_batch
from sdtune.data.buckets import BucketSettings, assign_buckets, bucket_sizes
from sdtune.data.dataset import apply_buckets, write_report
from sdtune.data.order import epoch_order
from sdtune.data.transforms import TransformSpec, transform_with_geometry

SD = BucketSettings(resolution=512, step=64, max_aspect=2.5)


def test_sizes_are_multiples_of_the_step_within_the_area_and_aspect():
    sizes = bucket_sizes(SD)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512 and max(w / h, h / w) <= 2.5
        assert (h, w) in sizes  # both orientations


def test_each_image_goes_to_the_nearest_aspect_ratio():
    names = ["square", "wide", "tall", "phone"]
    sizes = [(1000, 1000), (2000, 1000), (1000, 2000), (3024, 4032)]
    chosen, table = assign_buckets(names, sizes, SD, group=1)
    assert chosen[0] == (512, 512)
    assert chosen[1][0] > chosen[1][1] and abs(chosen[1][0] / chosen[1][1] - 2) < 0.25
    assert chosen[2] == chosen[1][::-1]
    assert chosen[3] == (448, 576)  # 3:4 -> 0.78
    assert sum(len(b.members) for b in table.buckets) == 4


def test_buckets_too_small_for_a_batch_join_their_nearest():
    sizes = [(1000, 1000)] * 5 + [(1300, 1000)] + [(2000, 1000)] * 4
    chosen, table = assign_buckets([f"i{i}" for i in range(10)], sizes, SD, group=4)
    assert chosen[5] == (512, 512)  # alone in 576x448, it joins the square bucket
    rows = {(r["width"], r["height"]): r for r in table.rows()}
    assert rows[(512, 512)]["images"] == 6
    assert rows[(512, 512)]["joined_from"] == [{"width": 576, "height": 448, "images": 1}]
    assert all(r["images"] >= 4 for r in rows.values())
    assert any("joined from 576x448" in line for line in table.lines())


def test_no_upscale_keeps_small_images_small():
    settings = BucketSettings(512, 64, 2.5, no_upscale=True)
    chosen, table = assign_buckets(["big", "small"], [(1024, 1024), (300, 200)], settings, 1)
    assert chosen == [(512, 512), (256, 192)]
    assert table.upscaled == {}
    chosen, table = assign_buckets(["big", "small"], [(1024, 1024), (300, 200)], SD, 1)
    assert table.upscaled and [n for n, _ in table.far_below] == ["small"]  # 2.1x into 640x384


def test_order_keeps_every_global_batch_in_one_bucket_and_is_plain_with_one():
    buckets = tuple([0] * 10 + [1] * 7 + [2] * 5)
    for epoch in range(3):
        order = epoch_order(22, 5, epoch, buckets, 4)
        assert len(order) == 4 * (10 // 4 + 7 // 4 + 5 // 4)
        for start in range(0, len(order), 4):
            assert len({buckets[i] for i in order[start : start + 4]}) == 1
        assert order == epoch_order(22, 5, epoch, buckets, 4)  # a function of (seed, epoch)
    assert epoch_order(22, 5, 0, (0,) * 22, 4)[:20] == epoch_order(22, 5, 0)[:20]
    # two processes take the two halves of each global batch, and move on together
    position = DataPosition()
    for _ in range(8):
        a, after = next_batch(position, 2, 22, 5, (0, 2), buckets)
        b, after_b = next_batch(position, 2, 22, 5, (1, 2), buckets)
        assert after == after_b and len({buckets[i] for _, i in a + b}) == 1
        assert {i for _, i in a}.isdisjoint(i for _, i in b)
        position = after
    assert position.epoch >= 1  # past the first epoch's 4 global batches


def test_transform_covers_and_crops_to_the_bucket():
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    spec = TransformSpec(resolution=32, channels=3)
    x, geometry = transform_with_geometry(image, spec, None, size=(44, 20))
    assert x.shape == (3, 20, 44)
    # resized to 44x22 to cover 44x20, one row cut at the top
    assert geometry.tolist() == [100, 200, 1, 0]
    square, _ = transform_with_geometry(image, spec, None)
    assert square.shape == (3, 32, 32)


def _mixed_folder(folder):
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 40)] * 8 + [(80, 40)] * 8 + [(36, 72)] * 8):
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"image {i}\n")
    return folder


def test_a_folder_of_mixed_sizes_trains_in_buckets_and_reports_them(tmp_path):
    folder = _mixed_folder(tmp_path / "mixed")
    cfg = load_config(
        None, [f"data.path={folder}", "data.resolution=32", "data.val_fraction=0.125"]
    ).data
    lines = []
    split = build_datasets(cfg, 3, 0, lines.append)
    table = apply_buckets(split, cfg, 4, 4, lines.append)
    sizes = {(b.size, len(b.members)) for b in table.buckets}
    assert {s for s, _ in sizes} == {(32, 32), (44, 20), (20, 44)}
    assert any(
        line.startswith("data: buckets (about 32x32 px, sides multiples of 4") for line in lines
    )
    for index in range(len(split.train)):
        record = split.train.records[index]
        item = split.train[(0, index)]
        assert item["pixel_values"].shape[1:] == (record.bucket[1], record.bucket[0])
    for index in range(len(split.val)):
        record = split.val.records[index]
        assert split.val[index]["pixel_values"].shape[1:] == (record.bucket[1], record.bucket[0])
    write_report(split.report, tmp_path / "data_report.json", "error")
    saved = json.loads((tmp_path / "data_report.json").read_text())
    assert {(b["width"], b["height"]) for b in saved["buckets"]["buckets"]} == {
        (32, 32), (44, 20), (20, 44)
    }  # fmt: skip
    assert "square_crop_cuts" not in saved
    off = load_config(None, [f"data.path={folder}", "data.resolution=32", "data.buckets=false"])
    split = build_datasets(off.data, 3, 0, lambda s: None)
    assert apply_buckets(split, off.data, 4, 4, print) is None
    assert split.train[(0, 0)]["pixel_values"].shape[1:] == (32, 32)
    assert torch.equal(split.train[(0, 0)]["geometry"][:2], torch.tensor([40, 40]))
