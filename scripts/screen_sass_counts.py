"""Static instruction counts of the sampling kernels' loops in sm_90 machine code (docs/sampling-screen.md,
"GPU kernels"): per loop, the instructions of its body per element it handles, and its FP64 instructions.

The Triton kernels are compiled for sm_90 without a GPU with the stand-in driver of ``scripts/sm90_check.py``;
the CUDA sources with ``nvcc -arch=sm_90 -cubin`` (torch's headers from a CUDA build of torch, found as the
compile gate finds them). The machine code is disassembled with ``cuobjdump -sass``. A loop is a backward
branch whose body (target to branch) holds no EXIT and ends before the function's last EXIT (the blocks
after it are out-of-line slow paths: divergent-warp fallbacks of warp reductions, the IEEE division's
special cases). Loops are named in address order with the roles each kernel declares (``Kernel.roles``),
and each role says how many elements one thread handles per iteration: instructions per element = body
instructions / elements per iteration. These are static counts: a loop body includes both sides of every
branch in it (the decide loop of a screened kernel holds the exact FP64 score, which runs only for the
iterations that hold a candidate); the shortest path through a body (see ``shortest_path``) is the
iteration that takes no optional branch, which for a prefiltered screen loop is the common one.

Target: 0 FP64 instructions in the screen loop of every screened kernel (the exit status is 1 otherwise).

Usage: python scripts/screen_sass_counts.py [--only SUBSTRING] [--no-cuda] [--no-triton] [--out-dir DIR]
Writes DIR/screen-sass-counts.json and .md (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_check  # noqa: E402  (the stand-in driver, the tools, the CUDA include search)

REPO = sm90_check.REPO
FP64_OPCODES = sm90_check.FP64_OPCODES
VOCAB = 50258
CUDA_THREADS = 256  # csrc/block_best.cuh kThreadsPerRow


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled kernel and the roles of its loops in address order: (role, elements per iteration
    per thread). ``screened`` kernels must have no FP64 instruction in their "screen" loops (the roles
    starting with "screen")."""

    name: str
    config: str
    roles: tuple
    screened: bool


def _instructions(sass: str) -> list[tuple[int, str]]:
    found = []
    for line in sass.splitlines():
        match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match:
            found.append((int(match.group(1), 16), match.group(2)))
    return found


def _is_fp64(text: str) -> bool:
    opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    return opcode.split(".")[0] in FP64_OPCODES


def loops(sass: str) -> list[dict]:
    """The loops of one function's SASS, in address order of their first instruction: start and end
    addresses, body instructions and FP64 instructions."""
    code = _instructions(sass)
    exits = [address for address, text in code if re.search(r"\bEXIT\b", text)]
    last_exit = max(exits) if exits else max(address for address, _ in code)
    found = []
    for address, text in code:
        branch = re.search(r"\bBRA\b(?:\s+\S+,)?\s+0x([0-9a-f]+)", text)
        if not branch or "BRA.DIV" in text:
            continue
        target = int(branch.group(1), 16)
        if target >= address or address > last_exit:
            continue
        if any(target <= exit_address <= address for exit_address in exits):
            continue
        body = [t for a, t in code if target <= a <= address]
        found.append({"start": hex(target), "end": hex(address), "instructions": len(body),
                      "fp64": sum(_is_fp64(t) for t in body)})
    found.sort(key=lambda loop: int(loop["start"], 16))
    # A loop with several back edges (a `continue`) appears once per edge: keep the widest of those that
    # share a first instruction or lie inside an earlier one.
    merged = []
    for loop in found:
        start, end = int(loop["start"], 16), int(loop["end"], 16)
        if merged and start <= int(merged[-1]["end"], 16):
            if end > int(merged[-1]["end"], 16):
                merged[-1] = loop if start == int(merged[-1]["start"], 16) else merged[-1]
            continue
        merged.append(loop)
    for loop in merged:
        loop["shortest"] = shortest_path(code, int(loop["start"], 16), int(loop["end"], 16))
    return merged


def _branch(text: str) -> tuple[int | None, bool]:
    """(target, conditional) of a branch instruction, (None, False) for any other instruction. A `BRA.DIV`
    (the divergent-warp fallback of a warp operation) is conditional."""
    match = re.search(r"\bBRA(?:\.\w+)*\b(?:\s+\S+,)?\s+0x([0-9a-f]+)", text)
    if not match:
        return None, False
    conditional = bool(re.match(r"@!?U?P\w+\s", text)) and not re.match(r"@PT\s", text)
    return int(match.group(1), 16), conditional or "BRA.DIV" in text


