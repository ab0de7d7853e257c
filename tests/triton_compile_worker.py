"""Compiles the cross-attention kernels for an H100 (sm_90) and prints, as JSON, the config of the runtime's
fallback chain that fits its shared memory for each case. Run without TRITON_INTERPRET (the interpreter wraps
the kernels in objects the compiler cannot take): ``python tests/triton_compile_worker.py``."""
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cosmos_fast.ops.attention import triton_kernels

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # per block, opt-in maximum
TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float32: "fp32"}
PRECISION = {torch.bfloat16: "tf32", torch.float32: "tf32x3"}  # triton_utils.dot_precision off the interpreter
CASES = [("fwd", torch.bfloat16, 8, 64), ("bwd", torch.bfloat16, 8, 64), ("fwd", torch.bfloat16, 64, 128),
         ("bwd", torch.bfloat16, 64, 128), ("fwd", torch.float32, 32, 128), ("bwd", torch.float32, 32, 128)]


def compile_for_h100(kernel, dtype, config) -> int:
    """Shared-memory bytes of ``kernel`` compiled with fp-``dtype`` tensors and ``config``."""
    config = dict(config)
    options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    constexprs = dict(config, HAS_MASK=True, PRECISION=PRECISION[dtype])
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TENSOR_ARGS:
            signature[name] = f"*{TRITON_DTYPE[dtype]}"
        else:
            signature[name] = {"MASK": "*u8", "LSE": "*fp32", "scale": "fp32"}.get(name, "i32")
    names = kernel.arg_names
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=H100, options=options).metadata.shared


def fitting_config(kind, dtype, Lq, D) -> dict:
    kernel = {"fwd": triton_kernels._fwd_kernel, "bwd": triton_kernels._bwd_kernel}[kind]
    first = triton_kernels._first_config(kind, Lq, D, 8192, torch.tensor([], dtype=dtype).element_size())
    config = first
    while config is not None:
        shared = compile_for_h100(kernel, dtype, config)
        if shared <= H100_SHARED_BYTES:
            return {"config": config, "first": first, "shared": shared}
        config = triton_kernels._smaller(config)
    return {"config": None, "first": first, "shared": None}


if __name__ == "__main__":
    print(json.dumps([{"kind": k, "dtype": str(dt), "Lq": Lq, "D": D, **fitting_config(k, dt, Lq, D)}
                      for k, dt, Lq, D in CASES]))
