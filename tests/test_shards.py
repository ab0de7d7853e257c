"""webdataset round trip through make_shards, corrupt samples, CSV/JSONL caption files."""
import io
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from cosmos_fast.data import ShapesDataset, make_shards
from cosmos_fast.data.shards import (CaptionFileDataset, SkipCounter, captions_of, collate_skip_none,
                                     shard_stream)


def _identity(batch):
    return batch


def test_round_trip_with_two_workers(tmp_path):
    make_shards.main(["--out", str(tmp_path), "--size", "30", "--max-count", "7", "--image-size", "32"])
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert len(shards) == 5
    loader = torch.utils.data.DataLoader(shard_stream(shards), batch_size=None, num_workers=2,
                                         collate_fn=_identity)
    samples = list(loader)
    expected = ShapesDataset("train", size=30, image_size=32)
    assert sorted(s["key"] for s in samples) == [expected[i]["key"] for i in range(30)]  # each exactly once
    by_key = {s["key"]: s for s in samples}
    for i in (0, 13, 29):
        got, want = by_key[expected[i]["key"]], expected[i]
        assert got["raw_caption"] == want["raw_caption"] and got["long_captions"] == want["long_captions"]
        assert got["image"].size == (32, 32) and got["image"].mode == "RGB"


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good, format="JPEG")
    path = tmp_path / "mixed-000000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", good.getvalue())
        _add(tar, "a.json", b'{"raw_caption": "a red square", "longIB_captions": ["It is red. It is small."]}')
        _add(tar, "b.jpg", b"this is not a jpeg")
        _add(tar, "b.txt", b"broken")
        _add(tar, "c.png", b"\x89PNG truncated")
        _add(tar, "d.jpg", good.getvalue())
        _add(tar, "d.txt", b"a plain caption")
    counter = SkipCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(shard_stream(str(path), handler=counter))
    assert [s["key"] for s in samples] == ["a", "d"]
    assert samples[0]["long_captions"] == ["It is red. It is small."] and samples[1]["raw_caption"] == "a plain caption"
    assert counter.skipped == 2
    messages = [str(w.message) for w in caught if str(w.message).startswith("skipped")]
    assert len(messages) == 2 and "'b'" in messages[0] and "'c'" in messages[1]  # the warnings name the keys


def test_caption_files_and_missing_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    (tmp_path / "pairs.csv").write_text("image,caption\none.png,a black square\nmissing.png,gone\n")
    dataset = CaptionFileDataset(tmp_path / "pairs.csv")
    assert dataset[0]["raw_caption"] == "a black square"
    with pytest.warns(UserWarning, match="skipped sample 'missing.png'"):
        assert dataset[1] is None
    assert dataset.skipped == 1
    assert [s["key"] for s in collate_skip_none([dataset[0], None])] == ["one.png"]
    (tmp_path / "pairs.jsonl").write_text('{"image": "one.png", "raw_caption": "x", "longSV_captions": ["y. z"]}\n')
    row = CaptionFileDataset(tmp_path / "pairs.jsonl")[0]
    assert (row["raw_caption"], row["long_captions"]) == ("x", ["y. z"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionFileDataset(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="has no rows"):
        CaptionFileDataset(tmp_path / "empty.csv")


def test_captions_of_dreamlip_fields():
    raw, longs = captions_of({"raw_caption": "r", "longIB_captions": ["a", "b"], "longSV_captions": "c", "x": 1})
    assert raw == "r" and longs == ["a", "b", "c"]


def test_make_shards_from_a_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (16, 16), color).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a {color} square\nIt fills the picture.\n")
    make_shards.main(["--out", str(tmp_path / "shards"), "--source", "folder", "--path", str(images)])
    samples = list(shard_stream(str(tmp_path / "shards" / "shard-000000.tar")))
    assert [(s["key"], s["raw_caption"], s["long_captions"]) for s in samples] == [
        ("img0", "a red square", ["It fills the picture."]), ("img1", "a blue square", ["It fills the picture."])]
    with pytest.raises(SystemExit):
        make_shards.main(["--out", str(tmp_path / "x"), "--source", "folder"])  # --path is required
