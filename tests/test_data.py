"""Built-in dataset, multi-crop and text-crop augmentation, and the preview command."""
import math
import random

import pytest
import torch

from cosmos_fast.data import MultiCrop, ShapesDataset, collate_views, crop_text, sentence_pool
from cosmos_fast.data import preview
from cosmos_fast.data.augment import CLIP_STD, GaussianBlur


def test_shapes_dataset_is_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", size=20, seed=3), ShapesDataset("train", size=20, seed=3)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["raw_caption"] == y["raw_caption"] and x["long_captions"] == y["long_captions"]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert 0 <= x["label"] < len(ShapesDataset.classes)
        assert ShapesDataset.classes[x["label"]] in x["raw_caption"]
    heldout = ShapesDataset("heldout", size=20, seed=3)
    assert [heldout[i]["image"].tobytes() for i in range(5)] != [a[i]["image"].tobytes() for i in range(5)]
    labels = {a[i]["label"] for i in range(20)}
    assert len(labels) >= 3  # the classes are actually mixed
    with pytest.raises(IndexError):
        a[20]
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset("test")


@pytest.mark.parametrize("global_size,local_size", [(64, 32), (224, 96)])
def test_multicrop_counts_sizes_dtypes(global_size, local_size):
    torch.manual_seed(0)  # the crops are random: one inside a flat gray region has no value above 0.5
    image = ShapesDataset(size=1, image_size=global_size)[0]["image"]
    crops = MultiCrop(global_size, local_size)(image)
    assert len(crops) == 8
    assert [tuple(c.shape) for c in crops] == [(3, global_size, global_size)] * 2 + [(3, local_size, local_size)] * 6
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    assert crops[0].abs().max() > 0.5  # normalised, not left in [0, 1] or uint8


def test_pil_and_uint8_tensor_images_get_the_same_augmentation():
    """A PIL image is augmented with PIL's kernels, a uint8 tensor with torch's; from one seed both draw the same
    crops, flips, jitter factors, blurs and solarisations, so they differ by rounding and PIL's approximate blur."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    image = ShapesDataset(size=1, image_size=64)[0]["image"]
    multicrop = MultiCrop(64, 32)
    max_err, mean_err = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        from_pil = multicrop(image)
        torch.manual_seed(seed)
        from_tensor = multicrop(pil_to_tensor(image))
        max_err += [(a - b).abs().max().item() for a, b in zip(from_pil, from_tensor)]
        mean_err += [(a - b).abs().mean().item() for a, b in zip(from_pil, from_tensor)]
    level = 1 / 255 / min(CLIP_STD)  # one 8-bit pixel level after normalisation
    # PIL's blur is a box-filter approximation of the Gaussian (up to 15 levels off at a sharp edge, below),
    # which the colour jitter after it can stretch
    assert max(max_err) < 48 * level and sum(mean_err) / len(mean_err) < 2 * level
    torch.manual_seed(99)  # other draws differ far more: the agreement above is not that of any two crops
    other = multicrop(image)
    assert sum((a - b).abs().mean().item() for a, b in zip(other, from_pil)) / 8 > 10 * level


def gaussian_blur_reference(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """float64 Gaussian blur of [C, H, W], reflect padding, the kernel cut at 6 sigma (the tail is below 1e-8)."""
    radius = math.ceil(6 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = torch.nn.functional.pad(image.double()[None], [radius] * 4, mode="reflect")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_blur_is_the_gaussian_of_the_drawn_sigma(seed):
    """The tensor path is the Gaussian (cut at 3 sigma); PIL's box-filter approximation is close to it."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    image = ShapesDataset(size=1, image_size=64)[0]["image"]
    blur = GaussianBlur((0.5, 2.0))
    torch.manual_seed(seed)
    sigma = torch.empty(1).uniform_(0.5, 2.0).item()
    reference = gaussian_blur_reference(pil_to_tensor(image), sigma)
    torch.manual_seed(seed)
    from_tensor = blur(pil_to_tensor(image).float())
    # the kernel's cut at 3 sigma: under 0.25 of a level (a sigma 1% off is twice that at the shapes' edges)
    assert (from_tensor.double() - reference).abs().max() < 0.25
    torch.manual_seed(seed)
    from_pil = pil_to_tensor(blur(image)).double()
    assert (from_pil - reference).abs().mean() < 0.5 and (from_pil - reference).abs().max() < 16
    assert (pil_to_tensor(image).double() - reference).abs().max() > 25  # it does blur the shapes' edges
    with pytest.raises(ValueError, match="sigma must be a range"):
        GaussianBlur((2.0, 1.0))


def test_sentence_pool_and_fallback():
    pool = sentence_pool("A dog runs.", ["The dog is brown. It runs fast.\nThe sky is blue.", "A dog runs"])
    assert pool == ["A dog runs", "The dog is brown", "It runs fast", "The sky is blue"]
    assert sentence_pool("...", []) == ["..."]  # nothing usable: the raw caption itself
    assert sentence_pool("", []) == []
    # one long caption as a plain string is one text, not a sequence of one-letter sentences
    assert sentence_pool("A cat.", "A dog sits. It waits") == ["A cat", "A dog sits", "It waits"]
    with pytest.raises(TypeError, match="raw_caption must be a string"):
        sentence_pool(["A cat."], [])


def test_bad_data_input_names_the_argument():
    with pytest.raises(TypeError, match="pool must be a list of sentences"):
        crop_text("a cat", random.Random(0))  # would crop single letters
    with pytest.raises(ValueError, match="collate_views got no examples"):
        collate_views([None, None])
    with pytest.raises(TypeError, match="image must be a PIL image or a uint8 tensor"):
        MultiCrop(32, 16)(torch.rand(3, 40, 40))


def test_text_crops_counts_and_determinism():
    pool = [f"sentence {i}" for i in range(10)]
    crops = crop_text(pool, random.Random(5))
    assert crops == crop_text(pool, random.Random(5))
    assert crops != crop_text(pool, random.Random(6))
    assert len(crops) == 8
    for caption in crops[:2]:
        parts = caption.split(". ")
        assert 1 <= len(parts) <= 5 and len(set(parts)) == len(parts)  # without replacement
    locals_ = crops[2:]
    assert all(c in pool for c in locals_) and len(set(locals_)) == 6
    small = crop_text(["only one", "two"], random.Random(0))
    assert sorted(set(small[2:])) == ["only one", "two"]  # repeats only because the pool is too small
    with pytest.raises(ValueError, match="at least one sentence"):
        crop_text([], random.Random(0))


def test_preview_writes_a_png(tmp_path):
    out = tmp_path / "crops.png"
    preview.main(["--out", str(out), "--image-size", "64"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
