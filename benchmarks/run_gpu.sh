#!/usr/bin/env bash
# The one command for a short GPU session (no registry access needed): environment, editable install,
# the GPU tests, every benchmarks/bench_*.py, and a summary table of the results this run wrote.
#
# Usage: bash benchmarks/run_gpu.sh [--only NAME[,NAME...]] [--tests NAME[,NAME...] | --no-tests | --tests-only]
#                                    [--args NAME "ARGS"]... [--quick | --smoke]
#   --only cross_attention,train_step   run only those benchmarks (benchmarks/bench_<NAME>.py)
#   --tests cross_attention,train       run only those GPU tests (tests/test_gpu_<NAME>.py)
#   --no-tests                          skip the GPU tests (a second call of one session, say)
#   --tests-only                        the GPU tests and no benchmark (a first call that must stay short)
#   --args train_step "--batches 128"   arguments for one benchmark only (after the common ones)
#   other arguments (--quick, --smoke) are passed to every benchmark
# The GPU tests run in 4 pytest-xdist workers where xdist is installed (the GPU image has it).
#
# With $OUT set, $OUT receives at most 8 flat files: run_gpu.log (everything printed), results.json (every
# results record of this run, keyed by benchmark name) and the benchmark figures. A failing step does not
# stop the run; the exit status is non-zero at the end if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1  # keep the log in the order things happened

ONLY=""
RUN_TESTS=1
TESTS_ONLY=0
TEST_NAMES=""
BENCH_ARGS=()
declare -A ONE_BENCH_ARGS=()
while (($#)); do
    case "$1" in
        --only) ONLY="${2:?--only needs a comma-separated list of benchmark names}"; shift 2 ;;
        --tests) TEST_NAMES="${2:?--tests needs a comma-separated list of GPU test names}"; shift 2 ;;
        --no-tests) RUN_TESTS=0; shift ;;
        --tests-only) TESTS_ONLY=1; shift ;;
        --args) ONE_BENCH_ARGS["${2:?--args needs a benchmark name and its arguments}"]="${3?--args $2 needs arguments}"
                shift 3 ;;
        *) BENCH_ARGS+=("$1"); shift ;;
    esac
done

DEFAULT_RESULTS=benchmarks/results
if [[ " ${BENCH_ARGS[*]} " == *" --smoke "* ]]; then
    DEFAULT_RESULTS=benchmarks/results/smoke  # as the scripts' own --smoke default: never beside real results
fi
export COSMOS_FAST_RESULTS_DIR="${COSMOS_FAST_RESULTS_DIR:-$DEFAULT_RESULTS}"
RESULTS_DIR="$COSMOS_FAST_RESULTS_DIR"
MAX_OUT_FILES=8
LOG_DIR="${OUT:-$RESULTS_DIR}"
mkdir -p "$LOG_DIR" "$RESULTS_DIR"
MARKER="$(mktemp)"  # results files newer than this one were written by this run
trap 'rm -f "$MARKER"' EXIT

benchmarks() {  # the bench_*.py files this run takes, in name order
    local bench name
    for bench in benchmarks/bench_*.py; do
        name="${bench#benchmarks/bench_}"
        name="${name%.py}"
        if [[ -z "$ONLY" || ",$ONLY," == *",$name,"* ]]; then
            echo "$bench"
        fi
    done
}