def shortest_path(code: list[tuple[int, str]], start: int, end: int) -> int:
    """The fewest instructions that one iteration of the loop [start, end] executes: a path from its first
    instruction to a back edge (a branch to `start`), every conditional branch free to go either way,
    forward edges only (an inner loop counts once). For a screened loop whose cheap noise sits behind a
    warp-uniform branch this is the iteration that skips it. Instructions under a predicate count as
    executed."""
    body = [(address, text) for address, text in code if start <= address <= end]
    index = {address: i for i, (address, _) in enumerate(body)}
    unreached = len(code) + 1
    cost = [unreached] * len(body)
    cost[0] = 1
    best = unreached
    for i, (address, text) in enumerate(body):
        if cost[i] == unreached:
            continue
        target, conditional = _branch(text)
        if target == start:
            best = min(best, cost[i])
        elif target is not None and target > address and target in index:
            j = index[target]
            cost[j] = min(cost[j], cost[i] + 1)
        ends_path = (target is not None and not conditional) or re.search(r"\b(EXIT|RET)\b", text)
        if not ends_path and i + 1 < len(body):
            cost[i + 1] = min(cost[i + 1], cost[i] + 1)
    return best if best != unreached else len(body)


def describe(kernel: Kernel, sass: str) -> dict:
    record = {"kernel": kernel.name, "config": kernel.config, "screened": kernel.screened,
              "fp64_total": sum(_is_fp64(t) for _, t in _instructions(sass)), "loops": []}
    for index, loop in enumerate(loops(sass)):
        if index < len(kernel.roles):
            role, elements = kernel.roles[index]
            loop = dict(loop, role=role, elements_per_iteration=elements,
                        instructions_per_element=round(loop["instructions"] / elements, 1),
                        shortest_per_element=round(loop["shortest"] / elements, 1))
        else:
            loop = dict(loop, role="other" if kernel.roles else f"loop {index + 1}")
        record["loops"].append(loop)
    if kernel.screened:
        # A kernel may hold several screen loops (the CUDA γ step: one per form of the interval).
        screen = [loop for loop in record["loops"] if loop["role"].startswith("screen")]
        record["screen_fp64"] = max(loop["fp64"] for loop in screen) if screen else None
    return record


# ---------------------------------------------------------------- Triton

