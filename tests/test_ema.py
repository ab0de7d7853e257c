"""EMA update and EMATeacher: every path against a float64 reference, schedules, buffers, exact resume."""
import math
import shutil
import subprocess

import pytest
import torch
from torch import nn

import cosmos_fast
from cosmos_fast import _extension

SIZES = [1, 3, 1000003, 4099, 65536 + 7]  # none a multiple of 4 or of a kernel chunk
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]


def ragged_lists(seed, dtypes=DTYPES, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(n, generator=g) for n in sizes]
    student = [torch.randn(n, generator=g).to(d) for n, d in zip(sizes, dtypes)]
    return teacher, student


def reference(teacher, student, momentum):
    return [momentum * t.double() + (1 - momentum) * s.double() for t, s in zip(teacher, student)]


def assert_matches(teacher, expected):
    for i, (t, e) in enumerate(zip(teacher, expected)):
        assert t.dtype == torch.float32
        # fp32 rounding of m t + (1 - m) s: a few ulps of the operands' magnitude
        magnitude = e.abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(t.double(), e, rtol=0, atol=4e-7 * max(1.0, magnitude), msg=f"tensor {i}")


def assert_bf16_copy(copy, t, backend):
    if backend == "triton":  # the interpreter's fp32 -> bf16 cast may round the other way: one ulp
        torch.testing.assert_close(copy.float(), t.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(copy, t.to(copy.dtype))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.996, 1.0])
def test_update_matches_float64(backend, momentum):
    teacher, student = ragged_lists(seed=1)
    expected = reference(teacher, student, momentum)
    cosmos_fast.ema_update_(teacher, student, momentum)
    assert_matches(teacher, expected)


def test_bf16_copy_is_written_in_the_same_pass(backend):
    teacher, student = ragged_lists(seed=2)
    copies = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in teacher]
    expected = reference(teacher, student, 0.9)
    cosmos_fast.ema_update_(teacher, student, 0.9, bf16_copy=copies)
    assert_matches(teacher, expected)
    for c, t in zip(copies, teacher):
        assert_bf16_copy(c, t, backend)


def test_non_contiguous_and_empty_tensors(backend):
    base_t, base_s = torch.randn(6, 8), torch.randn(8, 6)
    untouched = base_t[:, 1::2].clone()
    teacher = [base_t[:, ::2], torch.empty(0), torch.randn(5)]
    student = [base_s.t()[:, ::2], torch.empty(0), torch.randn(5)]
    expected = reference(teacher, student, 0.7)
    cosmos_fast.ema_update_(teacher, student, 0.7)
    assert_matches(teacher, expected)
    assert torch.equal(base_t[:, 1::2], untouched)  # the columns outside the view stay as they were


T, S = [torch.zeros(3)], [torch.zeros(3)]


@pytest.mark.parametrize("call,error,words", [
    (lambda: cosmos_fast.ema_update_(T, S + S, 0.5), ValueError, "student_tensors has 2"),
    (lambda: cosmos_fast.ema_update_(T, [torch.zeros(4)], 0.5), ValueError, "has shape (3,)"),
    (lambda: cosmos_fast.ema_update_([torch.zeros(3).half()], S, 0.5), TypeError, "must be float32"),
    (lambda: cosmos_fast.ema_update_(T, [torch.zeros(3, dtype=torch.int64)], 0.5), TypeError, "fp32, fp16 or bf16"),
    (lambda: cosmos_fast.ema_update_(T, [torch.zeros(3, device="meta")], 0.5), ValueError, "must be on cpu"),
    (lambda: cosmos_fast.ema_update_(T, S, 1.5), ValueError, "momentum must be in [0, 1]"),
    (lambda: cosmos_fast.ema_update_(T, S, -0.1), ValueError, "momentum must be in [0, 1]"),
    (lambda: cosmos_fast.ema_update_(torch.zeros(3), S, 0.5), TypeError, "teacher_tensors must be a list"),
    (lambda: cosmos_fast.ema_update_(T, [3.0], 0.5), TypeError, "student_tensors[0] must be a torch.Tensor"),
    (lambda: cosmos_fast.ema_update_(T, S, 0.5, bf16_copy=[torch.zeros(3)]), ValueError, "bf16_copy[0] must be"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2), momentum=2.0), ValueError, "momentum must be a float"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2), schedule="linear"), ValueError, "schedule must be one of"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2), schedule="cosine"), ValueError, "needs total_steps"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2), schedule="cosine", total_steps=True), ValueError,
     "needs total_steps"),
    (lambda: cosmos_fast.EMATeacher([nn.Linear(2, 2)]), TypeError, "student must be an nn.Module, got list"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2).double()), TypeError,
     "the student's 'weight' is torch.float64: the EMA update averages fp32, bf16 or fp16"),
    (lambda: cosmos_fast.EMATeacher(nn.Linear(2, 2)).update(step="3"), TypeError, "step must be an int or None"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 7)
        self.norm = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.linear(x))))


