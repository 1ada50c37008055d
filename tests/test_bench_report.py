"""The benchmark report renderer turns a pytest-benchmark record into a table with ratios, tells our rows
from the baselines, labels rows that do not run natively, and names what every table ran on."""

import pytest

from benchmarks import report
from benchmarks.timing import time_first_calls


def record():
    def bench(name, median, **extra):
        return {"name": name, "group": "attention", "extra_info": extra,
                "stats": {"median": median, "min": median * 0.9, "rounds": 5}}

    return {"datetime": "2026-11-23T00:00:00", "machine_info": {"hdlm_kernels": {"device": "CPU", "torch": "2.13"}},
            "benchmarks": [bench("test_sdpa", 0.004, shape="B=2", dtype="float32", baseline=True),
                           bench("test_flex", 0.002, shape="B=2", dtype="float32", density=0.31),
                           bench("test_einsum", 0.008, shape="B=2", dtype="float32")]}


def test_markdown_has_one_row_per_benchmark_with_ratios():
    text = report.markdown(record())
    assert "## attention" in text and "device: CPU" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 3
    assert "| sdpa | baseline | B=2 | float32 | 4.000 |" in text and "baseline" in text
    assert "2.00x faster" in text and "2.00x slower" in text and "density=0.31" in text


def test_charts_are_written_when_matplotlib_is_installed(tmp_path):
    paths = report.charts(record(), tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_groups_with_recorded_rates_get_a_tflops_column():
    rated = record()
    for bench, rate in zip(rated["benchmarks"], (12.5, 25.0, 0.0625)):
        bench["extra_info"]["tflops"] = rate
    text = report.markdown(rated)
    assert "| TFLOP/s |" in text
    assert "| 4.000 | 3.600 | 5 | 12.5 | baseline |" in text and "| 0.062 |" in text
    assert "TFLOP/s" not in report.markdown(record())  # no rates recorded: no column


def test_bandwidth_column_and_microsecond_medians():
    rated = record()
    for bench, gbps in zip(rated["benchmarks"], (2500.0, 0.004, 310.0)):
        bench["extra_info"]["gbps"] = gbps
        bench["stats"]["median"] /= 1000  # 4 µs, 2 µs, 8 µs
    text = report.markdown(rated)
    assert "| GB/s |" in text and "| TFLOP/s |" not in text
    assert "| 0.00400 |" in text  # 4 µs in ms, three significant digits
    assert "| 2500.0 |" in text and "| 0.004 |" in text and "gbps=" not in text


def test_tokens_per_second_column():
    rated = record()
    for bench, rate in zip(rated["benchmarks"], (2048.0, 4096.0, 1024.0)):
        bench["extra_info"]["tokens_per_s"] = rate
    text = report.markdown(rated)
    assert "| tokens/s |" in text and "| TFLOP/s |" not in text
    assert "| 4.000 | 3.600 | 5 | 2048.0 | baseline |" in text and "tokens_per_s=" not in text


def test_tables_name_device_dtype_and_shapes():
    text = report.markdown(record())
    assert "device: CPU · dtype: float32 · shape: B=2" in text.split("## attention")[1]
    many = record()
    for index, bench in enumerate(many["benchmarks"]):
        bench["extra_info"]["shape"] = f"B={index + 1}"
        bench["extra_info"]["dtype"] = ["float32", "float16", "float32"][index]
    caption = report.caption(many, many["benchmarks"])
    assert "dtype: float32, float16" in caption and "shape: B=1; B=2; B=3" in caption
    many["benchmarks"].append(dict(many["benchmarks"][0], extra_info={"shape": "B=4"}))
    assert "4 shapes, per row in the table" in report.caption(many, many["benchmarks"])
    pinned = record()
    pinned["machine_info"]["hdlm_kernels"]["cpu_threads"] = 2
    assert report.caption(pinned, pinned["benchmarks"]).startswith("device: CPU, 2 threads ·")
    for bench in pinned["benchmarks"]:
        bench["extra_info"]["threads"] = 1  # a suite that pins one thread says so per row
    assert report.caption(pinned, pinned["benchmarks"]).startswith("device: CPU, 1 thread ·")


def test_our_rows_and_baselines_are_told_apart():
    labelled = record()
    labelled["benchmarks"][1]["extra_info"]["side"] = "ours"
    labelled["benchmarks"].append({"name": "test_gumbel[ours_cpp]", "group": "attention", "extra_info": {},
                                   "stats": {"median": 0.001, "min": 0.001, "rounds": 3}})
    text = report.markdown(labelled)
    assert "| flex | **ours** | B=2 |" in text
    assert "| sdpa | baseline | B=2 |" in text  # the ratio baseline is a baseline without saying so
    assert "| gumbel [ours_cpp] | **ours** |" in text  # older records: inferred from the name
    assert "| einsum |  | B=2 |" in text  # neither recorded nor inferable: left blank, not guessed
    styles = report.bar_styles(labelled["benchmarks"])
    assert styles[0]["color"] == report.COLOURS["baseline"] != styles[1]["color"] == report.COLOURS["ours"]
    assert styles[0]["linewidth"] > styles[1]["linewidth"]  # the row the ratios divide by
    labelled["benchmarks"][0]["extra_info"]["side"] = "theirs"
    with pytest.raises(ValueError, match="side"):
        report.markdown(labelled)


def test_interpreted_and_emulated_rows_are_labelled_with_what_they_measure():
    labelled = record()
    labelled["benchmarks"][1]["extra_info"].update(execution="emulated",
                                                   measures="eager fallback, not the kernel")
    labelled["benchmarks"][2]["extra_info"].update(execution="interpreted")
    text = report.markdown(labelled)
    assert "| flex [emulated] |" in text and "| einsum [interpreted] |" in text
    assert "- [emulated] flex: eager fallback, not the kernel" in text
    assert "- [interpreted] einsum: not recorded" in text
    assert "measures=" not in text and "execution=" not in text
    styles = report.bar_styles(labelled["benchmarks"])
    assert [s["hatch"] for s in styles] == ["", report.HATCHES["emulated"], report.HATCHES["interpreted"]]
    assert "| flex |" in report.markdown(record())  # native rows carry no label
    labelled["benchmarks"][2]["extra_info"].update(execution="emulated", measures="eager fallback, not the kernel")
    assert "- [emulated] flex, einsum: eager fallback, not the kernel" in report.markdown(labelled)  # one line


def test_log_scale_when_times_span_orders_of_magnitude():
    assert report.uses_log_scale([0.01, 5.0]) and not report.uses_log_scale([1.0, 4.0])
    assert not report.uses_log_scale([3.0])


def test_chart_labels_drop_the_parameters_the_title_already_names():
    def named(*names):
        return [{"name": name, "extra_info": {}} for name in names]

    decode = named("test_decode[w16_P256_B1-ours_flex]", "test_decode[w16_P256_B1-sdpa_cache]")
    assert report.chart_labels(decode) == ["decode [ours_flex]", "decode [sdpa_cache]"]
    gumbel = named("test_gumbel[ours_cpp]", "test_gumbel[official_fp64]")
    assert report.chart_labels(gumbel) == ["gumbel [ours_cpp]", "gumbel [official_fp64]"]
    mixed = named("test_tile_map", "test_pack[block-aligned]")
    assert report.chart_labels(mixed) == ["tile_map", "pack [block-aligned]"]


def test_chart_titles_are_wrapped_not_cut():
    group = "generation: 8 samples x d=1024, T=1024 (small: 12 layers, hidden 768, V=50258) " * 2
    title = report.chart_title(group, record(), record()["benchmarks"])
    lines = title.splitlines()
    assert all(len(line) <= report.TITLE_WIDTH for line in lines)
    assert " ".join(lines).count("V=50258") == 2 and "device: CPU" in title


class FakeBenchmark:
    """pytest-benchmark's pedantic protocol: setup() gives (args, kwargs) for each round."""

    def pedantic(self, fn, setup, rounds, iterations, warmup_rounds):
        assert iterations == 1  # setup runs once per round only with one iteration
        return [fn(*setup()[0]) for _ in range(warmup_rounds + rounds)][-1]


def test_first_call_timing_gets_a_fresh_input_every_round():
    made, seen = [], []

    def make():
        made.append(object())
        return made[-1]

    time_first_calls(FakeBenchmark(), seen.append, make, rounds=3)
    assert len(seen) == 4 and seen == made and len({id(x) for x in seen}) == 4


def test_shares_of_the_measured_floors_get_their_own_columns():
    rated = record()
    for bench, (pct, floor) in zip(rated["benchmarks"], ((41.5, 12.0), (83.0, 24.0), (20.75, 6.0))):
        bench["extra_info"].update(tflops=pct, pct_of_matmul=pct, pct_of_floor=floor)
    text = report.markdown(rated)
    assert "| TFLOP/s | % of matmul | % of floor | vs baseline |" in text
    assert "| 41.5 | 41.5 | 12.0 | baseline |" in text and "pct_of_" not in text
