"""Write webdataset shards from the built-in shapes dataset, a folder of images with .txt captions, or a
CSV/JSONL caption file, in upstream COSMOS's caption formats: FLAIR's presplit JSON (``--format flair``, the
default: the seven caption fields as lists of sentences) or PixelProse's (``--format pixelprose``).

Usage:
  python -m cosmos_fast.data.make_shards --out shards/ --source shapes --size 2000 [--split train]
  python -m cosmos_fast.data.make_shards --out shards/ --source folder --path images/
  python -m cosmos_fast.data.make_shards --out shards/ --source captions --path pairs.csv [--image-root DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from .shards import SHARD_FORMATS, CaptionFileDataset, iterate_folder, write_shards
from .synthetic import ShapesDataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cosmos_fast.data.make_shards",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", required=True, help="folder for the .tar shards")
    parser.add_argument("--source", choices=("shapes", "folder", "captions"), default="shapes")
    parser.add_argument("--path", help="the folder (--source folder) or the CSV/JSONL file (--source captions)")
    parser.add_argument("--image-root", help="root of the caption file's image paths (default: its folder)")
    parser.add_argument("--size", type=int, default=2000, help="samples of the shapes dataset")
    parser.add_argument("--split", default="train", help="split of the shapes dataset")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--format", choices=SHARD_FORMATS, default="flair",
                        help="caption JSON layout: flair (train with data.caption_mode=textcrop) or pixelprose "
                             "(data.caption_mode=textcrop_pixelprose)")
    args = parser.parse_args(argv)
    if args.max_count < 1:
        parser.error(f"--max-count must be at least 1, got {args.max_count}")
    if args.source != "shapes" and args.path is not None and not Path(args.path).exists():
        parser.error(f"--path {args.path} does not exist")
    if args.source == "folder" and args.path is not None and not Path(args.path).is_dir():
        parser.error(f"--source folder needs a folder as --path, got the file {args.path}")
    if args.source == "shapes":
        dataset = ShapesDataset(args.split, size=args.size, image_size=args.image_size, seed=args.seed)
        samples = (dataset[i] for i in range(len(dataset)))
        total = len(dataset)
    elif args.path is None:
        parser.error(f"--source {args.source} needs --path")
    elif args.source == "folder":
        samples, total = iterate_folder(args.path), None
    else:
        dataset = CaptionFileDataset(args.path, args.image_root)
        samples = (s for s in (dataset[i] for i in range(len(dataset))) if s is not None)
        total = len(dataset)
    shards = write_shards(tqdm(samples, total=total, desc="writing shards"), args.out, max_count=args.max_count,
                          shard_format=args.format)
    print(f"wrote {len(shards)} shards to {args.out}")


if __name__ == "__main__":
    main()
