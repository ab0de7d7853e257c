"""A PNG grid of one sample's crops and captions, to look at what the augmentation does.

Usage: python -m cosmos_fast.data.preview --out crops.png [--index 0] [--seed 0] [--image-size 224]
(the built-in shapes dataset; crops at the COSMOS sizes 224 / 96 px scaled from --image-size).
"""
from __future__ import annotations

import argparse
import random
import textwrap

import torch

from .augment import CLIP_MEAN, CLIP_STD, MultiCrop
from .synthetic import ShapesDataset
from .text import crop_text, sentence_pool


def render(sample: dict, crops: list[torch.Tensor], captions: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("the preview needs matplotlib: pip install matplotlib") from exc
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    fig, axes = plt.subplots(2, 5, figsize=(16, 7), gridspec_kw={"hspace": 0.35})
    axes[0, 0].imshow(sample["image"])
    axes[0, 0].set_title("original", fontsize=9)
    cells = [ax for row in axes for ax in row][1:]
    for i, (ax, crop, caption) in enumerate(zip(cells, crops, captions)):
        ax.imshow((crop * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        kind = "global" if i < 2 else "local"
        ax.set_title(f"{kind} crop {i + 1} ({crop.shape[-1]} px)\n" + "\n".join(textwrap.wrap(caption, 38)),
                     fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    axes[1, 4].set_visible(False)
    # above the tallest caption (a global crop may have five sentences); bbox_inches="tight" keeps it in
    fig.suptitle(f"{sample['key']}: 2 global + 6 local crops with their 8 captions", fontsize=11, y=1.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cosmos_fast.data.preview",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    sample = ShapesDataset("train", size=args.index + 1, image_size=args.image_size, seed=args.seed)[args.index]
    torch.manual_seed(args.seed)
    crops = MultiCrop(args.image_size, max(16, args.image_size * 96 // 224))(sample["image"])
    captions = crop_text(sentence_pool(sample["raw_caption"], sample["long_captions"]), random.Random(args.seed))
    render(sample, crops, captions, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
