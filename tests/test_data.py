"""Data: every odd image mode becomes RGB, undecodable files are skipped and listed, the stream is
a pure function of (seed, index) so resume and worker count change nothing."""
import io
import os
import re
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo
from latentvae.config import DataConfig
from latentvae.sources import open_source, split_holdout
from latentvae.train.data import CropStream, StreamSampler, collate
from latentvae.errors import BadInputError, UserError
from latentvae.fsutil import atomic_save_image
from latentvae.images import BadImage, list_images, load_rgb, oriented_size


def _write_odd_images(folder):
    """Convertible odd modes, and files that can never be decoded."""
    good = make_photo((40, 40), seed=1)
    good.convert("L").save(folder / "gray.png")
    rgba = good.convert("RGBA"); rgba.putalpha(128); rgba.save(folder / "rgba.png")
    good.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(folder / "deep16.png")
    good.save(folder / "big.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    buf = io.BytesIO(); make_photo((64, 64), seed=2).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"empty.jpg", "notes.jpg", "truncated.jpg"}


@pytest.mark.parametrize("name, mode", [("gray.png", "L"), ("rgba.png", "RGBA"), ("palette.png", "P"),
                                        ("cmyk.jpg", "CMYK"), ("deep16.png", "I;16")])
def test_odd_modes_are_converted_to_rgb(tmp_path, name, mode):
    _write_odd_images(tmp_path)
    assert Image.open(tmp_path / name).mode.startswith(mode[:1])
    img = load_rgb(tmp_path / name)
    assert img.mode == "RGB" and img.size == (40, 40)
    a = np.asarray(img)
    assert a.std() > 1  # content survived (a 16-bit ramp is not crushed to black)


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255


@pytest.mark.parametrize("name, reason", [("empty.jpg", "empty file"), ("notes.jpg", "cannot decode"),
                                          ("truncated.jpg", "cannot decode")])
def test_undecodable_files_raise_badimage_naming_the_file(tmp_path, name, reason):
    _write_odd_images(tmp_path)
    with pytest.raises(BadImage) as e:
        load_rgb(tmp_path / name)
    assert name in str(e.value) and reason in str(e.value)


def test_too_large_images_are_refused_by_pixel_count(tmp_path):
    make_photo((40, 40)).save(tmp_path / "a.png")
    with pytest.raises(BadImage, match="exceeds max_image_pixels=1000"):
        load_rgb(tmp_path / "a.png", max_pixels=1000)


def test_stream_skips_and_lists_bad_files_and_never_crashes(tmp_path):
    bad = _write_odd_images(tmp_path)
    cfg = DataConfig(source=str(tmp_path), resolution=32, max_image_pixels=10**6)
    stream = CropStream(open_source(cfg.source), cfg, seed=0)
    n = len(stream.src)
    assert n == 9
    batches = [collate([stream[k] for k in range(b, b + 3)]) for b in range(0, 2 * n, 3)]
    assert all(b["pixels"].shape == (3, 3, 32, 32) for b in batches)
    reported = {m.split(":")[0].rsplit("/", 1)[-1] for b in batches for m in b["bad"]}
    assert reported == bad  # each bad file reported (once per process), every good one used


def test_stream_is_a_pure_function_of_seed_and_index(image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=16, short_side_min=20, short_side_max=40)
    a = CropStream(open_source(cfg.source), cfg, seed=3)
    b = CropStream(open_source(cfg.source), cfg, seed=3)
    for k in (7, 0, 12, 7):  # any order, any instance
        assert torch.equal(a[k]["pixels"], b[k]["pixels"])
    c = CropStream(open_source(cfg.source), cfg, seed=4)
    assert not torch.equal(a[7]["pixels"], c[7]["pixels"])


def test_each_epoch_visits_every_image_once(image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=16)
    stream = CropStream(open_source(cfg.source), cfg, seed=0)
    n = len(stream.src)
    for epoch in range(3):
        assert sorted(stream._permutation(epoch)) == list(range(n))


def test_processes_take_disjoint_slices_that_cover_the_stream():
    world, b = 3, 2
    taken = []
    for rank in range(world):
        it = iter(StreamSampler(b, start=5, rank=rank, world=world))
        taken += [next(it) for _ in range(4 * b)]
    assert sorted(taken) == list(range(5 * world * b, 9 * world * b))


def test_holdout_is_stable_and_disjoint(image_folder):
    src = open_source(str(image_folder))
    train, val = split_holdout(src, 2)
    names = {train.name(i) for i in range(len(train))}
    assert len(val) == 2 and len(train) == 3 and not names & {val.name(i) for i in range(2)}
    assert [val.name(i) for i in range(2)] == [split_holdout(src, 2)[1].name(i) for i in range(2)]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nowhere" / "x" / "y"))
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):  # a user's mistake: one line on the command line
        open_source(str(tmp_path))


def test_a_file_is_not_a_data_source(tmp_path):
    make_photo((40, 40)).save(tmp_path / "a.png")
    with pytest.raises(BadInputError, match=r"data source .*a\.png is a file; expected an image folder"):
        open_source(str(tmp_path / "a.png"))
    with pytest.raises(BadInputError, match=r"image folder .*a\.png is a file"):
        list_images(tmp_path / "a.png")


def test_hf_dataset_source_with_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [make_photo((40, 36), seed=s) for s in range(3)]
    ds = datasets.Dataset.from_dict({"img": imgs, "caption": ["a", "b", "c"]},
                                    features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    src = open_source(str(tmp_path / "ds"), column="img")
    assert len(src) == 3 and src.load(1).size == (40, 36)
    with pytest.raises(ValueError, match="no image column 'image'; columns: img, caption"):
        open_source(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(BadInputError, match="no split 'test'; splits: train"):
        open_source(str(tmp_path / "dd"), split="test", column="img")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_so_photos_load_upright(tmp_path, fmt):
    # a 40x20 image stored sideways with orientation 6 ("rotate 90 CW to display"): shown 20x40
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white as stored -> top half white as displayed
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"sideways.{fmt.lower()}"
    img.save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    out = np.asarray(load_rgb(path), dtype=np.float64)
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 55
    with Image.open(path) as raw:
        assert oriented_size(raw) == (20, 40)


def test_saved_images_are_complete_and_readable_by_others(tmp_path):
    """Grids and demo images go through a temporary + rename; the result has the umask's mode, not 0600."""
    old = os.umask(0o022)
    try:
        atomic_save_image(Image.new("RGB", (8, 8), (200, 10, 10)), tmp_path / "sub" / "grid.png")
    finally:
        os.umask(old)
    out = tmp_path / "sub" / "grid.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]  # no temporary left beside it
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert Image.open(out).getpixel((0, 0)) == (200, 10, 10)
