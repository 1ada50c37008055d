"""Render pytest-benchmark JSON records as a markdown report and PNG charts.

One section per benchmark group: a caption naming the device, the dtypes and the shapes, then a table
with the ratio of each median to the group's baseline and, where a suite records
``extra_info["tflops"]``, ``extra_info["gbps"]`` or ``extra_info["tokens_per_s"]``, a TFLOP/s, GB/s or
tokens/s column. When matplotlib is installed, one bar chart per group.

What the suites record, besides shape and dtype, so that a reader can tell rows apart at a glance:

* ``side``: ``"ours"`` (code of this package, any backend, the reference twins included) or
  ``"baseline"`` (other libraries, the official code's recipes, plain PyTorch, other methods). The
  table has a column for it and the charts colour the two differently. ``baseline=True`` marks the
  row the ratios divide by.
* ``execution``: ``"interpreted"`` (Triton kernels in the Triton interpreter) or ``"emulated"`` (a
  CPU stand-in for a GPU path, e.g. FlexAttention's eager fallback) when the row does not run the
  real compiled code; absent means native. Such rows carry the label in the table and the chart, and
  ``measures``, one line on what their time means, is printed under the table.

Usable on its own: ``python -m benchmarks.report RECORD.json [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import os
import re
import textwrap
from pathlib import Path

SIDES = ("ours", "baseline")
EXECUTIONS = ("native", "interpreted", "emulated")
# Colours of the charts: ours in blue, baselines in grey; hatching marks interpreted/emulated rows.
COLOURS = {"ours": "#1f6fb4", "baseline": "#9a9a9a", None: "#d9a441"}
HATCHES = {"interpreted": "xx", "emulated": "//"}
LOG_SCALE_SPAN = 20.0  # charts switch to a log axis when the slowest median is this many times the fastest
TITLE_WIDTH = 70  # characters per chart title line


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
RATES = (("tflops", "TFLOP/s"), ("pct_of_matmul", "% of matmul"), ("gbps", "GB/s"), ("pct_of_copy", "% of copy"),
         ("pct_of_floor", "% of floor"), ("tokens_per_s", "tokens/s"))


def _label(bench: dict) -> str:
    name = re.sub(r"^test_", "", bench["name"])
    return name.replace("[", " [")


def side(bench: dict) -> str | None:
    """``"ours"``, ``"baseline"`` or None (not recorded, and not inferable from the name)."""
    info = bench.get("extra_info", {})
    recorded = info.get("side")
    if recorded in SIDES:
        return recorded
    if recorded is not None:
        raise ValueError(f"benchmark {bench['name']!r}: extra_info['side'] must be one of {SIDES}, "
                         f"got {recorded!r}")
    if re.search(r"(?:^test_|[\[\-_,])ours_", bench["name"]):
        return "ours"
    return "baseline" if info.get("baseline") else None


def execution(bench: dict) -> str:
    """``"native"``, ``"interpreted"`` or ``"emulated"``."""
    recorded = bench.get("extra_info", {}).get("execution", "native")
    if recorded not in EXECUTIONS:
        raise ValueError(f"benchmark {bench['name']!r}: extra_info['execution'] must be one of {EXECUTIONS}, "
                         f"got {recorded!r}")
    return recorded


def display_label(bench: dict) -> str:
    """The row's name, with ``[interpreted]`` / ``[emulated]`` appended when it does not run natively."""
    how = execution(bench)
    return _label(bench) + ("" if how == "native" else f" [{how}]")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def groups(record: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for bench in record["benchmarks"]:
        out.setdefault(bench.get("group") or "ungrouped", []).append(bench)
    return out


def _distinct(values) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value not in ("", None) and str(value) not in seen:
            seen.append(str(value))
    return seen


def caption(record: dict, benches: list[dict]) -> str:
    """One line naming what a group ran on: device (and CPU threads), dtypes and shapes."""
    env = record.get("machine_info", {}).get("hdlm_kernels", {})
    device = env.get("device", "?")
    # Suites that pin the thread count record it per row (extra_info["threads"]); it wins over the
    # session's default.
    threads = _distinct(b.get("extra_info", {}).get("threads") for b in benches) or (
        [str(env["cpu_threads"])] if env.get("cpu_threads") else [])
    if str(device).startswith("CPU") and threads:
        device = f"{device}, {'/'.join(threads)} thread{'' if threads == ['1'] else 's'}"
    dtypes = _distinct(b.get("extra_info", {}).get("dtype") for b in benches) or ["?"]
    shapes = _distinct(b.get("extra_info", {}).get("shape") for b in benches) or ["?"]
    shape_text = "; ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} shapes, per row in the table"
    return f"device: {device} · dtype: {', '.join(dtypes)} · shape: {shape_text}"


def markdown(record: dict) -> str:
    env = record.get("machine_info", {}).get("hdlm_kernels", {})
    lines = [f"# Benchmarks ({record.get('datetime', '')[:19]})", "",
             f"device: {env.get('device', '?')} · torch {env.get('torch', '?')} · triton {env.get('triton')} · "
             f"CUDA {env.get('cuda')} · CPU threads {env.get('cpu_threads', '?')}", "",
             "Column *side*: **ours** is code of this package (any backend, the reference twins included), "
             "*baseline* is everything else (other libraries, the official code's recipes, plain PyTorch, "
             "other methods). *vs baseline* divides by the row marked `baseline` there. Rows marked "
             "[interpreted] or [emulated] do not run the real compiled code; the line under their table "
             "says what they measure.", ""]
    for group, benches in groups(record).items():
        baseline = next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
        # Suites that know their FLOPs (bytes) record the achieved rate as extra_info["tflops"]
        # (extra_info["gbps"]) and its share of the measured floor (benchmarks/roofline.py) as
        # extra_info["pct_of_..."]: one column each, in groups where some record has it.
        rates = [(key, title) for key, title in RATES
                 if any(key in b.get("extra_info", {}) for b in benches)]
        lines += [f"## {group}", "", caption(record, benches), "",
                  "| benchmark | side | shape | dtype | median ms | min ms | rounds | "
                  + "".join(f"{title} | " for _, title in rates) + "vs baseline | notes |",
                  "|---|---|---|---|---:|---:|---:|" + "---:|" * len(rates) + "---:|---|"]
        footnotes: dict[tuple[str, str], list[str]] = {}
        for b in benches:
            info = dict(b.get("extra_info", {}))
            shape, dtype = info.pop("shape", ""), info.pop("dtype", "")
            is_baseline = info.pop("baseline", False)
            for key in ("side", "execution"):
                info.pop(key, None)
            measures = info.pop("measures", None)
            values = {key: info.pop(key, "") for key, _ in RATES}  # shown in their columns, not the notes
            stats = b["stats"]
            ratio = "baseline" if is_baseline else _ratio(baseline["stats"]["median"], stats["median"]) if baseline else ""
            notes = ", ".join(f"{k}={v}" for k, v in info.items())
            who = {"ours": "**ours**", "baseline": "baseline", None: ""}[side(b)]
            lines.append(f"| {display_label(b)} | {who} | {shape} | {dtype} | {_ms(stats['median'])} | "
                         f"{_ms(stats['min'])} | {stats['rounds']} | "
                         + "".join(f"{_rate(values[key])} | " for key, _ in rates) + f"{ratio} | {notes} |")
            if execution(b) != "native":
                footnotes.setdefault((execution(b), measures or "not recorded"), []).append(_label(b))
        lines.append("")
        if footnotes:  # one line per distinct (execution, what it measures), naming its rows
            lines += [f"- [{how}] {', '.join(names)}: {what}" for (how, what), names in footnotes.items()] + [""]
    return "\n".join(lines)


def chart_title(group: str, record: dict, benches: list[dict]) -> str:
    lines = textwrap.wrap(group, TITLE_WIDTH) + textwrap.wrap(caption(record, benches), TITLE_WIDTH)
    return "\n".join(lines)


def uses_log_scale(medians: list[float]) -> bool:
    """Whether the medians span enough orders of magnitude that a linear axis would hide the fast rows."""
    positive = [m for m in medians if m > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= LOG_SCALE_SPAN


def chart_labels(benches: list[dict]) -> list[str]:
    """Row labels for a chart: the display labels without the parameters every row of the group shares
    (``decode [w16_P256_B1-ours_flex]`` -> ``decode [ours_flex]``: the title already says w16_P256_B1)."""
    labels = [display_label(b) for b in benches]
    params = [re.search(r"\[([^\]]*)\]", label) for label in labels]
    if len(labels) < 2 or not all(params):
        return labels
    shared = os.path.commonprefix([m.group(1) for m in params])
    shared = shared[:shared.rfind("-") + 1]  # whole parameters only
    if not shared:
        return labels
    return [label.replace(f"[{shared}", "[", 1) for label in labels]


def _value_text(milliseconds: float) -> str:
    return f" {milliseconds:,.0f}" if milliseconds >= 1000 else f" {milliseconds:.3g}"


def bar_styles(benches: list[dict]) -> list[dict]:
    """Per row of a chart: face colour by side, hatch by execution, a thick edge on the ratio baseline."""
    return [dict(color=COLOURS[side(b)], hatch=HATCHES.get(execution(b), ""),
                 linewidth=1.6 if b.get("extra_info", {}).get("baseline") else 0.4)
            for b in benches]


def charts(record: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return []
    paths = []
    for index, (group, benches) in enumerate(groups(record).items()):
        labels = chart_labels(benches)
        medians = [b["stats"]["median"] * 1e3 for b in benches]
        sides = [side(b) for b in benches]
        executions = [execution(b) for b in benches]
        title = chart_title(group, record, benches)
        title_lines = title.count("\n") + 1
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(labels) + 0.9 + 0.28 * title_lines))
        bars = ax.barh(labels, medians, edgecolor="black")
        for bar, style in zip(bars, bar_styles(benches)):
            bar.set_facecolor(style["color"])
            bar.set_hatch(style["hatch"])
            bar.set_linewidth(style["linewidth"])
        ax.invert_yaxis()
        log = uses_log_scale(medians)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("median time (ms" + (", log scale)" if log else ")"))
        ax.set_title(title, fontsize=9, loc="left")
        for y, value in enumerate(medians):
            ax.text(value, y, _value_text(value), va="center", fontsize=8)
        ax.margins(x=0.15)
        legend = [Patch(facecolor=COLOURS[name], edgecolor="black", label=name) for name in SIDES if name in sides]
        legend += [Patch(facecolor="white", edgecolor="black", hatch=HATCHES[e], label=e)
                   for e in EXECUTIONS[1:] if e in executions]
        if None in sides:
            legend.append(Patch(facecolor=COLOURS[None], edgecolor="black", label="unlabelled"))
        # Outside the axes, so that it never hides a bar or its value; bbox_inches="tight" keeps it.
        ax.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = out_dir / f"{index:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', group).strip('-').lower()}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