def triton_kernels(only: str) -> list[tuple[Kernel, str]]:
    """Compiles the Triton sampling kernels (gumbel_argmax exact and screened, the γ step exact and screened)
    for sm_90."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from triton.runtime import driver

    driver.set_active(sm90_check._stand_in_driver())
    from hdlm_kernels.sampling import triton_gumbel, triton_hybrid, triton_stream

    i64, f64 = torch.int64, torch.float64
    pairs = min(triton_gumbel.GPU_BLOCK_PAIRS, 1 << (VOCAB // 2).bit_length())
    warps = max(1, min(triton_gumbel.MAX_WARPS, pairs // triton_gumbel.PAIRS_PER_WARP))
    per_thread = 2 * pairs // (32 * warps)
    hybrid_pairs = min(triton_hybrid.GPU_BLOCK_PAIRS, 1 << (VOCAB // 2).bit_length())
    hybrid_warps = max(1, min(triton_gumbel.MAX_WARPS, hybrid_pairs // triton_hybrid.PAIRS_PER_WARP))
    hybrid_per_thread = 2 * hybrid_pairs // (32 * hybrid_warps)
    one = 4607182418800017408  # the bits of 1.0
    jobs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).replace("torch.", "")
        jobs.append((Kernel("triton gumbel_argmax screened", f"{name}, BLOCK_P={pairs}, warps={warps}",
                            (("screen", per_thread), ("decide", per_thread)), True),
                     triton_gumbel._gumbel_argmax_screened_kernel,
                     (dtype, i64, i64, torch.int8, f64, i64, f64, i64, VOCAB, 1, VOCAB, 1, 2, 3, one, 1065353216),
                     {"HAS_TAKE": False, "HAS_EXCLUDE": False, "DIVIDE": False, "BLOCK_P": pairs,
                      "MAX_TILES": triton_gumbel.max_tiles(VOCAB, pairs)}, warps))
    jobs.append((Kernel("triton gumbel_argmax exact", f"bfloat16, BLOCK_P={pairs}, warps={warps}",
                        (("exact walk", per_thread),), False),
                 triton_gumbel._gumbel_argmax_kernel,
                 (torch.bfloat16, i64, i64, torch.int8, f64, i64, f64, VOCAB, 1, VOCAB, 1, 2, 3, one),
                 {"HAS_TAKE": False, "HAS_EXCLUDE": False, "NOISE": True, "DIVIDE": False, "BLOCK_P": pairs}, warps))
    jobs.append((Kernel("triton hybrid_step exact", f"bfloat16, BLOCK_P={hybrid_pairs}, warps={hybrid_warps}",
                        (("max", hybrid_per_thread), ("sum", hybrid_per_thread), ("race", hybrid_per_thread)),
                        False),
                 triton_hybrid._hybrid_step_kernel,
                 (torch.bfloat16, i64, f64, i64, f64, i64, f64, VOCAB, 1, VOCAB, 50256, 1, 2, 3),
                 {"BLOCK_P": hybrid_pairs}, hybrid_warps))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).replace("torch.", "")
        # Loops in source order: max, sum, the screen and the decision of the screened race, then the exact
        # race of the rows the screen does not apply to (the other side of the per-row branch).
        jobs.append((Kernel("triton hybrid_step screened", f"{name}, BLOCK_P={hybrid_pairs}, warps={hybrid_warps}",
                            (("max", hybrid_per_thread), ("sum", hybrid_per_thread), ("screen", hybrid_per_thread),
                             ("decide", hybrid_per_thread), ("exact race", hybrid_per_thread)), True),
                     triton_hybrid._hybrid_step_screened_kernel,
                     (dtype, i64, f64, i64, f64, i64, f64, i64, VOCAB, 1, VOCAB, 50256, 1, 2, 3),
                     {"BLOCK_P": hybrid_pairs, "MAX_TILES": triton_gumbel.max_tiles(VOCAB, hybrid_pairs)}, hybrid_warps))
    cuobjdump = sm90_check._tools()["cuobjdump"]
    compiled = []
    for kernel, function, args, constexprs, num_warps in jobs:
        if only not in f"{kernel.name} {kernel.config}":
            continue
        binary = function.warmup(*args, grid=(1,), **constexprs, **triton_stream.launch_options(num_warps))
        with tempfile.TemporaryDirectory() as directory:
            cubin = Path(directory) / "kernel.cubin"
            cubin.write_bytes(binary.asm["cubin"])
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        compiled.append((kernel, sass))
    return compiled


# ---------------------------------------------------------------- CUDA

def _cuda_kernel(symbol: str) -> Kernel | None:
    """The roles of a CUDA sampling kernel's loops, from its (mangled) name."""
    demangled = sm90_check._demangle([symbol]).get(symbol, symbol)
    short = re.sub(r"hdlm::\(anonymous namespace\)::", "", demangled).split("(")[0]
    dtype = next((name for token, name in (("BFloat16", "bfloat16"), ("Half", "float16"), ("<float", "float32"),
                                           ("<double", "float64")) if token in short), "")
    if "gumbel_argmax_screened_kernel" in short:
        columns = {"bfloat16": 8, "float16": 8, "float32": 4}[dtype]
        flags = re.findall(r"\b(true|false)\b", short)
        config = f"{dtype}, exclude={flags[0]}, vector={flags[1]}" if len(flags) == 2 else dtype
        return Kernel("cuda gumbel_argmax screened", config, (("screen", columns), ("decide", columns)), True)
    if "gumbel_argmax_kernel" in short:
        # The first loop is the noise walk (one Philox pair per iteration); the greedy walk after it is
        # unrolled by nvcc, so it is not named.
        return Kernel("cuda gumbel_argmax exact", dtype, (("exact walk", 2),), False)
    if "hybrid_step_kernel" in short:
        flags = re.findall(r"\b(true|false)\b", short)
        config = f"{dtype}, vector={flags[0]}" if flags else dtype
        if dtype == "float64":
            # float64 rows take the full race only, and nvcc unrolls its column loops (with remainder loops),
            # so neither the order of its loops nor their elements per iteration follow the source: listed
            # without roles.
            return Kernel("cuda hybrid_step", config, (), False)
        # Address order (checked on the machine code: the ladder constants of hybrid_screen.h's φ bounds sit
        # in the first screen loop): the float32 max and the exact sum over 16-byte chunks, the screen and
        # the decision with K = c2 S > 0, the same with K = 0 (Euler), then the full race of the rows the
        # screen does not take (one Philox pair per iteration).
        columns = {"bfloat16": 8, "float16": 8, "float32": 4}[dtype]
        return Kernel("cuda hybrid_step", config,
                      (("max", columns), ("sum", columns), ("screen, K > 0", columns), ("decide, K > 0", columns),
                       ("screen, K = 0", columns), ("decide, K = 0", columns), ("exact race", 2)), True)
    return None