def test_schedules():
    fixed = cosmos_fast.EMATeacher(Tiny(), momentum=0.99)
    assert [fixed.momentum_at(s) for s in (0, 5, 10**6)] == [0.99, 0.99, 0.99]
    cosine = cosmos_fast.EMATeacher(Tiny(), momentum=0.996, schedule="cosine", final_momentum=1.0, total_steps=100)
    assert cosine.momentum_at(0) == pytest.approx(0.996)
    assert cosine.momentum_at(50) == pytest.approx(0.998)
    assert cosine.momentum_at(25) == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine.momentum_at(100) == pytest.approx(1.0)
    assert cosine.momentum_at(1000) == pytest.approx(1.0)


def test_teacher_update_parameters_and_buffers(backend):
    torch.manual_seed(0)
    student = Tiny()
    ema = cosmos_fast.EMATeacher(student, momentum=0.9, bf16_copy=True)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(16, 5))  # moves the BatchNorm running statistics and its counter
    assert ema.update() == 0.9
    s_state, t_state = student.state_dict(), ema.module.state_dict()
    for name, value in t_state.items():
        if value.is_floating_point():
            expected = 0.9 * before[name].double() + 0.1 * s_state[name].double()
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(value, s_state[name]), name
    for name, value in ema.module_bf16.state_dict().items():
        if value.is_floating_point():
            assert_bf16_copy(value, t_state[name], backend)
        else:
            assert torch.equal(value, t_state[name]), name
    assert ema.num_updates == 1


def test_a_student_that_lost_a_buffer_is_a_clear_error():
    student = Tiny()
    teacher = cosmos_fast.EMATeacher(student)
    del student.norm.running_var
    student.norm.register_buffer("running_var", None)
    with pytest.raises(ValueError, match="the student's buffers no longer match the teacher's"):
        teacher.update()


def test_non_persistent_buffers_are_copied_not_averaged():
    """A causal mask full of -inf (open_clip's text tower) must not become NaN through the average."""
    student = Tiny()
    student.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1), persistent=False)
    ema = cosmos_fast.EMATeacher(student, momentum=0.9)
    ema.update()
    assert torch.equal(ema.module.mask, student.mask)


def _assert_follows(ema, student):
    """One update at momentum 0.5 after the student's head weight was set to 2 moves the teacher half way."""
    before = ema.module.head.weight.clone()
    with torch.no_grad():
        student.head.weight.fill_(2.0)
    ema.update()
    torch.testing.assert_close(ema.module.head.weight, 0.5 * before + 1.0)


def test_wrapped_students_are_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student = Tiny()
        ema = cosmos_fast.EMATeacher(nn.parallel.DistributedDataParallel(student), momentum=0.5)
        assert set(ema.module.state_dict()) == set(student.state_dict())
        _assert_follows(ema, student)
    finally:
        dist.destroy_process_group()
    compiled = torch.compile(Tiny(), backend="eager")
    ema = cosmos_fast.EMATeacher(compiled, momentum=0.5)
    assert set(ema.module.state_dict()) == set(compiled._orig_mod.state_dict())
    _assert_follows(ema, compiled._orig_mod)


def _train(steps, ema_state=None, start=0, checkpoint_at=None):
    """Train Tiny with AdamW and an EMA teacher; returns (student, optimizer, teacher, checkpoint)."""
    torch.manual_seed(0)
    student = Tiny()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ema = cosmos_fast.EMATeacher(student, momentum=0.9, schedule="cosine", total_steps=10)
    if ema_state is not None:
        student.load_state_dict(ema_state["student"])
        optimizer.load_state_dict(ema_state["optimizer"])
        ema.load_state_dict(ema_state["teacher"])
    checkpoint = None
    for step in range(start, steps):
        g = torch.Generator().manual_seed(100 + step)  # the data of each step depends on the step alone
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        if step + 1 == checkpoint_at:
            checkpoint = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                          "teacher": ema.state_dict()}
            checkpoint = {k: _clone(v) for k, v in checkpoint.items()}
    return ema, checkpoint


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def test_resume_is_bit_exact(backend):
    uninterrupted, checkpoint = _train(10, checkpoint_at=5)
    resumed, _ = _train(10, ema_state=checkpoint, start=5)
    assert resumed.num_updates == uninterrupted.num_updates == 10
    for (name, a), b in zip(uninterrupted.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_cuda_sources_compile(arch, tmp_path):
    """A broken .cu cannot land: csrc/ema.cu compiles for sm_80 and sm_90a with the local nvcc."""
    from torch.utils.cpp_extension import include_paths

    cmd = ["nvcc", "-c", str(_extension.CSRC / "ema.cu"), "-o", str(tmp_path / "ema.o"),
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++20", "-Xcompiler", "-fPIC",
           *_extension.NVCC_FLAGS, *(f"-I{p}" for p in include_paths())]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ema.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_bindings_compile():
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    cmd = ["c++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=cosmos_fast_C",
           str(_extension.CSRC / "bindings.cpp"), f"-I{sysconfig.get_paths()['include']}",
           *(f"-I{p}" for p in include_paths())]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_extension_status_is_reported():
    assert "cuda_extension" in cosmos_fast.backends()
    if not torch.cuda.is_available():
        assert _extension.load() is None
        assert _extension.status() == "unavailable: no CUDA device"
