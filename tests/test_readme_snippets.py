"""Every ```python snippet of README.md runs as written, as a reader would paste it: in a fresh
namespace of an interpreter that the test suite has not touched (no ``TRITON_INTERPRET``, nothing
imported beforehand). A snippet whose first line is ``# needs CUDA`` is a GPU test (marked ``cuda``);
the others run on the CPU, with CUDA hidden even on a GPU machine, so that they keep working for
readers without one. The CPU snippets share one interpreter (one start-up of torch instead of one per
snippet), each in its own namespace."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NEEDS_CUDA = "# needs CUDA"
NEEDS_WEIGHTS = "# needs the published weights"  # a download: run by neither test (no network in CI or on the GPU)
TIMEOUT_S = 900

# Runs the snippets of a JSON file [[name, code], ...] one after the other, each in a fresh namespace,
# and writes {name: None or the traceback} to a second JSON file.
RUNNER = r"""
import json, sys, traceback
results = {}
for name, code in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    try:
        exec(compile(code, "README.md snippet " + name, "exec"), {"__name__": "__main__"})
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()
open(sys.argv[2], "w", encoding="utf-8").write(json.dumps(results))
"""


def snippets() -> list[tuple[str, str]]:
    """(id, code) of every ```python block, the id naming the section it sits in."""
    found, section, counts = [], "top", {}
    block = None
    for line in README.read_text(encoding="utf-8").splitlines():
        if block is None and line.startswith("#"):
            section = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
        elif block is None and line.strip() == "```python":
            block = []
        elif block is not None and line.strip() == "```":
            counts[section] = counts.get(section, 0) + 1
            found.append((f"{section}-{counts[section]}", "\n".join(block) + "\n"))
            block = None
        elif block is not None:
            block.append(line)
    return found


def needs_cuda(code: str) -> bool:
    return code.lstrip().startswith(NEEDS_CUDA)


def needs_weights(code: str) -> bool:
    return code.lstrip().startswith(NEEDS_WEIGHTS)


def run_snippets(named_code: list[tuple[str, str]], folder: Path, hide_cuda: bool) -> dict:
    """{name: None if the snippet ran, else its traceback}, from one fresh interpreter in ``folder``."""
    source, results = folder / "snippets.json", folder / "results.json"
    source.write_text(json.dumps(named_code), encoding="utf-8")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a reader's interpreter, not the test suite's
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", RUNNER, str(source), str(results)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0 and results.exists(), f"the snippet runner failed:\n{done.stderr[-4000:]}"
    return json.loads(results.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory) -> dict:
    cpu = [(name, code) for name, code in snippets() if not needs_cuda(code) and not needs_weights(code)]
    return run_snippets(cpu, tmp_path_factory.mktemp("readme"), hide_cuda=True)


def test_the_readme_has_snippets_of_both_kinds():
    assert {needs_cuda(code) for _, code in snippets()} == {True, False}


@pytest.mark.parametrize("name, code", [pytest.param(name, code, id=name) for name, code in snippets()
                                        if not needs_cuda(code) and not needs_weights(code)])
def test_cpu_snippet_runs_as_written(name, code, cpu_results):
    assert cpu_results[name] is None, f"the snippet failed:\n{code}\n--- traceback ---\n{cpu_results[name]}"


@pytest.mark.cuda
@pytest.mark.parametrize("name, code", [pytest.param(name, code, id=name) for name, code in snippets()
                                        if needs_cuda(code)])
def test_cuda_snippet_runs_as_written(name, code, tmp_path):
    result = run_snippets([(name, code)], tmp_path, hide_cuda=False)[name]
    assert result is None, f"the snippet failed:\n{code}\n--- traceback ---\n{result}"
