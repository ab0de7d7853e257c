"""Compiles, for an H100 (sm_90) and without one, every Triton kernel launch that the contrastive and sigmoid losses,
the fused linear heads and the EMA update make at production shapes, and prints each launch's shared memory as JSON.

The ops run on CPU tensors with the GPU's configs (the kernel modules are not told about an interpreter: run
without TRITON_INTERPRET), and each ``kernel[grid](...)`` is recorded instead of run, then compiled ahead of time
with the recorded argument types, constexprs and launch options. What the interpreter accepts but the compiler
rejects, or a config that does not fit the H100's shared memory, fails here before a GPU session meets it.
Usage: ``python tests/triton_launch_compile_worker.py``. (The cross-attention kernels, whose runtime steps down
to smaller configs on OutOfResources, have their own check: ``triton_compile_worker.py``.)
"""
import functools
import json
import os
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import cosmos_fast
import cosmos_fast.ops.contrastive.triton_kernels  # noqa: F401  (imported before the patch below: they must
import cosmos_fast.ops.ema.triton_kernels  # noqa: F401  keep the real interpreter check)
import cosmos_fast.ops.fused_linear.triton_kernels  # noqa: F401
import cosmos_fast.ops.sigmoid.triton_kernels  # noqa: F401
from cosmos_fast import _dispatch

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # per block, opt-in maximum
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
                 torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1"}
OPTIONS = ("num_warps", "num_stages")


def argument_type(value) -> str | None:
    """Triton's type name for a non-constexpr argument, or None for one Triton takes as a constexpr (None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def launch_spec(kernel: JITFunction, args, kwargs) -> dict:
    """The compile-time description of one launch: kernel, signature, constexprs and options."""
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound[param.name]
        kind = None if param.is_constexpr else argument_type(value)
        if kind is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = kind
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "options": options}


def record_launches(calls) -> list[dict]:
    """Runs each call with every Triton launch recorded instead of executed; distinct launches, in order."""
    launches = []

    def record(kernel, *args, grid, warmup=False, **kwargs):
        launches.append(launch_spec(kernel, args, kwargs))

    # the dispatcher lets CPU tensors onto the Triton path as under the interpreter; the kernel modules keep
    # their own (false) view of the interpreter, so they pick the GPU's configs and precisions
    with mock.patch.object(JITFunction, "run", record), mock.patch.object(_dispatch, "triton_interpreted",
                                                                          lambda: True):
        for call in calls:
            call()
    distinct = {}
    for launch in launches:
        key = (launch["kernel"].fn.__name__, json.dumps(launch["signature"], sort_keys=True),
               repr(sorted(launch["constexprs"].items())), repr(sorted(launch["options"].items())))
        distinct.setdefault(key, launch)
    return list(distinct.values())


def compile_for_h100(launch) -> int:
    kernel, names = launch["kernel"], launch["kernel"].arg_names
    source = ASTSource(kernel, launch["signature"],
                       constexprs={(names.index(k),): v for k, v in launch["constexprs"].items()})
    return triton.compile(source, target=H100, options=launch["options"]).metadata.shared


def production_calls():
    """The ops in each input dtype, forward and backward, at COSMOS/SIMLA widths (which pick the configs) and
    few rows (the PyTorch work around the launches runs on the CPU)."""
    def features(dtype, *shape, grad=True):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    def clip(dtype):
        cosmos_fast.contrastive_loss(features(dtype, 256, 512), features(dtype, 256, 512),
                                     torch.tensor(14.0)).backward()

    def soft_with_queue(dtype):
        teacher = (features(dtype, 256, 512, grad=False), features(dtype, 256, 512, grad=False),
                   torch.tensor(14.0))
        cosmos_fast.contrastive_loss(features(dtype, 256, 512), features(dtype, 256, 512), torch.tensor(14.0),
                                     teacher=teacher, alpha=0.4, extra_a=features(dtype, 512, 512, grad=False),
                                     extra_b=features(dtype, 512, 512, grad=False)).backward()

    def multiview(dtype):
        cosmos_fast.multiview_contrastive_loss(features(dtype, 8, 256, 512), features(dtype, 8, 256, 512),
                                               torch.tensor(14.0)).backward()

    def sigmoid(dtype):
        teacher = (features(dtype, 256, 512, grad=False), features(dtype, 256, 512, grad=False), torch.tensor(5.0),
                   torch.tensor(-2.0))
        cosmos_fast.sigmoid_loss(features(dtype, 256, 512), features(dtype, 256, 512), torch.tensor(10.0),
                                 torch.tensor(-10.0)).backward()
        cosmos_fast.sigmoid_loss(features(dtype, 256, 512), features(dtype, 256, 512), torch.tensor(10.0),
                                 torch.tensor(-10.0), teacher=teacher, alpha=0.4, soft_mask=torch.rand(256) < 0.5,
                                 extra_b=features(dtype, 512, 512, grad=False)).backward()
        with torch.no_grad():
            cosmos_fast.multiview_sigmoid_loss(features(dtype, 2, 256, 512), features(dtype, 8, 256, 512),
                                               torch.tensor(10.0), torch.tensor(-10.0))

    def heads(dtype):
        target = torch.randint(0, 4096, (192,))
        cosmos_fast.fused_linear_cross_entropy(features(dtype, 192, 768), features(dtype, 4096, 768), target,
                                               soft_logits=features(dtype, 192, 4096, grad=False),
                                               alpha=0.4).backward()
        cosmos_fast.fused_linear_bce(features(dtype, 128, 256), features(dtype, 4096, 256),
                                     torch.rand(128, 4096) < 0.01, bias=features(dtype, 4096)).backward()

    def ema(student_dtype):
        shapes = [(768, 768), (3072,), (4096, 768)]
        cosmos_fast.ema_update_([torch.randn(s) for s in shapes], [torch.randn(s, dtype=student_dtype) for s in shapes],
                                0.999, bf16_copy=[torch.empty(s, dtype=torch.bfloat16) for s in shapes])

    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    return ([functools.partial(op, dtype) for dtype in dtypes
             for op in (clip, soft_with_queue, multiview, sigmoid, heads)]
            + [functools.partial(ema, dtype) for dtype in (torch.float32, torch.bfloat16)])


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the compiler cannot take interpreted kernels")
    os.environ[_dispatch.ENV_VAR] = "triton"
    results = []
    for launch in record_launches(production_calls()):
        case = {"kernel": launch["kernel"].fn.__name__, "options": launch["options"],
                "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                               for k, v in launch["constexprs"].items() if v is not None}}
        try:
            case["shared"] = compile_for_h100(launch)
        except Exception as exc:  # reported per launch; the test names the first failures
            case["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        results.append(case)
    print(json.dumps(results))
