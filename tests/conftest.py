import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`'s workers share the cores: a thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each (and each CLI run they start), not
    import torch  # one per core each, which only contend

    torch.set_num_threads(1)


@pytest.fixture
def tiny_image_folder(tmp_path):
    """A folder of 6 small RGB images with same-stem captions."""
    return _write_images(tmp_path / "images")


@pytest.fixture(scope="module")
def tiny_image_folder_module(tmp_path_factory):
    """The same folder, shared by the tests of one module."""
    return _write_images(tmp_path_factory.mktemp("shared") / "images")


def _write_images(folder):
    from PIL import Image

    folder.mkdir()
    for i in range(6):
        colour = (40 * i, 255 - 40 * i, 128)
        Image.new("RGB", (40, 36), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a red square number {i}\n")
    return folder
