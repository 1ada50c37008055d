"""The sm_90 compile gate: compile, for an sm_90 GPU and without one, every Triton kernel launch the
package's dispatch can choose and the CUDA sources, read each one's resources from the machine code, and
fail where a launch cannot run well (or at all) on the target (docs/testing.md, "sm_90 compile gate").

Triton compiles for a GPU it cannot see when its active driver reports that GPU: the stand-in driver
below reports ``GPUTarget("cuda", 90, 32)`` (Triton then targets sm_90a) and ``kernel.warmup`` compiles
without launching. The launches come from ``hdlm_kernels._kernel_launch.dispatchable()``, filled by the
kernel modules from the configuration tables their dispatch reads. The machine code is read with the
``cuobjdump`` (and, for spill counts, ``ptxas -v``) that Triton's package carries; the CUDA sources are
compiled with ``nvcc -arch=sm_90 -Xptxas -v``.

Fails (exit status 1) when a dispatchable launch
  * needs more than 227 KB of shared memory per block (static + dynamic),
  * needs more than 255 registers per thread,
  * spills registers although it is a bf16/fp16 attention kernel with D <= 128,
  * fits fewer blocks (CTAs) per SM than its launch requires (``min_blocks_per_sm``: 2 for the bf16/fp16
    training attention passes at D = 64),
  * contains an FP64 instruction although its design has none (only the float64 sampling kernels do),
  * does not compile.

Usage: python scripts/sm90_check.py [--jobs N] [--out-dir DIR] [--name NAME] [--only SUBSTRING]
                                    [--no-cuda] [--device]
Writes DIR/NAME.json and DIR/NAME.md (default benchmarks/results/sm90-resources). ``--device`` compiles
for the visible GPU instead of the stand-in (on the H200 itself).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_MODULES = ("hdlm_kernels.attention.triton_attention", "hdlm_kernels.sampling.triton_stream",
                  "hdlm_kernels.sampling.triton_gumbel", "hdlm_kernels.sampling.triton_hybrid",
                  "hdlm_kernels.sampling.triton_corrupt")
CUDA_SOURCES = ("decode_attention_cuda.cu", "gumbel_cuda.cu", "hybrid_cuda.cu", "uniform53_cuda.cu")

# Threads per block of the CUDA kernels (their launch sites' constants), by source or by source and a
# part of the kernel's name (the more specific entry wins), and the dynamic shared memory of those that
# take it (tensor_core::dynamic_smem_bytes in csrc/decode_attention_cuda.cu: 2 rings x stages x 32 keys x
# (D + 8) x 2 bytes).
CUDA_THREADS = {"decode_attention_cuda.cu": 128, ("decode_attention_cuda.cu", "tensor_core::"): 256}
CUDA_DYNAMIC_SMEM = {("decode_attention_cuda.cu", "tensor_core::decode_attention_kernel<__nv_bfloat16, 64>"): 55296,
                     ("decode_attention_cuda.cu", "tensor_core::decode_attention_kernel<__half, 64>"): 55296,
                     ("decode_attention_cuda.cu", "tensor_core::decode_attention_kernel<__nv_bfloat16, 128>"): 69632,
                     ("decode_attention_cuda.cu", "tensor_core::decode_attention_kernel<__half, 128>"): 69632}


def _cuda_launch_constant(table: dict, record: dict, default):
    for key, value in table.items():
        if isinstance(key, tuple) and key[0] == record["kernel"] and key[1] in record.get("config", ""):
            return value
    return table.get(record["kernel"], default)

# sm_90 limits (CUDA programming guide, compute capability 9.0); the per-block ones live in
# hdlm_kernels/_kernel_launch.py, where the opt-in autotuning prunes its candidates by them too.
sys.path.insert(0, str(REPO))
from hdlm_kernels._kernel_launch import MAX_REGISTERS, SMEM_PER_BLOCK  # noqa: E402

SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

FP64_OPCODES = ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DMMA")
MMA_OPCODES = ("HMMA", "IMMA")
WGMMA_OPCODES = ("HGMMA", "IGMMA", "QGMMA", "BGMMA")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF")


# ---------------------------------------------------------------- Triton side (runs in workers)

def _stand_in_driver():
    """A Triton CUDA driver that reports an sm_90 GPU without touching one (compilation only)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Sm90StandIn(CudaDriver):
        def __init__(self):  # no libcuda: nothing here may launch
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    return Sm90StandIn()


