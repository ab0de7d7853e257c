"""Every benchmark script runs end to end (``--smoke``: toy sizes, on the CPU here), so GPU time is never spent on
a script that fails before it measures: its accuracy checks pass, every row it writes is a measured one, and its
JSON record and figure are written where ``COSMOS_FAST_RESULTS_DIR`` says. The numbers themselves are meaningless
here, and nothing is asserted about them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.stem.removeprefix("bench_") for path in BENCHMARKS.glob("bench_*.py"))


def run_script(name: str, results: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COSMOS_FAST_RESULTS_DIR": str(results), **env}
    environment.pop("COSMOS_FAST_BACKEND", None)
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=BENCHMARKS, env=environment,
                          capture_output=True, text=True, timeout=900)


def test_every_benchmark_has_a_smoke_test():
    assert SCRIPTS == ["contrastive", "cross_attention", "ema", "fused_linear", "segmentation", "sigmoid", "train_step"]


# options beyond --smoke that a script's smoke run also takes, so that their code paths run here too
SMOKE_OPTIONS = {"train_step": ["--profile", "fused"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_end_to_end(name, tmp_path):
    # the interpreter lets the scripts' Triton-only paths (the projected-K/V pooler, the forced Triton EMA) run
    result = run_script(f"bench_{name}", tmp_path, "--smoke", *SMOKE_OPTIONS.get(name, []), TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["name"] == name and record["environment"]["torch"]
    assert record["rows"], "no rows written"
    for row in record["rows"]:
        assert row["status"] == "ok", row
        time_ms = row.get("ms", row.get("step_ms"))
        assert isinstance(time_ms, float) and time_ms > 0, row
        assert row.get("met") is None, "a smoke run judged a goal"
    for check in record.get("checks", []):
        assert check["passed"], check
    if name == "train_step":
        agreement = record["agreement"]
        assert agreement["passed"] and len(agreement["fused"]) == len(agreement["reference"]) == 2
        profiled = [row for row in record["rows"] if "profile" in row]
        assert [row["impl"] for row in profiled] == ["fused"]
        profile = profiled[0]["profile"]
        assert profile["steps"] == 3 and 0 < profile["busy_ms"] and 0 < profile["busy_fraction"] <= 1.05
        assert sum(profile["families_ms"].values()) == pytest.approx(profile["busy_ms"])
        assert profile["top"] and profile["families_ms"]["gemm"] > 0  # the towers' matmuls are found
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000  # a figure, not an empty canvas


def test_summary_combines_the_records(tmp_path):
    results = tmp_path / "results"
    assert run_script("bench_ema", results, "--smoke").returncode == 0
    step = {"case": "tiny B=4", "impl": "fused", "N": 4, "step_ms": 123.25, "samples_per_s": 32.45, "status": "ok"}
    (results / "train_step.json").write_text(json.dumps({
        "name": "train_step", "rows": [step],
        "agreement": {"reference": [3.0, 2.5], "fused": [3.0, 2.5], "worst_relative_difference": 1e-7,
                      "passed": True}}))
    combined = tmp_path / "combined.json"
    summary = run_script("summarize", results, "--combine", str(combined))
    assert summary.returncode == 0, summary.stderr
    assert "check ema smoke" not in summary.stdout  # the check line names the implementation, not a case
    assert "check ema cosmos_fast (" in summary.stdout and " float32: ok (relative error " in summary.stdout
    assert "one flat lerp_ (copy floor)" in summary.stdout
    assert "agreement train_step: ok (worst relative difference 1.00e-07 over 2 steps)" in summary.stdout
    step_line = next(line for line in summary.stdout.splitlines() if line.startswith("train_step"))
    assert "123" in step_line.split() and "32.5" in step_line.split()  # the step's ms and samples/s
    assert sorted(json.loads(combined.read_text())) == ["ema", "train_step"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_a_real_run_says_so_and_succeeds(tmp_path):
    result = run_script("bench_ema", tmp_path)
    assert result.returncode == 0 and "CUDA is not available" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--tests", "bogus"], "--tests bogus: there is no tests/test_gpu_bogus.py"),
    (["--args", "bogus", "--quick"], "--args bogus: there is no benchmarks/bench_bogus.py"),
    (["--only", "bogus"], "--only bogus matches no benchmarks/bench_<NAME>.py"),
    (["--tests-only", "--no-tests"], "--tests-only and --no-tests leave nothing to run"),
])
def test_the_gpu_script_refuses_bad_arguments_before_it_starts(args, message, tmp_path):
    environment = {**os.environ, "COSMOS_FAST_RESULTS_DIR": str(tmp_path)}
    environment.pop("OUT", None)
    result = subprocess.run(["bash", str(BENCHMARKS / "run_gpu.sh"), *args], env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stdout + result.stderr
    assert "== environment" not in result.stdout  # nothing installed, nothing run


def test_xformers_bias_is_the_mask_in_8_aligned_rows(monkeypatch):
    """xformers' CUTLASS kernel refuses a bias whose rows are not 8-aligned (Lk = 77 was refused on the H200):
    the peer's bias is -inf exactly where the mask is set, 0 elsewhere, in rows padded to 8 elements."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = __import__("bench_cross_attention")
    mask = torch.rand(3, 77) < 0.3
    bias = bench.xformers_bias(mask, 8, torch.bfloat16)
    assert bias.shape == (3, bench.HEADS, 8, 77) and bias.dtype == torch.bfloat16
    assert bias.stride(-2) % 8 == 0 and bias.stride(-2) >= 77
    expected = torch.zeros(3, 1, 1, 77).masked_fill(mask[:, None, None, :], float("-inf")).expand_as(bias)
    assert torch.equal(bias.float(), expected)


def test_kernel_families_by_name(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    family = __import__("bench_train_step").kernel_family
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32": "gemm", "nvjet_tst_192x192_64x3_2x1_v_bz_coopB_NTN": "gemm",
             "aten::mm": "gemm", "aten::baddbmm": "gemm", "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
             "flash_fwd_kernel": "attention", "triton_per_fused__to_copy_add_0": "triton",
             "aten::commit": "other", "elementwise_kernel": "other"}
    assert {name: family(name) for name in names} == names
