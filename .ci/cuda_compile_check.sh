#!/usr/bin/env bash
# Compiles (does not run) hdlm_kernels._C with its CUDA sources against a CUDA build of torch, so
# that a CUDA syntax or type error cannot land unseen on a machine without a GPU.
#
# The CUDA torch lives in a cached venv outside the repository (reused across runs; delete it to
# start over). The build goes to a temporary directory; the source tree is not touched.
#
# Environment: HDLM_CUDA_CHECK_VENV (venv path), HDLM_CUDA_CHECK_TORCH (pip requirement for the CUDA
# torch, default torch==2.14.1), MAX_JOBS (default 2), TORCH_CUDA_ARCH_LIST (default 9.0),
# PYTHON (interpreter that creates the venv, default python3).
# Exit status: 0 when the sources compile and the built module imports with with_cuda=True, or when
# nvcc is absent (skipped); non-zero otherwise.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
torch_requirement="${HDLM_CUDA_CHECK_TORCH:-torch==2.14.1}"
venv_name="venv-${torch_requirement//==/-}"
venv="${HDLM_CUDA_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hdlm-kernels/${venv_name//[^A-Za-z0-9.-]/_}}"
python="${PYTHON:-python3}"

check_name="cuda-compile-check"
# shellcheck source=phases.sh
source "$repo_root/.ci/phases.sh"

# A toolkit has bin/nvcc and include/cuda_runtime.h; an nvcc on PATH may be a wrapper script
# outside it (e.g. /usr/local/bin/nvcc), so its parent only counts when it holds the toolkit.
is_toolkit() { [[ -n "$1" && -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }
cuda_home=""
for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
    "$(command -v nvcc >/dev/null 2>&1 && dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" \
    /usr/local/cuda; do
  if is_toolkit "$candidate"; then cuda_home="$candidate"; break; fi
done
if [[ -z "$cuda_home" ]]; then
  echo "== cuda-compile-check: SKIPPED: no CUDA toolkit with nvcc found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)"
  exit 0
fi
total_start="$(now)"

begin_phase "CUDA torch venv at $venv"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  quiet_pip "$torch_requirement" setuptools wheel ninja numpy
elif ! "$venv/bin/python" -c "import setuptools, wheel, ninja, numpy" 2>/dev/null; then
  quiet_pip setuptools wheel ninja numpy
fi
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
end_phase "venv"

build_dir="$(mktemp -d "${TMPDIR:-/tmp}/hdlm-cuda-check.XXXXXX")"
trap 'rm -rf "$build_dir"' EXIT

begin_phase "compiling with nvcc from $cuda_home into $build_dir"
(
  cd "$repo_root"
  HDLM_KERNELS_BUILD_CUDA=1 \
  CUDA_HOME="$cuda_home" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" \
  PATH="$venv/bin:$PATH" \
    "$venv/bin/python" setup.py -q build_ext --build-lib "$build_dir/lib" --build-temp "$build_dir/temp"
)
end_phase "compile"

begin_phase "importing the built module"
(
  cd "$build_dir"
  "$venv/bin/python" - "$build_dir/lib" <<'EOF'
import glob
import importlib.util
import json
import sys

import torch  # noqa: F401 - _C links against libtorch

lib = sys.argv[1]
(path,) = glob.glob(f"{lib}/hdlm_kernels/_C*.so")
spec = importlib.util.spec_from_file_location("hdlm_kernels._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
build_info = json.load(open(f"{lib}/hdlm_kernels/_build_info.json"))
print("built:", path)
print("build info:", json.dumps({k: build_info[k] for k in ("cpp", "cuda", "with_cuda", "torch_version", "cuda_arch_list")}))
# Every CUDA operator the Python side dispatches to must be in the module.
expected = ("uniform53_cuda", "decode_attention_cuda", "gumbel_argmax_cuda", "hybrid_step_cuda")
missing = [name for name in expected if not hasattr(module, name)]
if not module.with_cuda or missing:
    sys.exit(f"the built hdlm_kernels._C lacks CUDA operators: {missing or 'all (with_cuda is False)'}")
print("with_cuda:", module.with_cuda, "operators:", ", ".join(expected))
EOF
)
end_phase "import"
echo "== cuda-compile-check: OK in $(elapsed "$total_start") s"
