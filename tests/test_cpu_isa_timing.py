"""scripts/cpu_isa_timing.py (docs/sampling-screen.md, "Measured (CPU)") runs, prints one row per pass and
instruction set, and leaves the extension's instruction set on "auto"; an unknown set is refused by name."""

import importlib.util
from pathlib import Path

import pytest

from hdlm_kernels import _extension

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("cpu_isa_timing", REPO / "scripts" / "cpu_isa_timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def extension():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    return _extension._C


def test_one_pass_per_instruction_set(extension, capsys):
    automatic = extension.cpu_isa()
    assert load_script().main(["--calls", "1", "--passes", "1", "--isa", "scalar", "--threads", "1"]) == 0
    assert extension.cpu_isa() == automatic
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| pass | isa |") and len(lines) == 3
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:2] == ["0", "scalar"] and float(cells[2]) > 0 and float(cells[3]) > 0


def test_an_unknown_instruction_set_is_refused_and_auto_restored(extension):
    automatic = extension.cpu_isa()
    with pytest.raises(RuntimeError, match="set_cpu_isa: isa must be one of .* got 'sse9'"):
        load_script().main(["--calls", "1", "--passes", "1", "--isa", "sse9"])
    assert extension.cpu_isa() == automatic
