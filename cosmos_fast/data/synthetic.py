"""The built-in dataset: generated pictures of coloured shapes with multi-sentence captions.

Needs nothing from outside, is deterministic by (seed, split, index), and carries class names, so the main
job can train and evaluate zero-shot retrieval and classification anywhere. Each image holds one to three
shapes; the largest one names the image's class (its shape), and the captions describe every object (colour,
size, position) and the background, one sentence each.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (20, 20, 20)}
SPLITS = {"train": 0, "heldout": 1}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # cross
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _position(cx: float, cy: float, size: int) -> str:
    vertical = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    horizontal = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    where = " ".join(w for w in (vertical, horizontal) if w)
    return f"at the {where}" if where else "in the center"


class ShapesDataset:
    """``len(ds)`` samples of ``{"key", "image" (PIL RGB), "raw_caption", "long_captions", "label"}``.

    Args:
        split: "train" or "heldout" (disjoint random streams).
        size: number of samples; image_size: side in pixels; seed: the dataset's seed.
    """

    classes = SHAPES

    def __init__(self, split: str = "train", size: int = 2000, image_size: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size <= 0 or image_size < 16:
            raise ValueError(f"size must be positive and image_size at least 16, got {size} and {image_size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        s = self.image_size
        background = rng.choice(list(BACKGROUNDS))
        image = Image.new("RGB", (s, s), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        objects = []
        for rank in range(rng.randint(1, 3)):
            large = rank == 0  # the first object is the largest: it names the class
            extent = rng.uniform(0.45, 0.6) * s if large else rng.uniform(0.15, 0.3) * s
            x0, y0 = rng.uniform(0, s - extent), rng.uniform(0, s - extent)
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            _draw(draw, shape, (int(x0), int(y0), int(x0 + extent), int(y0 + extent)), COLORS[color])
            objects.append((shape, color, "large" if large else "small",
                            _position(x0 + extent / 2, y0 + extent / 2, s)))
        sentences = [f"{_a(size)} {color} {shape} {where}" for shape, color, size, where in objects]
        sentences.append(f"the background is {background}")
        if len(objects) > 1:
            sentences.append(f"there are {len(objects)} shapes in the picture")
        main_shape, main_color = objects[0][0], objects[0][1]
        return {
            "key": f"{self.split}-{index:08d}",
            "image": image,
            "raw_caption": f"a picture of {_a(main_color)} {main_shape}",
            "long_captions": [". ".join(sentences) + "."],
            "label": SHAPES.index(main_shape),
        }
