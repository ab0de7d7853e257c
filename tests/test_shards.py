"""webdataset round trip through make_shards, corrupt samples, CSV/JSONL caption files."""
import io
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from cosmos_fast.data import ShapesDataset, make_shards, split_caption
from cosmos_fast.data.shards import (CaptionFileDataset, SkipCounter, captions_of, collate_skip_none,
                                     shard_key, shard_stream)


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
        # written in FLAIR's format: the raw caption's sentences, then the long caption's (in longIB_captions)
        assert got["pool"] == split_caption(want["raw_caption"]) + split_caption(want["long_captions"][0])
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
    # a string field is split as FLAIR's presplit would; a list is taken as it is
    assert samples[0]["pool"] == ["a red square", "It is red. It is small."] and samples[1]["pool"] == ["a plain caption"]
    assert counter.skipped == 2
    messages = [str(w.message) for w in caught if str(w.message).startswith("skipped")]
    assert len(messages) == 2 and "'b'" in messages[0] and "'c'" in messages[1]  # the warnings name the keys


def test_caption_files_and_missing_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    (tmp_path / "pairs.csv").write_text("image,caption\none.png,a black square\nmissing.png,gone\n")
    dataset = CaptionFileDataset(tmp_path / "pairs.csv")
    assert dataset[0]["captions"] == ["a black square"]
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
    assert [(s["key"], s["pool"]) for s in samples] == [
        ("img0", ["a red square", "It fills the picture"]), ("img1", ["a blue square", "It fills the picture"])]
    with pytest.raises(SystemExit):
        make_shards.main(["--out", str(tmp_path / "x"), "--source", "folder"])  # --path is required


def test_keys_with_dots_and_slashes_read_back(tmp_path):
    """A caption file's key is the image's relative path: written as is, 'images/0.jpg' came back as key 'images/0'
    with extension 'jpg.jpg', no image, and every sample was skipped."""
    (tmp_path / "images").mkdir()
    for name, color in (("0.jpg", "red"), ("b.v2.png", "blue"), ("0_jpg.png", "green")):
        Image.new("RGB", (8, 8), color).save(tmp_path / "images" / name)
        (tmp_path / "images" / name).with_suffix(".txt").write_text(f"a {color} square")
    rows = "".join(f"images/{n},a {c} square\n" for n, c in (("0.jpg", "red"), ("b.v2.png", "blue"),
                                                               ("0_jpg.png", "green")))
    (tmp_path / "pairs.csv").write_text("image,caption\n" + rows)
    make_shards.main(["--out", str(tmp_path / "shards"), "--source", "captions", "--path", str(tmp_path / "pairs.csv")])
    samples = list(shard_stream(str(tmp_path / "shards" / "shard-000000.tar")))
    assert [(s["key"], s["pool"][0]) for s in samples] == [
        ("images_0_jpg", "a red square"), ("images_b_v2_png", "a blue square"),
        ("images_0_jpg_png", "a green square")]
    # a folder source keys by the file's stem, which may hold dots too
    make_shards.main(["--out", str(tmp_path / "folder"), "--source", "folder", "--path", str(tmp_path / "images")])
    keys = [s["key"] for s in shard_stream(str(tmp_path / "folder" / "shard-000000.tar"))]
    assert sorted(keys) == ["0", "0_jpg", "b_v2"]
    written = set()  # two keys that sanitise alike stay apart
    assert [shard_key(k, written) for k in ("a.b", "a_b", "a/b")] == ["a_b", "a_b_1", "a_b_2"]


def test_make_shards_refuses_what_would_write_nothing_useful(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no samples to write"):
        make_shards.main(["--out", str(tmp_path / "out"), "--source", "folder", "--path", str(tmp_path / "empty")])
    assert list((tmp_path / "out").glob("*.tar")) == []  # no empty shard left behind
    for argv in (["--source", "folder", "--path", str(tmp_path / "nope")], ["--max-count", "0"]):
        with pytest.raises(SystemExit):
            make_shards.main(["--out", str(tmp_path / "x")] + argv)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        make_shards.main(["--out", str(tmp_path / "file"), "--size", "2", "--image-size", "16"])


def test_a_stream_of_only_unreadable_samples_ends_with_an_error(tmp_path):
    """Resampled shards with nothing readable used to be drawn forever (the trainer sat at step 0)."""
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            _add(tar, f"s{i}.jpg", b"not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="10 samples in a row could not be read"):
            next(iter(shard_stream(str(path), resampled=True, handler=SkipCounter(limit=10))))