def cuda_kernels(only: str) -> tuple[list[tuple[Kernel, str]], str]:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        return [], f"skipped: no nvcc at {nvcc}"
    paths, where = sm90_check._cuda_torch_includes()
    if paths is None:
        return [], where
    flags = ["-cubin", "-O3", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr", "-DHDLM_WITH_CUDA",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", *(f"-I{path}" for path in paths), f"-I{REPO / 'csrc'}"]
    cuobjdump = sm90_check._tools()["cuobjdump"]
    compiled = []
    for source in ("gumbel_cuda.cu", "hybrid_cuda.cu"):
        with tempfile.TemporaryDirectory() as directory:
            cubin = Path(directory) / "out.cubin"
            subprocess.run([nvcc, *flags, str(REPO / "csrc" / source), "-o", str(cubin)], check=True,
                           capture_output=True, text=True)
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        for symbol, body in sm90_check._sass_by_function(sass).items():
            kernel = _cuda_kernel(symbol)
            if kernel is not None and only in f"{kernel.name} {kernel.config}":
                compiled.append((kernel, body))
    return compiled, f"nvcc {nvcc} -arch=sm_90 -cubin, torch headers from {where}"


# ---------------------------------------------------------------- report

def markdown(records: list[dict], header: dict) -> str:
    lines = ["# Static instruction counts of the sampling loops (sm_90)", "",
             f"Generated by `python scripts/screen_sass_counts.py` ({header['date']}); {header['cuda']}.",
             "Static counts from the machine code: body instructions of each loop over the elements one thread",
             "handles per iteration; a loop body counts both sides of its branches (the decide loops hold the",
             "exact FP64 score, run only for iterations with a candidate). Loops named \"loop k\" belong to a kernel",
             "whose loops the compiler unrolled (their elements per iteration are not known from the source).",
             "\"Shortest path\" is the fewest instructions one iteration can execute (from the loop's head to a back",
             "edge, each branch free to go either way, an inner loop once), shown for the screened passes: for a",
             "screen loop with a prefilter, the iteration whose tokens all stay below the running floor (the",
             "common case once the floor is high); for a decide loop, an iteration without a candidate.", "",
             "| kernel | config | loop | instructions | shortest path | elements / iteration | "
             "instructions / element | shortest path / element | FP64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        for loop in record["loops"]:
            if loop["role"] == "other":
                continue
            elements = loop.get("elements_per_iteration", "?")
            per_element = loop.get("instructions_per_element", "?")
            # Shown for the screened passes only, whose optional branches are the screen's design (skip the
            # cheap noise, skip the exact score); elsewhere the shortest path is a special row (all -inf, say).
            screened_pass = loop["role"].startswith(("screen", "decide"))
            shortest = loop["shortest"] if screened_pass else "-"
            shortest_per_element = loop.get("shortest_per_element", "?") if screened_pass else "-"
            lines.append(f"| {record['kernel']} | {record['config']} | {loop['role']} | {loop['instructions']} | "
                         f"{shortest} | {elements} | {per_element} | {shortest_per_element} | {loop['fp64']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="keep the kernels whose name or config holds this text")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="screen-sass-counts")
    args = parser.parse_args(argv)
    compiled, cuda = [], "CUDA sources not compiled (--no-cuda)"
    if not args.no_triton:
        compiled += triton_kernels(args.only)
    if not args.no_cuda:
        found, cuda = cuda_kernels(args.only)
        compiled += found
    records = [describe(kernel, sass) for kernel, sass in compiled]
    header = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cuda": cuda, "vocab": VOCAB}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"header": header, "kernels": records}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(records, header))
    print(markdown(records, header))
    failing = [r for r in records if r["screened"] and r.get("screen_fp64") != 0]
    for record in failing:
        print(f"FAIL: {record['kernel']} ({record['config']}): screen loop FP64 = {record.get('screen_fp64')}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
