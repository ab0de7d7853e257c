"""CUDA-extension path of the EMA update (csrc/ema.cu)."""
from ... import _extension


def ema_update(teacher, student, momentum, bf16_copy):
    _extension.load().ema_update(teacher, student, float(momentum), bf16_copy or [])
