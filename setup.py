"""Build script for cosmos_fast.

The package is Python plus Triton kernels. The CUDA extension in csrc/ (module
cosmos_fast._C) is optional: it is built here when torch sees a CUDA device and
nvcc is installed (COSMOS_FAST_BUILD_CUDA=1 forces it, =0 skips it), and is
otherwise JIT-compiled on first use; every op also has Triton and PyTorch paths.
"""
import os

from setuptools import find_packages, setup


def cuda_extension():
    """(ext_modules, cmdclass) for cosmos_fast._C, or nothing when it should not or cannot be built."""
    choice = os.environ.get("COSMOS_FAST_BUILD_CUDA", "auto")
    if choice == "0":
        return [], {}
    try:  # torch is only importable here without build isolation (pip install --no-build-isolation)
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or (choice != "1" and not torch.cuda.is_available()):
        return [], {}
    ext = CUDAExtension(
        "cosmos_fast._C",
        ["csrc/bindings.cpp", "csrc/ema.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
TRAIN_REQUIRES = ["torchvision", "timm>=1.0", "open_clip_torch>=2.24", "webdataset", "pillow", "matplotlib"]
EVAL_REQUIRES = ["clip_benchmark>=1.6"]
SIMLA_REQUIRES = ["transformers>=4.30", "tokenizers", "safetensors", "huggingface_hub"]

setup(
    name="cosmos_fast",
    version="0.1.0",
    description="Fused kernels for vision-language self-distillation training (COSMOS, PSD, SIMLA)",
    packages=find_packages(include=["cosmos_fast", "cosmos_fast.*"]),
    # the segmentation sets' class names, the tiny SIMLA model's WordPiece vocabulary
    package_data={"cosmos_fast.eval": ["data/*.json"], "cosmos_fast.models": ["data/*/*.txt"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "numpy", "pyyaml", "tqdm"],
    extras_require={
        # the COSMOS model and data (cosmos_fast.models, cosmos_fast.data): the field's own libraries
        "train": TRAIN_REQUIRES,
        # the paper's ten classification sets: clip_benchmark's class names and prompt templates
        "eval": EVAL_REQUIRES,
        # SIMLA as its authors built it: BERT from transformers, WordPiece, bert-base-uncased / DeiT weights
        "simla": SIMLA_REQUIRES,
        # triton ships with CUDA builds of torch; the CPU tests run its interpreter.
        "dev": ["pytest>=8", "matplotlib", "triton>=3.2", "pybind11", "ninja", "tensorboard",
                *TRAIN_REQUIRES, *EVAL_REQUIRES, *SIMLA_REQUIRES],
        # Peers measured side by side in benchmarks/ where they install.
        "peers": ["xformers", "inf-cl"],
    },
)
