"""Build script for cosmos_fast.

The package is pure Python plus Triton kernels; CUDA extensions under csrc/ are
added by the ops that need them and are optional (each op has a Triton and a
PyTorch path)."""
from setuptools import find_packages, setup

setup(
    name="cosmos_fast",
    version="0.1.0",
    description="Fused kernels for vision-language self-distillation training (COSMOS, PSD, SIMLA)",
    packages=find_packages(include=["cosmos_fast", "cosmos_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "pyyaml", "tqdm"],
    extras_require={
        # triton ships with CUDA builds of torch; the CPU tests run its interpreter.
        "dev": ["pytest>=8", "pytest-benchmark", "matplotlib", "triton>=3.2", "pybind11", "ninja"],
        # Peers measured side by side in benchmarks/ where they install.
        "peers": ["xformers", "inf-cl"],
    },
)
