"""Ops: one sub-package per op (kernels, PyTorch path, dense reference, autograd, functional API)."""
