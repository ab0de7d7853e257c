"""The built-in dataset: generated pictures of coloured shapes with multi-sentence captions.

Needs nothing from outside, is deterministic by (seed, split, index), and carries class names, so the main
job can train and evaluate zero-shot retrieval and classification anywhere. Each image holds one large shape,
which names the image's class, and up to two small distractor shapes where there is room beside it; the captions
describe every object and the background, one short sentence per fact, the large shape's own sentences leading
with it.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (20, 20, 20)}
SPLITS = {"train": 0, "heldout": 1}
# sides as fractions of the image: the class shape fills most of it, so that which patches it covers, not only
# its colour, is plain to a small ViT with 8 px patches at 48 px; distractors fit in the margin only now and then
MAIN_EXTENT = (0.65, 0.9)
DISTRACTOR_EXTENT = (0.15, 0.25)
MAX_DISTRACTORS = 2
# per-pixel classes of the masks, each with its text queries (zero-shot segmentation of the held-out split)
SEGMENTATION_CLASSES = [["background", "white background", "gray background", "black background"]] + [
    [shape, f"a {shape}"] for shape in SHAPES]


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
    """``len(ds)`` samples of ``{"key", "image" (PIL RGB), "raw_caption", "long_captions", "label", "mask"}``:
    ``label`` the class shape's index, ``mask`` a PIL "L" image of per-pixel classes, 0 for the background and
    1 + the shape's index for every shape drawn (``SEGMENTATION_CLASSES``).

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
        mask = Image.new("L", (s, s), 0)
        draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        main_shape, main_color = rng.choice(SHAPES), rng.choice(list(COLORS))
        extent = rng.uniform(*MAIN_EXTENT) * s
        x0, y0 = rng.uniform(0, s - extent), rng.uniform(0, s - extent)
        main_box = (x0, y0, x0 + extent, y0 + extent)
        _draw(draw, main_shape, tuple(map(int, main_box)), COLORS[main_color])
        _draw(draw_mask, main_shape, tuple(map(int, main_box)), 1 + SHAPES.index(main_shape))
        distractors = []
        for _ in range(rng.randint(0, MAX_DISTRACTORS)):
            # beside the class shape, never over it (a few tries; none fits: one distractor fewer), so its
            # outline stays whole and every shape the captions name is visible
            e = rng.uniform(*DISTRACTOR_EXTENT) * s
            for _ in range(10):
                box = (x := rng.uniform(0, s - e), y := rng.uniform(0, s - e), x + e, y + e)
                if box[2] <= main_box[0] or box[0] >= main_box[2] or box[3] <= main_box[1] or box[1] >= main_box[3]:
                    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
                    _draw(draw, shape, tuple(map(int, box)), COLORS[color])
                    _draw(draw_mask, shape, tuple(map(int, box)), 1 + SHAPES.index(shape))
                    distractors.append((shape, color, _position(x + e / 2, y + e / 2, s)))
                    break
        # shape alone, colour and place in sentences of their own: a one-sentence text crop often names just
        # the shape, so matching captions needs the shape, not only the colours, which a patch shows at once
        sentences = [f"the large shape is {_a(main_shape)}", f"the {main_shape} is {main_color}",
                     f"the {main_shape} is {_position(x0 + extent / 2, y0 + extent / 2, s)}"]
        sentences += [f"a small {color} {shape} {where}" for shape, color, where in distractors]
        sentences.append(f"the background is {background}")
        return {
            "key": f"{self.split}-{index:08d}",
            "image": image,
            "raw_caption": f"a picture of {_a(main_color)} {main_shape}",
            "long_captions": [". ".join(sentences) + "."],
            "label": SHAPES.index(main_shape),
            "mask": mask,
        }
