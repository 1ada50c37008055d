"""``python -m benchmarks``: run the benchmark suites, write the JSON record and a markdown report
(plus PNG charts) under benchmarks/out/, and print the report. On a GPU the record is also copied to
benchmarks/results/ (commit it). Extra arguments go to pytest (e.g. ``-k attention``)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import report

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    record = out / f"{stamp}-{device}.json"
    command = [sys.executable, "-m", "pytest", str(ROOT), "-q", "-p", "no:cacheprovider", "--benchmark-only",
               f"--benchmark-json={record}", "--benchmark-columns=median,min,rounds", *argv]
    print("running:", " ".join(command), flush=True)
    status = subprocess.call(command)
    if not record.exists():
        print("no benchmark record was written", file=sys.stderr)
        return status or 1
    data = report.load(record)
    text = report.markdown(data)
    (out / "report.md").write_text(text)
    charts = report.charts(data, out)
    print()
    print(text)
    print(f"record: {record}\nreport: {out / 'report.md'}" + (f"\ncharts: {', '.join(map(str, charts))}" if charts else ""))
    if device == "gpu":
        results = ROOT / "results"
        results.mkdir(exist_ok=True)
        shutil.copy(record, results / record.name)
        print(f"GPU record copied to {results / record.name}: commit it")
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
