"""Render pytest-benchmark JSON records as a markdown table (one section per benchmark group, with
the ratio of each median to the group's baseline and, where a suite records
``extra_info["tflops"]``, ``extra_info["gbps"]`` or ``extra_info["tokens_per_s"]``, a TFLOP/s, GB/s
or tokens/s column) and, when matplotlib is installed, a bar chart
per group. Usable on its own: ``python -m benchmarks.report RECORD.json [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    if value < 0.1:  # microsecond-scale calls (decode): three significant digits rather than whole µs
        return f"{value:#.3g}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(baseline: float, value: float) -> str:
    speedup = baseline / value
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _rate(value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if 0 < value < 0.01:  # CPU-scale rates: two significant digits rather than 0.000
        return f"{value:.2g}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# extra_info key, column title
RATES = (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s"))


def _label(bench: dict) -> str:
    name = re.sub(r"^test_", "", bench["name"])
    return name.replace("[", " [")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def groups(record: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for bench in record["benchmarks"]:
        out.setdefault(bench.get("group") or "ungrouped", []).append(bench)
    return out


def markdown(record: dict) -> str:
    env = record.get("machine_info", {}).get("hdlm_kernels", {})
    lines = [f"# Benchmarks ({record.get('datetime', '')[:19]})", "",
             f"device: {env.get('device', '?')} · torch {env.get('torch', '?')} · triton {env.get('triton')} · "
             f"CUDA {env.get('cuda')} · CPU threads {env.get('cpu_threads', '?')}", ""]
    for group, benches in groups(record).items():
        baseline = next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
        # Suites that know their FLOPs (bytes) record the achieved rate as extra_info["tflops"]
        # (extra_info["gbps"]): one column each, in groups where some record has it.
        rates = [(key, title) for key, title in RATES
                 if any(key in b.get("extra_info", {}) for b in benches)]
        lines += [f"## {group}", "", "| benchmark | shape | dtype | median ms | min ms | rounds | "
                  + "".join(f"{title} | " for _, title in rates) + "vs baseline | notes |",
                  "|---|---|---|---:|---:|---:|" + "---:|" * len(rates) + "---:|---|"]
        for b in benches:
            info = dict(b.get("extra_info", {}))
            shape, dtype = info.pop("shape", ""), info.pop("dtype", "")
            is_baseline = info.pop("baseline", False)
            values = {key: info.pop(key, "") for key, _ in RATES}  # shown in their columns, not the notes
            stats = b["stats"]
            ratio = "baseline" if is_baseline else _ratio(baseline["stats"]["median"], stats["median"]) if baseline else ""
            notes = ", ".join(f"{k}={v}" for k, v in info.items())
            lines.append(f"| {_label(b)} | {shape} | {dtype} | {_ms(stats['median'])} | {_ms(stats['min'])} | "
                         f"{stats['rounds']} | " + "".join(f"{_rate(values[key])} | " for key, _ in rates)
                         + f"{ratio} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def charts(record: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for index, (group, benches) in enumerate(groups(record).items()):
        labels = [_label(b) for b in benches]
        medians = [b["stats"]["median"] * 1e3 for b in benches]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
        ax.barh(labels, medians, color="#4c72b0")
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms)")
        ax.set_title(group)
        for y, value in enumerate(medians):
            ax.text(value, y, f" {value:.3g}", va="center", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{index:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', group).strip('-').lower()}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("record", help="pytest-benchmark JSON file")
    parser.add_argument("--out", default=None, help="directory for report.md and charts")
    args = parser.parse_args(argv)
    record = load(args.record)
    text = markdown(record)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        charts(record, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
