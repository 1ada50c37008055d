"""Render pytest-benchmark JSON records as a markdown table (one section per benchmark group, with
the ratio of each median to the group's baseline and, where a suite records ``extra_info["tflops"]``,
a TFLOP/s column) and, when matplotlib is installed, a bar chart per group. Usable on its own:
``python -m benchmarks.report RECORD.json [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(baseline: float, value: float) -> str:
    speedup = baseline / value
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _rate(tflops) -> str:
    if not isinstance(tflops, (int, float)):
        return str(tflops)
    return f"{tflops:.3f}" if tflops < 10 else f"{tflops:.1f}"


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
        # Suites that know their FLOPs record the achieved rate as extra_info["tflops"]: own column.
        rates = any("tflops" in b.get("extra_info", {}) for b in benches)
        lines += [f"## {group}", "", "| benchmark | shape | dtype | median ms | min ms | rounds | "
                  + ("TFLOP/s | " if rates else "") + "vs baseline | notes |",
                  "|---|---|---|---:|---:|---:|" + ("---:|" if rates else "") + "---:|---|"]
        for b in benches:
            info = dict(b.get("extra_info", {}))
            shape, dtype = info.pop("shape", ""), info.pop("dtype", "")
            is_baseline = info.pop("baseline", False)
            rate = info.pop("tflops", "")
            stats = b["stats"]
            ratio = "baseline" if is_baseline else _ratio(baseline["stats"]["median"], stats["median"]) if baseline else ""
            notes = ", ".join(f"{k}={v}" for k, v in info.items())
            lines.append(f"| {_label(b)} | {shape} | {dtype} | {_ms(stats['median'])} | {_ms(stats['min'])} | "
                         f"{stats['rounds']} | " + (f"{_rate(rate)} | " if rates else "") + f"{ratio} | {notes} |")
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
