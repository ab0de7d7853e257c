"""Upstream COSMOS's training data: FLAIR/DreamLIP presplit caption JSON (the seven fields, lists of sentences) and
PixelProse's, read into upstream's text-crop pool and cropped as upstream's ``sample_dict`` crops; shards in both
formats; samples whose captions are unusable skipped with a warning naming shard and key."""
import io
import json
import random
import tarfile
import warnings

import pytest
from PIL import Image

from cosmos_fast.data import ShapesDataset, caption_pool, crop_text, make_shards, sample_sentences, split_caption
from cosmos_fast.data.shards import SkipCounter, decode_sample, shard_stream, write_shards

# one sample as FLAIR's presplit step leaves it (src: ExplainableML/flair preprocess/presplit_captions.py)
FLAIR_SAMPLE = {
    "raw_caption": ["a dog on a beach"],
    "shortIB_captions": ["A dog runs on the sand"],
    "shortSV_captions": ["A brown dog at the sea"],
    "shortLLA_captions": ["Dog running"],
    "longIB_captions": ["The image shows a brown dog running on a sandy beach", "The sea is calm"],
    "longSV_captions": ["A dog is in the foreground", "Waves are in the background", "The sky is blue"],
    "longLLA_captions": ["The dog is brown", "The sea is calm"],
    "url": "http://example.com/1.jpg", "key": "000000039",
}
# upstream's textcrop pool: the seven lists concatenated in sample_dict's order, duplicates kept
FLAIR_POOL = ["a dog on a beach", "A dog runs on the sand", "A brown dog at the sea", "Dog running",
              "The image shows a brown dog running on a sandy beach", "The sea is calm", "A dog is in the foreground",
              "Waves are in the background", "The sky is blue", "The dog is brown", "The sea is calm"]
PIXELPROSE_SAMPLE = {"original_caption": "Dog at the beach.",
                     "caption": "This image displays a dog.</s>The dog is brown. It runs\n\nThe sea is calm.  ",
                     "uid": "abc"}
PIXELPROSE_POOL = ["Dog at the beach.", "This image displays a dog", "The dog is brown", "It runs", "The sea is calm"]


def upstream_textcrop(captions_list, k, rng):
    """upstream's sample_dict(mode='textcrop') and random_sample_from_list, transcribed, with ``rng`` for the
    random module."""
    def random_sample_from_list(pool, num):
        n = len(pool)
        if n >= num:
            return rng.sample(pool, num)
        return num // n * pool + rng.sample(pool, num % n)

    global_nums = [rng.randint(1, 5) for _ in range(2)]
    global_captions = [". ".join(random_sample_from_list(captions_list, num)) for num in global_nums]
    return global_captions + random_sample_from_list(captions_list, k - 2)


def test_textcrop_pool_and_crops_are_upstreams():
    assert caption_pool(FLAIR_SAMPLE, "textcrop") == FLAIR_POOL
    for seed in range(20):  # the same Random state gives upstream's eight captions
        assert crop_text(FLAIR_POOL, random.Random(seed)) == upstream_textcrop(FLAIR_POOL, 8, random.Random(seed))
    small = ["one", "two", "three"]  # smaller than asked for: repeated whole, then topped up
    for seed in range(10):
        assert crop_text(small, random.Random(seed)) == upstream_textcrop(small, 8, random.Random(seed))
        picked = sample_sentences(small, 7, random.Random(seed))
        assert picked[:6] == small + small and picked[6] in small


def test_fields_as_strings_missing_or_malformed():
    """A field still holding a string is split as FLAIR's presplit splits it; a missing field holds no sentence;
    a field of the wrong type, or no sentence at all, is a ValueError naming the fields."""
    unsplit = dict(FLAIR_SAMPLE, raw_caption="a dog on a beach. It runs</s>fast\n", longSV_captions=None)
    assert caption_pool(unsplit, "textcrop")[:3] == ["a dog on a beach", "It runs", "fast"]
    assert split_caption(" A.B </s> C\n\nD. ") == ["A", "B", "C", "D"]
    only_raw = {"raw_caption": ["a cat"]}
    assert caption_pool(only_raw, "textcrop") == ["a cat"]
    with pytest.raises(ValueError, match=r"caption field 'shortIB_captions' must be a list of strings or a string, "
                                         r"got list \[1, 2\]"):
        caption_pool(dict(FLAIR_SAMPLE, shortIB_captions=[1, 2]), "textcrop")
    with pytest.raises(ValueError, match="no caption sentence in the fields of caption mode 'textcrop'"):
        caption_pool({"url": "x", "raw_caption": []}, "textcrop")
    with pytest.raises(ValueError, match="no caption sentence .* 'textcrop_pixelprose'"):
        caption_pool(FLAIR_SAMPLE, "textcrop_pixelprose")
    with pytest.raises(ValueError, match="mode must be one of"):
        caption_pool(FLAIR_SAMPLE, "random")


