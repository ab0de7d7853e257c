"""Multi-crop image augmentation (DINO style, the probabilities of ``cosmos.md``) with torchvision transforms v2."""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

# OpenAI CLIP normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_model_input() -> T.Compose:
    """PIL image or uint8 tensor -> CLIP-normalised float32 [3, H, W], unaugmented (evaluation)."""
    return T.Compose([T.ToImage(), *_normalise()])


def _normalise() -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


class GaussianBlur(torch.nn.Module):
    """Gaussian blur with a standard deviation drawn from U(sigma) px per call, as in DINO's multi-crop
    (``cosmos.md``).

    A PIL image gets PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, DINO's own call: a box-filter approximation
    (within 15 levels of the exact blur at a sharp edge) whose cost does not grow with sigma. A uint8 or float
    tensor [..., H, W] gets torchvision's exact kernel, cut at 3 sigma. sigma comes from torch's generator, as in
    ``torchvision.transforms.v2.GaussianBlur``, whose fixed kernel of 10% of the crop (23 x 23 taps at 224 px)
    had taken a third of the augmentation's time.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be a range (low, high) with 0 < low <= high, got {sigma}")
        self.sigma = sigma

    def forward(self, image):
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        # reflect padding needs fewer than H (W) pixels on each side
        size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(image.shape[-2:]) - 1)
        return TF.gaussian_blur(image, [size, size], [sigma, sigma])


def _blur(p: float):
    return T.RandomApply([GaussianBlur()], p=p)


class MultiCrop:
    """PIL image or uint8 tensor [3, H, W] -> list of ``2 + n_local`` float32 tensors, CLIP-normalised: two global
    crops [3, global_size, global_size], then the local crops [3, local_size, local_size].

    Global crop 1: scale (0.4, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=1
    (sigma 0.1-2 px, ``GaussianBlur``).
    Global crop 2: the same with blur p=0.1 and solarize p=0.2. Local crops: scale (0.05, 0.4), blur p=0.5.
    Bicubic resizing throughout. Sizes default to COSMOS's 224 / 96 px.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 6,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
        flip_and_color = [
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        # a PIL image stays one until the end: PIL's C kernels are faster than torch's on one small image (48 px:
        # 30-45%, 224 px: 15% less time per sample on one core) and are what upstream (DINO, COSMOS) augments with
        finish = [T.ToImage(), *_normalise()]

        def crop(size, scale):
            return [T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)]

        self.global1 = T.Compose(crop(global_size, global_scale) + flip_and_color + [_blur(1.0)]
                                 + finish)
        self.global2 = T.Compose(crop(global_size, global_scale) + flip_and_color + [_blur(0.1),
                                 T.RandomSolarize(threshold=128, p=0.2)] + finish)
        self.local = T.Compose(crop(local_size, local_scale) + flip_and_color + [_blur(0.5)] + finish)
        self.n_local = n_local

    def __call__(self, image) -> list[torch.Tensor]:
        # the solarize threshold (128) and the colour ops' ranges are those of 8-bit pixels
        if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
            raise TypeError(f"image must be a PIL image or a uint8 tensor [3, H, W], got a {image.dtype} tensor")
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


# ALBEF's RandomAugment op list, which SIMLA pre-trains with (dataset/__init__.py), as timm's RandAugment ops
SIMLA_RANDAUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                         "TranslateX", "TranslateY", "Rotate")


def _identity(image):
    return image


def simla_augmentation(size: int, randaugment: bool = True) -> T.Compose:
    """SIMLA's pre-training augmentation: RandomResizedCrop(size, scale 0.2-1, bicubic), horizontal flip,
    RandAugment with 2 ops of magnitude 7 (ALBEF's ten ops, each applied with probability 0.5: translation by
    7 px, rotation by 21 degrees, shears of 0.21, enhancement factors 0.64 / 1.36, grey fill), CLIP normalisation.
    PIL image -> float32 [3, size, size]. The ops draw from Python's and NumPy's global generators (timm's)."""
    from timm.data.auto_augment import AugmentOp, RandAugment

    ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
           T.RandomHorizontalFlip()]
    if randaugment:
        hparams = {"translate_const": 10, "img_mean": (128, 128, 128), "interpolation": Image.BILINEAR}
        chosen = [_identity if name == "Identity" else AugmentOp(name, prob=0.5, magnitude=7, hparams=hparams)
                  for name in SIMLA_RANDAUGMENT_OPS]
        ops.append(RandAugment(chosen, num_layers=2))
    return T.Compose(ops + [T.ToImage(), *_normalise()])