main() {
    local failed=() rc bench name selected=() test_paths=() xdist=() extra=()
    ((TESTS_ONLY)) || mapfile -t selected < <(benchmarks)
    if ((RUN_TESTS == 0 && TESTS_ONLY)); then
        echo "--tests-only and --no-tests leave nothing to run" >&2
        return 2
    fi
    if [[ -n "$ONLY" && ${#selected[@]} -eq 0 ]]; then
        echo "--only $ONLY matches no benchmarks/bench_<NAME>.py" >&2
        return 2
    fi
    for name in "${!ONE_BENCH_ARGS[@]}"; do
        if [[ ! -f "benchmarks/bench_$name.py" ]]; then
            echo "--args $name: there is no benchmarks/bench_$name.py" >&2
            return 2
        fi
    done
    test_paths=(tests)
    if [[ -n "$TEST_NAMES" ]]; then
        test_paths=()
        for name in ${TEST_NAMES//,/ }; do
            if [[ ! -f "tests/test_gpu_$name.py" ]]; then
                echo "--tests $name: there is no tests/test_gpu_$name.py" >&2
                return 2
            fi
            test_paths+=("tests/test_gpu_$name.py")
        done
    fi

    echo "== environment"
    nvidia-smi || echo "nvidia-smi: not available"
    python - <<'EOF'
import platform
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}), triton {triton_version}")
EOF

    echo "== install"
    # Packages the GPU image lacks (open_clip, webdataset, ...), carried as wheels in .whl/ (see README).
    if compgen -G ".whl/*.whl" >/dev/null; then
        python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed the carried wheels: $(ls .whl | tr '\n' ' ')"
    fi
    # Offline: the build uses the setuptools already installed (PEP 660 editable install, no index).
    local pip_log
    pip_log="$(mktemp)"
    if python -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e . >"$pip_log" 2>&1; then
        echo "installed cosmos_fast (editable)"
    else
        tail -n 5 "$pip_log"
        echo "pip install -e . failed: importing cosmos_fast from the checkout through PYTHONPATH"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    rm -f "$pip_log"

    if ((RUN_TESTS)); then
        echo "== GPU tests"
        rc=0
        if python -c "import xdist" 2>/dev/null; then
            xdist=(-n 4)  # the GPU tests are many small checks: four processes share the GPU well
        fi
        SECONDS=0
        python -m pytest -q "${xdist[@]}" "${test_paths[@]}" -m gpu || rc=$?
        echo "(GPU tests: ${SECONDS} s)"  # for planning the next call of a time-limited session
        case "$rc" in
            0) ;;
            5) echo "no tests marked gpu were collected" ;;
            *) failed+=("GPU tests (pytest exit $rc)") ;;
        esac
    fi

    for bench in "${selected[@]}"; do
        name="${bench#benchmarks/bench_}"
        read -r -a extra <<<"${ONE_BENCH_ARGS[${name%.py}]:-}"
        echo "== $bench ${BENCH_ARGS[*]} ${extra[*]}"
        rc=0
        SECONDS=0
        python "$bench" "${BENCH_ARGS[@]}" "${extra[@]}" || rc=$?
        echo "($bench: ${SECONDS} s)"
        if [[ "$rc" -ne 0 ]]; then
            failed+=("$bench (exit $rc)")
        fi
    done

    echo "== summary"
    local results=() figures=() summarize_args=()
    mapfile -t results < <(find "$RESULTS_DIR" -maxdepth 1 -name '*.json' -newer "$MARKER" | sort)
    mapfile -t figures < <(find "$RESULTS_DIR" -maxdepth 1 -name '*.png' -newer "$MARKER" | sort)
    if [[ -n "${OUT:-}" ]]; then
        summarize_args+=(--combine "$OUT/results.json")
    fi
    if ((${#results[@]})); then
        rc=0
        python benchmarks/summarize.py "${summarize_args[@]}" "${results[@]}" || rc=$?
        if [[ "$rc" -ne 0 ]]; then
            failed+=("summary (exit $rc)")
        fi
    else
        echo "no benchmark wrote results in this run"
    fi
    if [[ -n "${OUT:-}" ]]; then
        # run_gpu.log and results.json are two of the files $OUT may hold.
        local room=$((MAX_OUT_FILES - 2)) figure
        for figure in "${figures[@]}"; do
            if [[ "$(dirname "$figure")" -ef "$OUT" ]]; then
                continue  # the results folder is $OUT itself (COSMOS_FAST_RESULTS_DIR=$OUT)
            elif ((room > 0)); then
                cp "$figure" "$OUT/"
                room=$((room - 1))
            else
                echo "not copied to \$OUT (at most $MAX_OUT_FILES files): $figure"
            fi
        done
    fi

    if ((${#failed[@]})); then
        echo "FAILED:"
        printf '  %s\n' "${failed[@]}"
        return 1
    fi
    echo "all steps passed"
}

main 2>&1 | tee "$LOG_DIR/run_gpu.log"
