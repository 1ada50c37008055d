"""The loop finder of scripts/screen_sass_counts.py on hand-written SASS: body counts, FP64 counts and the
shortest path through a loop (the iteration that takes no optional branch), without compiling anything."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")  # the script imports the compile gate, which imports triton


def load_counts():
    # The script puts scripts/ on sys.path itself (for the compile gate); dataclasses need the module registered.
    spec = importlib.util.spec_from_file_location("screen_sass_counts", REPO / "scripts" / "screen_sass_counts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


counts = load_counts()


def sass(*lines: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


# A loop at 0x0010..0x00c0 (instructions 1..12): a warp-uniform branch over 4 instructions (the cheap noise),
# a divergent-warp fallback (BRA.DIV) over 1, and the back edge; the kernel exits after it.
SCREEN_LOOP = sass(
    "MOV R0, RZ",                      # 0x00
    "LOP3.LUT R1, R0, 0xff, RZ, 0xc0, !PT",  # 0x10  loop head
    "IMAD.WIDE.U32 R2, R1, 0x3, RZ",   # 0x20
    "ISETP.GE.AND P0, PT, R1, 0x10, PT",  # 0x30
    "@P0 BRA 0x90",                    # 0x40  skip the cheap noise
    "FADD R4, R2, 1",                  # 0x50
    "MUFU.LG2 R5, R4",                 # 0x60
    "FMUL R5, R5, 0.5",                # 0x70
    "DADD R6, R6, R8",                 # 0x80  an FP64 instruction on the optional side
    "BRA.DIV UR4, 0xb0",               # 0x90  divergent fallback, conditional
    "REDUX.MAX UR5, R5",               # 0xa0
    "IADD3 R0, R0, 0x1, RZ",           # 0xb0
    "@P1 BRA 0x10",                    # 0xc0  back edge
    "EXIT",                            # 0xd0
    "BRA 0xe0",                        # 0xe0
)


def test_loop_body_and_fp64_count_both_sides_of_its_branches():
    (loop,) = counts.loops(SCREEN_LOOP)
    assert (loop["start"], loop["end"]) == ("0x10", "0xc0")
    assert loop["instructions"] == 12 and loop["fp64"] == 1


def test_shortest_path_skips_the_optional_branches():
    (loop,) = counts.loops(SCREEN_LOOP)
    # head, IMAD, ISETP, the branch, BRA.DIV (taken to 0xb0), IADD3, back edge: 7 instructions.
    assert loop["shortest"] == 7


def test_an_unconditional_branch_has_no_fallthrough():
    code = sass(
        "MOV R0, RZ",          # 0x00
        "IADD3 R0, R0, 1, RZ",  # 0x10 head
        "BRA 0x50",            # 0x20 always over the next two
        "FADD R1, R1, 1",      # 0x30
        "FADD R1, R1, 2",      # 0x40
        "@P0 BRA 0x10",        # 0x50 back edge
        "EXIT",                # 0x60
    )
    (loop,) = counts.loops(code)
    assert loop["instructions"] == 5 and loop["shortest"] == 3


def test_a_continue_edge_is_an_iteration_too():
    code = sass(
        "MOV R0, RZ",          # 0x00
        "IADD3 R0, R0, 1, RZ",  # 0x10 head
        "@P2 BRA 0x10",        # 0x20 continue
        "FADD R1, R1, 1",      # 0x30
        "FADD R1, R1, 2",      # 0x40
        "@P0 BRA 0x10",        # 0x50 back edge
        "EXIT",                # 0x60
    )
    (loop,) = counts.loops(code)
    assert loop["instructions"] == 5 and loop["shortest"] == 2