def sampling_launches():
    """The sampling kernels' GPU launches, from the constants their launch functions read (block sizes,
    warps per block, launch options). The float64 sampling design uses FP64 by intent."""
    import torch

    from hdlm_kernels._kernel_launch import KernelLaunch
    from hdlm_kernels.sampling import triton_corrupt, triton_gumbel, triton_hybrid, triton_stream
    from hdlm_kernels.sampling.constants import CORRUPTION_STREAM

    i64, f64 = torch.int64, torch.float64
    options = triton_stream.launch_options()
    block = triton_stream.GPU_BLOCK
    numel, vocab = 1 << 20, 50258
    launches = [
        KernelLaunch("sampling.uniform53", triton_stream._uniform53_kernel, (i64, f64, numel, 1, 2, 0, 3),
                     {"BLOCK": block}, options, {"BLOCK": block}, fp64_allowed=True),
        KernelLaunch("sampling.exp64", triton_stream._exp64_kernel, (f64, f64, f64, numel), {"BLOCK": block},
                     options, {"BLOCK": block}, fp64_allowed=True),
        KernelLaunch("sampling.philox", triton_stream._philox_kernel, (i64, i64, i64, numel), {"BLOCK": 256},
                     options, {"BLOCK": 256}, fp64_allowed=True),
    ]
    for gumbel in (False, True):
        launches.append(KernelLaunch("sampling.gumbel_noise" if gumbel else "sampling.log64",
                                     triton_stream._log64_kernel, (f64, f64, f64, numel),
                                     {"GUMBEL": gumbel, "BLOCK": block}, options, {"BLOCK": block},
                                     fp64_allowed=True))
    for module, name, variants in (
            (triton_gumbel, "sampling.gumbel_argmax", ((False, False, True, False), (True, True, True, True),
                                                       (False, False, False, False))),
            (triton_hybrid, "sampling.hybrid_step", (None,))):
        pairs = min(module.GPU_BLOCK_PAIRS, 1 << (vocab // 2).bit_length())
        warps = max(1, min(triton_gumbel.MAX_WARPS, pairs // module.PAIRS_PER_WARP))
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            labels = {"dtype": str(dtype).replace("torch.", ""), "BLOCK_P": pairs}
            if module is triton_hybrid:
                if dtype != torch.float64:
                    continue  # bf16 / fp16 / fp32 rows launch the screened kernel (below)
                launches.append(KernelLaunch(
                    name, module._hybrid_step_kernel, (dtype, i64, f64, i64, f64, i64, f64, vocab, 1, vocab, 50256,
                                                       1, 2, 3),
                    {"BLOCK_P": pairs}, triton_stream.launch_options(warps), labels, fp64_allowed=True))
                continue
            for take, exclude, noise, divide in variants:
                if dtype != torch.bfloat16 and (take or not noise):
                    continue  # flag variants once, in bf16
                launches.append(KernelLaunch(
                    name, module._gumbel_argmax_kernel, (dtype, i64, i64, torch.int8, f64, i64, f64, vocab, 1, vocab,
                                                         1, 2, 3, 4607182418800017408),
                    {"HAS_TAKE": take, "HAS_EXCLUDE": exclude, "NOISE": noise, "DIVIDE": divide, "BLOCK_P": pairs},
                    triton_stream.launch_options(warps),
                    dict(labels, take=take, exclude=exclude, noise=noise, divide=divide), fp64_allowed=True))
    # The screened Gumbel-max (float32 screen, exact FP64 decision of the candidates): bf16 / fp16 / fp32.
    pairs = min(triton_gumbel.GPU_BLOCK_PAIRS, 1 << (vocab // 2).bit_length())
    warps = max(1, min(triton_gumbel.MAX_WARPS, pairs // triton_gumbel.PAIRS_PER_WARP))
    for dtype, take, exclude, divide in ((torch.bfloat16, False, False, False), (torch.bfloat16, True, True, True),
                                         (torch.float16, False, False, False), (torch.float32, False, False, False)):
        launches.append(KernelLaunch(
            "sampling.gumbel_argmax_screened", triton_gumbel._gumbel_argmax_screened_kernel,
            (dtype, i64, i64, torch.int8, f64, i64, f64, i64, vocab, 1, vocab, 1, 2, 3, 4607182418800017408,
             1065353216),
            {"HAS_TAKE": take, "HAS_EXCLUDE": exclude, "DIVIDE": divide, "BLOCK_P": pairs,
             "MAX_TILES": triton_gumbel.max_tiles(vocab, pairs)},
            triton_stream.launch_options(warps),
            {"dtype": str(dtype).replace("torch.", ""), "BLOCK_P": pairs, "take": take, "exclude": exclude,
             "divide": divide}, fp64_allowed=True))
    # The screened γ step (passes 1 and 2 exact, the race screened in float32, the exact race per row where
    # the screen does not apply): bf16 / fp16 / fp32.
    pairs = min(triton_hybrid.GPU_BLOCK_PAIRS, 1 << (vocab // 2).bit_length())
    warps = max(1, min(triton_gumbel.MAX_WARPS, pairs // triton_hybrid.PAIRS_PER_WARP))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        launches.append(KernelLaunch(
            "sampling.hybrid_step_screened", triton_hybrid._hybrid_step_screened_kernel,
            (dtype, i64, f64, i64, f64, i64, f64, i64, vocab, 1, vocab, 50256, 1, 2, 3),
            {"BLOCK_P": pairs, "MAX_TILES": triton_gumbel.max_tiles(vocab, pairs)},
            triton_stream.launch_options(warps), {"dtype": str(dtype).replace("torch.", ""), "BLOCK_P": pairs},
            fp64_allowed=True))
    launches.append(KernelLaunch(
        "sampling.corrupt", triton_corrupt._corrupt_kernel,
        (i64, f64, f64, i64, i64, torch.int8, torch.int8, numel, 50257, 50257, 1, 2, 3),
        {"STREAM": CORRUPTION_STREAM, "BLOCK": block}, options, {"BLOCK": block}, fp64_allowed=True))
    return launches


_LAUNCHES = None


def _worker_init(use_device: bool) -> None:
    global _LAUNCHES
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    from triton.runtime import driver

    if not use_device:
        driver.set_active(_stand_in_driver())
    for module in KERNEL_MODULES:
        importlib.import_module(module)
    from hdlm_kernels import _kernel_launch

    if "sampling" not in _kernel_launch.registered_modules():
        _kernel_launch.register("sampling", sampling_launches)
    _LAUNCHES = _kernel_launch.dispatchable()


def _tools() -> dict:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {"cuobjdump": str(bindir / "cuobjdump"), "ptxas": str(bindir / "ptxas")}


def _opcode_counts(sass: str) -> dict:
    def count(opcodes):
        return sum(len(re.findall(rf"\b{op}(?:\.[A-Z0-9_.]+)?\b", sass)) for op in opcodes)

    return {"fp64": count(FP64_OPCODES), "mma": count(MMA_OPCODES), "wgmma": count(WGMMA_OPCODES),
            "tma": count(TMA_OPCODES)}


def _resource_usage(cuobjdump: str, cubin: Path) -> dict:
    text = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    regs, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": regs, "stack": stack, "static_smem": shared, "local": local}


def _spill_bytes(ptxas: str, ptx: str, arch: str, directory: Path) -> int:
    """Spill stores + loads that ``ptxas -v`` reports for ``ptx`` (only asked when local memory is used)."""
    source = directory / "kernel.ptx"
    source.write_text(ptx)
    result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(source), "-o", str(directory / "k.cubin")],
                            capture_output=True, text=True, check=True)
    stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", result.stderr))
    loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", result.stderr))
    return stores + loads


def _compile_one(index: int) -> dict:
    launch = _LAUNCHES[index]
    record = {"kernel": launch.name, "config": launch.label(), "warps": launch.options.get("num_warps", 4),
              "stages": launch.options.get("num_stages"), "fp64_allowed": launch.fp64_allowed,
              "spill_free": launch.spill_free, "min_blocks_per_sm": launch.min_blocks_per_sm, "source": "triton"}
    start = time.perf_counter()
    try:
        compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.constexprs, **launch.options)
        tools = _tools()
        arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
        with tempfile.TemporaryDirectory() as directory:
            directory = Path(directory)
            cubin = directory / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            record.update(_resource_usage(tools["cuobjdump"], cubin))
            sass = subprocess.run([tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            record.update(_opcode_counts(sass))
            # Spills land in local memory or the stack frame; without either there are none. ptxas -v
            # counts them; it is asked where the policy needs the figure (bf16/fp16 attention with
            # D <= 128 and everything without FP32-only arithmetic); elsewhere the stack column shows it.
            uses_local = record["local"] or record["stack"]
            if not uses_local:
                record["spill_bytes"] = 0
            elif launch.spill_free:
                record["spill_bytes"] = _spill_bytes(tools["ptxas"], compiled.asm["ptx"], arch, directory)
            else:
                record["spill_bytes"] = None
        record["arch"] = arch
        record["dynamic_smem"] = int(compiled.metadata.shared)
        record["stages"] = launch.options.get("num_stages", compiled.metadata.num_stages)
    except Exception as error:  # noqa: BLE001 - a launch that does not compile is a finding, with its reason
        record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    record["compile_s"] = round(time.perf_counter() - start, 2)
    return record


def _launch_count(use_device: bool) -> int:
    _worker_init(use_device)
    return len(_LAUNCHES)


# ---------------------------------------------------------------- CUDA side

def _cuda_records(jobs: int) -> tuple[list[dict], str]:
    """Resources of every kernel in the CUDA sources, from ``nvcc -arch=sm_90 -Xptxas -v``."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                    else None)
    if os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    if nvcc is None:
        return [], "skipped: no nvcc (CUDA_HOME, PATH, /usr/local/cuda)"
    paths, where = _cuda_torch_includes()
    if paths is None:
        return [], where
    includes = [f"-I{path}" for path in paths] + [f"-I{REPO / 'csrc'}"]
    flags = ["-c", "-O3", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "--expt-relaxed-constexpr",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", *includes]
    cuobjdump = _tools()["cuobjdump"]

    def compile_source(name: str) -> tuple[str, subprocess.CompletedProcess, str]:
        with tempfile.TemporaryDirectory() as directory:
            result = subprocess.run([nvcc, *flags, str(REPO / "csrc" / name), "-o", f"{directory}/out.o"],
                                    capture_output=True, text=True)
            sass = subprocess.run([cuobjdump, "-sass", f"{directory}/out.o"], capture_output=True,
                                  text=True).stdout if result.returncode == 0 else ""
        return name, result, sass

    records = []
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for name, result, sass in pool.map(compile_source, CUDA_SOURCES):
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line][:2]
                records.append({"kernel": name, "config": "", "source": "cuda",
                                "error": f"nvcc failed: {errors or result.stderr.strip().splitlines()[-1:]}"})
                continue
            found = _parse_ptxas_log(name, result.stderr)
            functions = _sass_by_function(sass)
            for record in found:
                if record["symbol"] in functions:
                    record.update(_opcode_counts(functions[record["symbol"]]))
            records.extend(found)
    return records, f"nvcc {nvcc} -arch=sm_90, torch headers from {where}"


def _cuda_torch_includes() -> tuple[list[str] | None, str]:
    """torch's C++ include directories from a CUDA build of torch: this interpreter's when it is one, else
    the one at $HDLM_CUDA_TORCH_PYTHON, else one of the cached venvs of the CI scripts (a CPU wheel of
    torch lacks c10/cuda's generated headers)."""
    import torch

    if torch.version.cuda is not None:
        from torch.utils.cpp_extension import include_paths

        return include_paths(), f"torch {torch.__version__}"
    import glob

    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    # The cached venvs of .ci/cuda_compile_check.sh and .ci/device_versions_check.sh hold CUDA builds.
    candidates = [os.environ.get("HDLM_CUDA_TORCH_PYTHON", ""),
                  *sorted(glob.glob(os.path.join(cache, "hdlm-kernels", "venv-*", "bin", "python")))]
    for python in filter(None, candidates):
        if not os.path.exists(python):
            continue
        result = subprocess.run([python, "-c", "import json, torch; from torch.utils.cpp_extension import "
                                 "include_paths; print(json.dumps([torch.version.cuda, torch.__version__, include_paths()]))"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            cuda, version, paths = json.loads(result.stdout.strip().splitlines()[-1])
            if cuda is not None:
                return paths, f"torch {version} at {python}"
    return None, ("skipped: this torch is a CPU build (no c10/cuda generated headers) and no CUDA torch was "
                  "found (set HDLM_CUDA_TORCH_PYTHON, or run .ci/device_versions_check.sh first)")


def _sass_by_function(sass: str) -> dict:
    functions, name, body = {}, None, []
    for line in sass.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            if name:
                functions[name] = "\n".join(body)
            name, body = match.group(1), []
        elif name:
            body.append(line)
    if name:
        functions[name] = "\n".join(body)
    return functions


def _demangle(names: list[str]) -> dict:
    # cu++filt where the toolkit has it, else binutils' c++filt (the Itanium mangling is the same).
    cufilt = next((tool for tool in (shutil.which("cu++filt"), "/usr/local/cuda/bin/cu++filt", shutil.which("c++filt"))
                   if tool and os.path.exists(tool)), None)
    if cufilt is None:
        return {}
    result = subprocess.run([cufilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, result.stdout.splitlines()))


def _parse_ptxas_log(source: str, log: str) -> list[dict]:
    """One record per compiled function of ``ptxas -v`` output (sm_90 only)."""
    records, current = [], None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if match:
            current = {"kernel": source, "symbol": match.group(1), "arch": match.group(2), "source": "cuda",
                       "spill_free": True, "fp64_allowed": "gumbel" in source or "hybrid" in source
                       or "uniform53" in source, "warps": None, "stages": None}
            records.append(current)
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            current["stack"] = int(match.group(1))
            current["spill_bytes"] = int(match.group(2)) + int(match.group(3))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["registers"] = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(smem.group(1)) if smem else 0
            current["dynamic_smem"] = 0
    names = _demangle([r["symbol"] for r in records])
    for record in records:
        pretty = names.get(record["symbol"], record["symbol"])
        record["config"] = re.sub(r"\(.*", "", pretty.replace("void ", "").replace("(anonymous namespace)::", ""))[:90]
        # Decode attention in float32 is not a bf16/fp16 kernel: spills there are reported, not failed.
        record["spill_free"] = "float>" not in pretty and "float," not in pretty
    return records


# ---------------------------------------------------------------- checks and tables

def blocks_per_sm(record: dict, threads: int | None = None) -> int | None:
    """Resident blocks (CTAs) per SM on sm_90 from registers, shared memory and warps."""
    warps = record.get("warps") or (threads // 32 if threads else None)
    if warps is None or "registers" not in record:
        return None
    registers = max(record["registers"], 1)
    per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 registers per warp
    by_registers = REGISTERS_PER_SM // (per_warp * warps)
    smem = record.get("static_smem", 0) + record.get("dynamic_smem", 0)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK) if smem else MAX_BLOCKS_PER_SM
    return min(by_registers, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)


def occupancy(record: dict, threads: int | None = None) -> float | None:
    """Theoretical occupancy (resident warps / 64) on sm_90 from registers, shared memory and warps."""
    blocks = blocks_per_sm(record, threads)
    if blocks is None:
        return None
    warps = record.get("warps") or threads // 32
    return round(blocks * warps / MAX_WARPS_PER_SM, 4)


def failures(record: dict) -> list[str]:
    found = []
    if "error" in record:
        return [f"does not compile: {record['error']}"]
    smem = record.get("static_smem", 0) + record.get("dynamic_smem", 0)
    if smem > SMEM_PER_BLOCK:
        found.append(f"shared memory {smem / 1024:.1f} KB > 227 KB")
    if record.get("registers", 0) > MAX_REGISTERS:
        found.append(f"{record['registers']} registers > {MAX_REGISTERS}")
    if record.get("spill_free") and (record.get("spill_bytes") or 0) > 0:
        found.append(f"spills {record['spill_bytes']} bytes")
    wanted, blocks = record.get("min_blocks_per_sm") or 1, record.get("blocks_per_sm")
    if blocks is not None and blocks < wanted:
        found.append(f"{blocks} CTA(s) per SM < {wanted}")
    if not record.get("fp64_allowed") and record.get("fp64", 0) > 0:
        found.append(f"{record['fp64']} FP64 instructions where none are designed")
    return found


def _markdown(records: list[dict], header: dict) -> str:
    lines = [f"# sm_90 resources ({header['generated']})", "",
             f"Static figures from the compiled machine code (no GPU): Triton {header['triton']}, torch "
             f"{header['torch']}, target {header['target']}; CUDA via {header['cuda']}. Compile wall time "
             f"{header['seconds']} s with {header['jobs']} processes. Regenerate: `make sm90-check`. Spill bytes from "
             "`ptxas -v` where the policy needs them (bf16/fp16 attention with D <= 128: must be 0); `-` elsewhere "
             "when the kernel has a stack frame (see the stack column), 0 when it has no local memory at all.", "",
             "| kernel | configuration | regs | spill B | static smem | dyn smem | stack | warps | stages "
             "| wgmma | mma | TMA | FP64 | CTAs/SM | occupancy | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r.get('config', '')} | | | | | | | | | | | | | | FAIL: {r['error'][:80]} |")
            continue
        occ = r.get("occupancy")
        yes = lambda key: "-" if key not in r else ("yes" if r[key] else "no")  # noqa: E731
        verdict = "; ".join(r["failures"]) or "ok"
        lines.append(
            f"| {r['kernel']} | {r.get('config', '')} | {r.get('registers', '')} | "
            f"{'-' if r.get('spill_bytes') is None else r['spill_bytes']} | "
            f"{r.get('static_smem', 0)} | {r.get('dynamic_smem', 0)} | {r.get('stack', '')} | "
            f"{r.get('warps') or '-'} | {r.get('stages') or '-'} | {yes('wgmma')} | {yes('mma')} | {yes('tma')} | "
            f"{r.get('fp64', '-')} | {r.get('blocks_per_sm') or '-'} | {'-' if occ is None else f'{occ:.0%}'} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="sm90-resources")
    parser.add_argument("--only", default="", help="compile only launches whose 'name configuration' contains "
                        "one of these ';'-separated strings, e.g. 'attention.forward D=128, dtype=bfloat16;sampling'")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    parser.add_argument("--device", action="store_true", help="compile for the visible GPU (no stand-in)")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)
    # A cache of its own, beside the interpreter (under the venv): warm reruns take seconds.
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(sys.prefix, "triton-cache-sm90"))
    sys.path.insert(0, str(REPO))
    start = time.perf_counter()
    import torch
    import triton

    count = _launch_count(args.device)
    from hdlm_kernels import _kernel_launch

    names = [f"{launch.name} {launch.label()}" for launch in _kernel_launch.dispatchable()]
    wanted = [part.strip() for part in args.only.split(";")]
    indices = [i for i in range(count) if any(part in names[i] for part in wanted)]
    print(f"sm90-check: {len(indices)} Triton launches from {len(_kernel_launch.registered_modules())} modules, "
          f"{args.jobs} processes, triton {triton.__version__}", flush=True)
    jobs = max(1, min(args.jobs, len(indices)))
    if jobs == 1:
        records = [_compile_one(i) for i in indices]
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh Triton per worker, no inherited driver
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(args.device,)) as pool:
            records = list(pool.map(_compile_one, indices, chunksize=1))
    triton_seconds = time.perf_counter() - start
    cuda_note = "not run (--no-cuda)"
    if not args.no_cuda:
        cuda_records, cuda_note = _cuda_records(args.jobs)
        records.extend(cuda_records)
    for record in records:
        threads = _cuda_launch_constant(CUDA_THREADS, record, 256) if record.get("source") == "cuda" else None
        if record.get("source") == "cuda" and "registers" in record:
            record["dynamic_smem"] = _cuda_launch_constant(CUDA_DYNAMIC_SMEM, record, 0)
        record["blocks_per_sm"] = blocks_per_sm(record, threads)
        record["occupancy"] = occupancy(record, threads)
        if threads:
            record["warps"] = threads // 32
        record["failures"] = failures(record)
    seconds = round(time.perf_counter() - start, 1)
    header = {"generated": time.strftime("%Y-%m-%d", time.gmtime()), "triton": triton.__version__,
              "torch": torch.__version__, "target": "visible GPU" if args.device else "sm_90a (stand-in driver)",
              "cuda": cuda_note, "seconds": seconds, "triton_seconds": round(triton_seconds, 1), "jobs": args.jobs}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
    (out_dir / f"{args.name}.md").write_text(_markdown(records, header))
    failed = [r for r in records if r["failures"]]
    for r in failed:
        print(f"sm90-check: FAIL {r['kernel']} [{r.get('config', '')}]: {'; '.join(r['failures'])}")
    print(f"sm90-check: {len(records)} kernels, {len(failed)} failing, {seconds} s (Triton {triton_seconds:.1f} s); "
          f"table in {out_dir / (args.name + '.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
