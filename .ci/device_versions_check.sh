#!/usr/bin/env bash
# The GPU machine's versions on a machine without a GPU: torch 2.11 and triton 3.6.0 (the H200 image's),
# in a cached venv outside the repository (reused across runs; delete it to start over), like
# .ci/cuda_compile_check.sh. Runs the sm_90 compile gate under them (scripts/sm90_check.py), writing
# benchmarks/results/sm90-resources-triton-3.6.0.{json,md}.
#
# With HDLM_DEVICE_VERSIONS_SUITE=1 it also runs the whole CPU test suite under those versions (about
# as long as `make test`; not part of CI): the C++ extension is built CPU-only against torch 2.11 into
# the venv (incremental across runs) and put, with a copy of the package's sources, first on PYTHONPATH.
#
# Environment: HDLM_DEVICE_VERSIONS_GATE=0 skips the gate; HDLM_DEVICE_VENV (venv path), HDLM_DEVICE_TORCH (default torch==2.11.0),
# HDLM_DEVICE_TRITON (default triton==3.6.0), PYTHON (interpreter that creates the venv, default python3),
# SM90_ONLY (the gate's --only: ';'-separated substrings of "kernel configuration"), SM90_ARGS (other
# arguments of the gate, split on spaces), PYTEST_ARGS (extra arguments of the suite).
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
torch_requirement="${HDLM_DEVICE_TORCH:-torch==2.11.0}"
triton_requirement="${HDLM_DEVICE_TRITON:-triton==3.6.0}"
venv_name="venv-${torch_requirement//==/-}-${triton_requirement//==/-}"
venv="${HDLM_DEVICE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hdlm-kernels/${venv_name//[^A-Za-z0-9.-]/_}}"
python="${PYTHON:-python3}"
triton_version="${triton_requirement#*==}"

check_name="device-versions-check"
# shellcheck source=phases.sh
source "$repo_root/.ci/phases.sh"

total_start="$(now)"
begin_phase "venv at $venv"
wanted="import torch, triton, sys; sys.exit(not (torch.__version__.startswith('${torch_requirement#*==}') and triton.__version__ == '${triton_version}'))"
if ! "$venv/bin/python" -c "$wanted" 2>/dev/null; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  quiet_pip "$torch_requirement" "$triton_requirement" numpy tqdm setuptools wheel ninja pytest hypothesis \
    pytest-benchmark scipy
fi
"$venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
end_phase "venv"

if [[ "${HDLM_DEVICE_VERSIONS_GATE:-1}" == "1" ]]; then
begin_phase "sm_90 compile gate under triton $triton_version"
# The gate imports the package from the source tree (no extension needed) and keeps its Triton cache
# in the venv, so a warm rerun takes seconds.
only=()
if [[ -n "${SM90_ONLY:-}" ]]; then only=(--only "$SM90_ONLY"); fi
PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" \
  "$venv/bin/python" "$repo_root/scripts/sm90_check.py" --name "sm90-resources-triton-$triton_version" \
  "${only[@]}" ${SM90_ARGS:-}
end_phase "sm_90 gate"
fi

if [[ "${HDLM_DEVICE_VERSIONS_SUITE:-0}" == "1" ]]; then
  build_dir="$venv/hdlm-build"
  rm -rf "$build_dir/src"
  begin_phase "CPU-only extension against torch ${torch_requirement#*==} into $build_dir"
  (cd "$repo_root" && HDLM_KERNELS_BUILD_CUDA=0 HDLM_KERNELS_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-2}" \
     PATH="$venv/bin:$PATH" "$venv/bin/python" setup.py -q build_ext --build-lib "$build_dir/lib" \
     --build-temp "$build_dir/temp")
  end_phase "build"
  begin_phase "CPU test suite under torch ${torch_requirement#*==} + triton $triton_version"
  # The built module goes beside the sources: a copy of the package with _C inside it.
  mkdir -p "$build_dir/src"
  cp -r "$repo_root/hdlm_kernels" "$build_dir/src/"
  cp "$build_dir"/lib/hdlm_kernels/_C*.so "$build_dir"/lib/hdlm_kernels/_build_info.json "$build_dir/src/hdlm_kernels/"
  ln -s "$repo_root/reference" "$build_dir/src/hdlm_reference"
  ln -s "$repo_root/benchmarks" "$build_dir/src/benchmarks"
  ln -s "$repo_root/tests" "$build_dir/src/tests"
  # -P: `python -m` would put the repository first on sys.path, and its hdlm_kernels (whose _C, if any,
  # was built against another torch) would shadow the copy above.
  (cd "$repo_root" && HDLM_KERNELS_REQUIRE_EXTENSION=1 PYTHONPATH="$build_dir/src" \
     "$venv/bin/python" -P -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-})
  end_phase "suite"
fi
echo "== device-versions-check: OK in $(elapsed "$total_start") s"
