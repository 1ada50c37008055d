"""The benchmark report renderer turns a pytest-benchmark record into a table with ratios."""

from benchmarks import report


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
    assert "| sdpa | B=2 | float32 | 4.000 |" in text and "baseline" in text
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