def test_pixelprose_pool():
    """[original_caption] + the caption split on newline, </s> and '.' (upstream's split_caption)."""
    assert caption_pool(PIXELPROSE_SAMPLE, "textcrop_pixelprose") == PIXELPROSE_POOL
    with pytest.raises(ValueError, match="'original_caption' must be a string"):
        caption_pool({"original_caption": ["x"], "caption": "y"}, "textcrop_pixelprose")


def test_shards_in_both_formats_read_back_as_upstreams_pools(tmp_path):
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    samples = [{"key": "s0", "image": image, "json": FLAIR_SAMPLE}, {"key": "s1", "image": image,
                                                                       "json": dict(FLAIR_SAMPLE, raw_caption=["x"])}]
    (flair,) = write_shards(samples, tmp_path / "flair")
    got = {s["key"]: s["pool"] for s in shard_stream(str(flair))}
    assert got == {"s0": FLAIR_POOL, "s1": ["x"] + FLAIR_POOL[1:]}
    (prose,) = write_shards([{"key": "p", "image": image, "json": PIXELPROSE_SAMPLE}], tmp_path / "prose")
    assert [s["pool"] for s in shard_stream(str(prose), caption_mode="textcrop_pixelprose")] == [PIXELPROSE_POOL]
    # make_shards writes both formats from our own data: FLAIR's seven lists, PixelProse's two strings
    make_shards.main(["--out", str(tmp_path / "f"), "--size", "3", "--image-size", "16"])
    make_shards.main(["--out", str(tmp_path / "p"), "--size", "3", "--image-size", "16", "--format", "pixelprose"])
    with tarfile.open(tmp_path / "f" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert sorted(meta) == sorted(["raw_caption", "shortIB_captions", "shortSV_captions", "shortLLA_captions",
                                   "longIB_captions", "longSV_captions", "longLLA_captions"])
    assert all(isinstance(v, list) for v in meta.values())
    shapes = ShapesDataset("train", size=3, image_size=16)[0]
    expected = split_caption(shapes["raw_caption"]) + split_caption(shapes["long_captions"][0])
    assert next(iter(shard_stream(str(tmp_path / "f" / "shard-000000.tar"))))["pool"] == expected
    prose_pool = next(iter(shard_stream(str(tmp_path / "p" / "shard-000000.tar"), caption_mode="textcrop_pixelprose")))
    assert prose_pool["pool"] == [shapes["raw_caption"]] + split_caption(shapes["long_captions"][0])


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bad_caption_shard(path):
    """Good samples around four whose captions cannot be used: a list of numbers, a JSON without caption fields,
    neither json nor txt, and a JSON cut short."""
    with tarfile.open(path, "w") as tar:
        for key, meta in (("good0", FLAIR_SAMPLE), ("numbers", dict(FLAIR_SAMPLE, raw_caption=[3, 4])),
                          ("nofields", {"url": "http://x", "status": "success"}), ("good1", FLAIR_SAMPLE)):
            _add(tar, f"{key}.jpg", _jpeg())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
        _add(tar, "bare.jpg", _jpeg())
        _add(tar, "cut.jpg", _jpeg())
        _add(tar, "cut.json", b'{"raw_caption": ["a dog')
        _add(tar, "good2.jpg", _jpeg())
        _add(tar, "good2.json", json.dumps(FLAIR_SAMPLE).encode())
    return path


def test_unusable_captions_are_skipped_and_named(tmp_path):
    shard = bad_caption_shard(tmp_path / "mixed-000000.tar")
    counter = SkipCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [s["key"] for s in shard_stream(str(shard), handler=counter)]
    assert keys == ["good0", "good1", "good2"] and counter.skipped == 4
    messages = [str(w.message) for w in caught if str(w.message).startswith("skipped")]
    assert len(messages) == 4 and all(str(shard) in m for m in messages)  # each names the shard
    for key, words in (("numbers", "'raw_caption' must be a list of strings"), ("nofields", "no caption sentence"),
                       ("bare", "has no caption (neither json nor txt)"), ("cut", "is unreadable: JSONDecodeError")):
        assert any(f"sample '{key}' of {shard}" in m and words in m for m in messages), key


def test_decode_names_what_is_missing():
    with pytest.raises(ValueError, match=r"sample 'k' of s.tar has no image .*it has \['json'\]"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "json": b"{}"})
    sample = decode_sample({"__key__": "t", "jpg": _jpeg(), "txt": b"A cat. It sleeps\n"})
    assert sample["pool"] == ["A cat", "It sleeps"]
