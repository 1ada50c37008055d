"""The sm_90 compile gate (scripts/sm90_check.py): its occupancy model, its verdicts, its reading of
ptxas output, and one real compilation for sm_90 through the stand-in driver (no GPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


def load_gate():
    spec = importlib.util.spec_from_file_location("sm90_check", REPO / "scripts" / "sm90_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = load_gate()


def test_occupancy_counts_registers_shared_memory_and_warps():
    # 128 registers x 32 lanes = 4096 per warp; 8 warps = 32768 per block: 2 blocks by registers;
    # 64 KB (+1 KB reserved) per block: 3 by shared memory; 8 by warps: 2 blocks, 16 of 64 warps.
    assert gate.occupancy({"registers": 128, "warps": 8, "static_smem": 0, "dynamic_smem": 64 * 1024}) == 0.25
    # 255 registers round up to 256 (allocation unit of 256 per warp): 1 block of 8 warps.
    assert gate.occupancy({"registers": 255, "warps": 8, "static_smem": 0, "dynamic_smem": 0}) == 0.125
    # A CUDA record gives threads instead of warps.
    assert gate.occupancy({"registers": 32, "static_smem": 0, "dynamic_smem": 0}, threads=256) == 1.0


def test_blocks_per_sm_is_what_the_occupancy_counts():
    # 212 registers -> 6912 per warp, 27648 per 4-warp block: 2 blocks by registers; 64 KB + 1 KB: 3 by
    # shared memory; so 2 blocks (8 of 64 warps, 12.5%).
    record = {"registers": 212, "warps": 4, "static_smem": 1024, "dynamic_smem": 64 * 1024}
    assert gate.blocks_per_sm(record) == 2 and gate.occupancy(record) == 0.125
    # 100 KB of shared memory leaves room for 2 blocks; 120 KB for 1.
    assert gate.blocks_per_sm({"registers": 96, "warps": 4, "static_smem": 0, "dynamic_smem": 100 * 1024}) == 2
    assert gate.blocks_per_sm({"registers": 96, "warps": 4, "static_smem": 0, "dynamic_smem": 120 * 1024}) == 1


def test_the_two_blocks_rule_covers_the_16_bit_training_passes_at_head_dim_64():
    from hdlm_kernels.attention import triton_attention as ta

    required = {(launch.name, launch.config["dtype"], launch.config["D"]) for launch in ta.dispatchable_launches()
                if launch.min_blocks_per_sm == 2}
    names = ("attention.forward", "attention.backward_dkdv", "attention.backward_dkdv_atomic_dq",
             "attention.backward_dq")
    assert required == {(name, dtype, 64) for name in names for dtype in ("float16", "bfloat16")}


@pytest.mark.parametrize("record,expected", [
    ({"registers": 200, "static_smem": 1024, "dynamic_smem": 232 * 1024, "spill_bytes": 0}, "shared memory 233.0 KB > 227 KB"),
    ({"registers": 256, "static_smem": 0, "dynamic_smem": 0, "spill_bytes": 0}, "256 registers > 255"),
    ({"registers": 255, "spill_bytes": 68, "spill_free": True}, "spills 68 bytes"),
    ({"registers": 60, "fp64": 3, "fp64_allowed": False}, "3 FP64 instructions where none are designed"),
    ({"registers": 212, "blocks_per_sm": 1, "min_blocks_per_sm": 2}, "1 CTA(s) per SM < 2"),
    ({"error": "CompilationError: boom"}, "does not compile: CompilationError: boom"),
])
def test_each_limit_fails_the_gate(record, expected):
    assert gate.failures(record) == [expected]


def test_what_the_design_allows_passes():
    assert gate.failures({"registers": 255, "spill_bytes": 2500, "spill_free": False, "static_smem": 0,
                          "dynamic_smem": 227 * 1024, "fp64": 300, "fp64_allowed": True}) == []


def test_ptxas_log_is_read_per_function():
    log = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    16 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 45312 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelI6__halfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelI6__halfEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 24320 bytes smem, 400 bytes cmem[0]
"""
    first, second = gate._parse_ptxas_log("decode_attention_cuda.cu", log)
    assert (first["registers"], first["spill_bytes"], first["stack"], first["static_smem"]) == (168, 28, 16, 45312)
    assert (second["registers"], second["spill_bytes"], second["static_smem"]) == (128, 0, 24320)


def test_every_attention_launch_fits_the_shared_memory_estimate():
    """The configuration tables never choose a tile whose pipelined K/V buffers alone overflow sm_90's
    227 KB (the gate measures the real figure on compiled code)."""
    from hdlm_kernels._kernel_launch import SMEM_PER_BLOCK
    from hdlm_kernels.attention import triton_attention as ta

    for launch in ta.dispatchable_launches():
        if launch.name == "attention.backward_delta":
            continue
        element = 4 if launch.config["dtype"] == "float32" else 2
        c = launch.constexprs
        assert ta.shared_memory_estimate(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], c["BLOCK_DV"], element,
                                         launch.options["num_stages"]) <= SMEM_PER_BLOCK, launch


@pytest.mark.slow
def test_one_launch_compiles_for_sm90_without_a_gpu(tmp_path):
    """The real path: the stand-in driver, warmup compilation, cuobjdump, the JSON and markdown."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sm90_check.py"), "--only",
                             "attention.backward_delta D=64, dtype=float32", "--no-cuda", "--jobs", "1",
                             "--out-dir", str(tmp_path), "--name", "gate"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = json.loads((tmp_path / "gate.json").read_text())["records"]
    assert record["arch"] == "sm_90a" and 0 < record["registers"] <= 255 and record["failures"] == []
    assert "| attention.backward_delta | D=64, dtype=float32 |" in (tmp_path / "gate.md").read_text()
    assert record["blocks_per_sm"] >= 1 and record["min_blocks_per_sm"] == 1


@pytest.mark.slow
def test_screen_loop_of_the_triton_screen_has_no_fp64(tmp_path):
    """scripts/screen_sass_counts.py on one kernel: the screened Triton gumbel_argmax compiled for sm_90
    (stand-in driver), its loops found in the SASS, and no FP64 instruction in its screen loop (its
    decide loop holds the exact FP64 score)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "screen_sass_counts.py"), "--no-cuda", "--only",
                             "triton gumbel_argmax screened bfloat16", "--out-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = json.loads((tmp_path / "screen-sass-counts.json").read_text())["kernels"]
    roles = {loop["role"]: loop for loop in record["loops"]}
    assert roles["screen"]["fp64"] == 0 and record["screen_fp64"] == 0
    assert roles["decide"]["fp64"] > 0  # the exact pass is in this kernel, only outside the screen loop
    assert 0 < roles["screen"]["instructions_per_element"] < roles["decide"]["instructions_per_element"]
    assert "| triton gumbel_argmax screened | bfloat16" in (tmp_path / "screen-sass-counts.md").read_text()
