"""Captions and metadata of image folders into the cache rows; caches that decode from any folder.

    python -m pytest tests/test_captions.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from conftest import make_photo
from latentvae import cli
from latentvae.cache import encode, verify_cache
from latentvae.errors import BadInputError, MissingInputError
from latentvae.options import EncodeOptions
from latentvae.sources import FolderImageSource, open_source, split_holdout


def cfg(vae, data, out, **kw) -> EncodeOptions:
    base = dict(resolution=32, batch_size=3, shard_size=4, num_workers=0, progress=False, mixed_precision="no")
    return EncodeOptions(vae=str(vae), data=str(data), out=str(out), **{**base, **kw})


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_photo(size=(40, 48), seed=seed).save(path)
    return path


def jsonl(path: Path, *rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def load_cache(out: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / f"hf-{out.name}"))


# ----------------------------------------------------------------------------- round trip
def test_metadata_files_and_sidecars_pass_through_into_the_cache_rows(vae_dir, tmp_path):
    d = tmp_path / "imgs"
    for k, name in enumerate(["a.png", "sub/b.png", "sub/c.png", "other/d.png", "other/deep/e.png", "f.png", "g.png"]):
        image(d / name, k)
    jsonl(d / "metadata.jsonl", {"file_name": "a.png", "text": "a cat", "score": 1, "tags": ["x", "y"]},
          {"file_name": "sub/b.png", "text": "b dog", "score": 2}, "",
          {"file_name": "g.png", "text": "g  "})  # agrees with g.caption, up to surrounding blanks
    (d / "sub" / "c.txt").write_text("c caption\n")
    (d / "g.caption").write_text("g")
    (d / "other" / "metadata.csv").write_text('file_name,text,score\nd.png,"d, quoted",4\ndeep/e.png,e bird,5\n')

    out = tmp_path / "cache"
    m = encode(cfg(vae_dir, d, out, flip=True))
    assert m["counts"]["rows"] == 14 and m["counts"]["failures"] == 0
    ds = load_cache(out)
    assert {"text", "score", "tags"} <= set(ds.column_names) and "file_name" not in ds.column_names
    assert ds.features["score"] == datasets.Value("int64") and ds.features["text"] == datasets.Value("string")
    got = {(Path(r["source_id"]).relative_to(d).as_posix(), r["flipped"]): (r["text"], r["score"], r["tags"])
           for r in ds}
    want = {"a.png": ("a cat", 1, ["x", "y"]), "sub/b.png": ("b dog", 2, None), "sub/c.png": ("c caption", None, None),
            "other/d.png": ("d, quoted", 4, None), "other/deep/e.png": ("e bird", 5, None),
            "f.png": (None, None, None), "g.png": ("g  ", None, None)}
    assert got == {(k, f): v for k, v in want.items() for f in (False, True)}

    # a plain folder keeps today's rows: no extra columns
    plain = tmp_path / "plain"
    image(plain / "x.png")
    encode(cfg(vae_dir, plain, tmp_path / "plain-cache"))
    assert "text" not in load_cache(tmp_path / "plain-cache").column_names


# ----------------------------------------------------------------------------- conflicts, malformed lines
def _twice_in_one(d):
    jsonl(d / "metadata.jsonl", {"file_name": "a.png", "text": "x"}, {"file_name": "./a.png", "text": "y"})


def _twice_in_two(d):
    jsonl(d / "metadata.jsonl", {"file_name": "sub/b.png"})
    jsonl(d / "sub" / "metadata.jsonl", {"file_name": "b.png"})


def _disagree(d):
    jsonl(d / "metadata.jsonl", {"file_name": "a.png", "text": "one"})
    (d / "a.txt").write_text("two")


def _both_sidecars(d):
    (d / "a.txt").write_text("one")
    (d / "a.caption").write_text("one")


def _bad_json(d):
    jsonl(d / "metadata.jsonl", {"file_name": "a.png"}, '{"file_name": "sub/b.png",')


def _no_file_name(d):
    jsonl(d / "sub" / "metadata.jsonl", {"text": "x"})


def _missing_file(d):
    jsonl(d / "metadata.jsonl", {"file_name": "a.png"}, {"file_name": "nope.png"})


def _csv_width(d):
    (d / "metadata.csv").write_text("file_name,text\na.png,x\nsub/b.png,y,z\n")


def _csv_no_file_name(d):
    (d / "metadata.csv").write_text("name,text\na.png,x\n")


CASES = {
    "twice in one file": (_twice_in_one, r"metadata\.jsonl, line 2: .*listed twice: also at .*metadata\.jsonl, line 1"),
    "twice in two files": (_twice_in_two, r"sub/metadata\.jsonl, line 1: .*listed twice: also at .*imgs/metadata\.jsonl, line 1"),
    "sidecar disagrees": (_disagree, r"metadata\.jsonl, line 1: text 'one' .* disagrees with its caption file .*a\.txt"),
    "both sidecars": (_both_sidecars, r"a\.txt and .*a\.caption, line 1: two captions"),
    "bad json": (_bad_json, r"metadata\.jsonl, line 2: not valid JSON"),
    "no file_name": (_no_file_name, r"sub/metadata\.jsonl, line 1: no file_name"),
    "missing file": (_missing_file, r"metadata\.jsonl, line 2: file_name 'nope\.png' .* does not exist"),
    "csv width": (_csv_width, r"metadata\.csv, line 3: 3 fields, but the header has 2"),
    "csv header": (_csv_no_file_name, r"metadata\.csv, line 1: no file_name column"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conflicts_and_malformed_lines_name_the_file_and_line(tmp_path, case):
    d = tmp_path / "imgs"
    image(d / "a.png")
    image(d / "sub" / "b.png", 1)
    make, pattern = CASES[case]
    make(d)
    src = open_source(str(d))
    assert isinstance(src, FolderImageSource)
    train, val = split_holdout(src, 1)  # training never reads the metadata: it still works
    assert len(train) + len(val) == 2
    with pytest.raises(BadInputError, match=pattern):
        src.passthrough()


def test_encode_refuses_bad_metadata_and_clashing_columns_before_writing(vae_dir, tmp_path):
    d = tmp_path / "imgs"
    image(d / "a.png")
    jsonl(d / "metadata.jsonl", {"file_name": "a.png", "flipped": True})
    with pytest.raises(BadInputError, match="clash with the cache's own columns"):
        encode(cfg(vae_dir, d, tmp_path / "c1"))
    jsonl(d / "metadata.jsonl", "{oops")
    with pytest.raises(BadInputError, match=r"metadata\.jsonl, line 1: not valid JSON"):
        encode(cfg(vae_dir, d, tmp_path / "c2"))
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


# ----------------------------------------------------------------------------- decode from anywhere
def test_decode_from_another_folder_and_a_moved_cache(vae_dir, tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    for k in range(3):
        image(proj / "imgs" / f"p{k}.png", k)
    jsonl(proj / "imgs" / "metadata.jsonl", {"file_name": "p0.png", "text": "zero"})
    shutil.copytree(vae_dir, proj / "vae")
    monkeypatch.chdir(proj)
    opts = cfg("vae", "imgs", "cache")  # every path relative
    m = encode(opts)
    assert m["source"]["data"] == "imgs" and m["vae"]["path"] == "vae"
    assert m["source"]["location"] == {"given": "imgs", "absolute": str(proj / "imgs"), "relative_to_cache": "../imgs"}
    assert m["vae"]["location"]["absolute"] == str(proj / "vae") and m["vae"]["location"]["relative_to_cache"] == "../vae"
    settings = json.loads((proj / "cache" / "encode-settings.json").read_text())
    assert "location" not in json.dumps(settings)  # what a resume compares is unchanged
    assert encode(opts)["this_run"]["rows_encoded"] == 0  # the same command still resumes

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli.main(["decode", str(proj / "cache"), "--limit", "2"])
    assert "over 2 rows" in capsys.readouterr().out

    # the cache, its images and its VAE moved together: found beside it
    moved = tmp_path / "moved"
    shutil.move(str(proj), str(moved))
    assert len(verify_cache(moved / "cache", limit=3)["samples"]) == 3

    # the images moved apart: the cache says where it looked; --data says where they are now
    shutil.move(str(moved / "imgs"), str(tmp_path / "pictures"))
    with pytest.raises(MissingInputError, match="pass --data"):
        verify_cache(moved / "cache", limit=1)
    shutil.move(str(moved / "vae"), str(tmp_path / "vae-copy"))
    with pytest.raises(MissingInputError, match="pass --vae"):
        verify_cache(moved / "cache", limit=1, data_path=str(tmp_path / "pictures"))
    cli.main(["decode", str(moved / "cache"), "--limit", "2", "--data", str(tmp_path / "pictures"),
              "--vae", str(tmp_path / "vae-copy")])
    assert "over 2 rows" in capsys.readouterr().out
    # other images at --data are still caught
    other = tmp_path / "other"
    for k in range(3):
        image(other / f"q{k}.png", k)
    with pytest.raises(BadInputError, match="no longer in its source"):  # other names
        verify_cache(moved / "cache", limit=3, data_path=str(other), vae_path=str(tmp_path / "vae-copy"))
    same_names = tmp_path / "same-names"
    for k in range(3):  # the same names, other pictures: caught by the recorded sha256
        image(same_names / f"p{k}.png", 10 + k)
    with pytest.raises(BadInputError, match="the source changed since it was encoded"):
        verify_cache(moved / "cache", limit=3, data_path=str(same_names), vae_path=str(tmp_path / "vae-copy"))



def test_a_manifest_without_locations_still_decodes(vae_dir, tmp_path):
    """Caches written before the location records: the manifest's paths as given, as before."""
    d = tmp_path / "imgs"
    image(d / "a.png")
    out = tmp_path / "cache"
    encode(cfg(vae_dir, d, out))
    m = json.loads((out / "manifest.json").read_text())
    del m["vae"]["location"], m["source"]["location"], m["cache"]
    (out / "manifest.json").write_text(json.dumps(m))
    assert len(verify_cache(out, limit=1)["samples"]) == 1


def test_a_saved_dataset_decodes_from_another_folder(vae_dir, tmp_path, monkeypatch):
    items = {"image": [make_photo(size=(40, 40), seed=i) for i in range(3)], "caption": ["a", "b", "c"]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(items, features=features).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.chdir(tmp_path)
    m = encode(cfg(vae_dir, "ds", "cache"))
    assert m["source"]["location"]["absolute"] == str(tmp_path / "ds")
    (tmp_path / "away").mkdir()
    monkeypatch.chdir(tmp_path / "away")
    assert len(verify_cache(tmp_path / "cache", limit=3)["samples"]) == 3


def test_a_hub_vae_is_named_by_its_repo_and_recorded_commit(tmp_path):
    from latentvae.cache.verify import cache_vae_spec
    loc = {"given": "org/name[variant=fp16]", "kind": "hub", "repo_id": "org/name", "revision": "a" * 40}
    assert cache_vae_spec(tmp_path, {"vae": {"path": "org/name", "location": loc}}) == \
        f"org/name[variant=fp16,revision={'a' * 40}]"
    assert cache_vae_spec(tmp_path, {"vae": {"path": "old/path"}}) == "old/path"
