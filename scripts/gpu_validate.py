"""One prepared GPU validation run (docs/testing.md, "GPU validation"): what an H200 runs in a single call.

Phases, each printed with its wall time, stopping at the first failure with a summary:
  build      ``make venv`` (the project's venv over the machine's torch and triton) with the extension
             and its CUDA sources (16 jobs, sm_90); the later phases run in that venv
  tests      the ``cuda``-marked tests (CUDA == C++ == reference bit for bit, decode CUDA and Triton
             against the reference, cached generation, CUDA graphs, compile)
  sanitizer  compute-sanitizer memcheck and racecheck on small shapes of every CUDA kernel (skipped,
             with the tool's message, where the runtime refuses it)
  bench      the benchmark suites at paper scale with fixed rounds
  sm90       the sm_90 compile gate against the real device (``scripts/sm90_check.py --device``)

Everything is recorded in one folder (default benchmarks/results/gpu-validate): summary.json and
summary.md (phases, times, verdicts), phases.log (every phase's output), sanitizer.log, bench.json,
sm90-resources.json and sm90-resources.md: seven files, so the folder fits what one device call
brings back. Commit it.

``--dry-run`` (or DRY_RUN=1) runs the same phases with CPU stand-ins so that CI keeps the script
working: the build is ``make venv`` as CI made it (a no-op when nothing changed) and an import, the tests are collected, the sanitizer
workload runs on the C++ backends without the sanitizer, the benchmarks are collected, and the gate
compiles one small kernel family.

Usage: python scripts/gpu_validate.py [--dry-run] [--out DIR] [--budget SECONDS] [--phases a,b,...]
       python scripts/gpu_validate.py --workload   (the sanitizer's small-shape workload, by itself)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("build", "tests", "sanitizer", "bench", "sm90")
# Seconds each phase may take on the H200 (the whole run stays under 8 minutes, so that one 10-minute
# device call has time to spare and a second call to rerun).
BUDGET = {"build": 150, "tests": 120, "sanitizer": 60, "bench": 90, "sm90": 60}
BENCH_ROUNDS = 5


# ---------------------------------------------------------------- the sanitizer's workload

def workload(device: str) -> None:
    """Small shapes of every CUDA kernel (the C++ twins with ``device='cpu'``): decode attention in each
    dtype and head dim, with and without split-KV; uniform53; gumbel_argmax; hybrid_step."""
    import torch

    import hdlm_kernels as hk

    sampling_backend = "cuda" if device == "cuda" else "cpp"
    g = torch.Generator().manual_seed(0)
    index = torch.arange(1000, device=device)
    hk.sampling.uniform53(1, 2, 0, index, backend=sampling_backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(5, 301, generator=g).to(device, dtype)
        hk.sampling.gumbel_argmax(logits, 1, 2, backend=sampling_backend)
        x = torch.randint(0, 300, (5,), generator=g).to(device)
        hk.sampling.hybrid_step(x, logits, 0.5, 0.4, 0.1, 300, 1, 2, backend=sampling_backend)
    if device != "cuda":
        return  # the decode kernel has no C++ twin; its reference runs in the tests
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            q, k_new, v_new = (torch.randn(2, 5, 2, head_dim, generator=g).to(device, dtype) for _ in range(3))
            k_cache, v_cache = (torch.randn(2, 300, 2, head_dim, generator=g).to(device, dtype) for _ in range(2))
            cache_len = torch.tensor([0, 211], device=device)
            with torch.no_grad():
                for num_splits in (1, 3, None):
                    hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend="cuda",
                                        num_splits=num_splits)
    torch.cuda.synchronize()


# ---------------------------------------------------------------- phases

class Run:
    def __init__(self, out: Path, dry_run: bool, budget_scale: float):
        self.out, self.dry_run, self.budget_scale = out, dry_run, budget_scale
        self.log = (out / "phases.log").open("w")
        self.phases: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        venv_python = REPO / ".venv" / "bin" / "python"
        self.python = str(venv_python) if venv_python.exists() else sys.executable
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"

    def command(self, name: str, argv: list[str], timeout: float, log=None, env=None) -> tuple[int, str]:
        """Run ``argv``, teeing into phases.log (or ``log``); returns (status, last lines)."""
        sink = log or self.log
        sink.write(f"\n===== {name}: {' '.join(argv)}\n")
        sink.flush()
        # A session of its own, so that a timeout ends the whole tree (make -> pip -> ninja -> compilers).
        process = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            status = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            output = (output or "") + f"\n[timed out after {timeout:.0f} s]"
            status = 124
        sink.write(output)
        sink.flush()
        return status, "\n".join(output.strip().splitlines()[-8:])

    def phase(self, name: str, body) -> bool:
        print(f"== gpu-validate: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            verdict, detail = body(BUDGET[name] * self.budget_scale)
        except Exception as error:  # noqa: BLE001 - a phase that breaks is a failed phase, with its reason
            verdict, detail = "failed", f"{type(error).__name__}: {error}"
        seconds = round(time.perf_counter() - start, 1)
        self.phases.append({"phase": name, "verdict": verdict, "seconds": seconds, "budget_s": BUDGET[name],
                            "detail": detail})
        print(f"== gpu-validate: {name} {verdict} in {seconds} s (budget {BUDGET[name]} s)"
              + (f"\n{detail}" if verdict == "failed" else ""), flush=True)
        return verdict != "failed"

    # -- the phases
    def build(self, timeout):
        env = dict(self.env)
        if not self.dry_run:
            env.update(MAX_JOBS="16", HDLM_KERNELS_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0",
                       HDLM_KERNELS_REQUIRE_EXTENSION="1")
        status, tail = self.command("build", ["make", "venv"], timeout, env=env)
        if status != 0:
            return "failed", tail
        self.python = str(REPO / ".venv" / "bin" / "python")
        probe = "from hdlm_kernels._extension import _C; import hdlm_kernels as hk; assert _C is not None; "
        probe += "print(hk.info())" if self.dry_run else "assert _C.with_cuda, 'no CUDA operators'; print(hk.info())"
        status, tail = self.command("build check", [self.python, "-c", probe], 120)
        return ("passed" if status == 0 else "failed"), tail

    def tests(self, timeout):
        argv = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests", "-x"]
        if self.dry_run:
            argv.append("--collect-only")
        status, tail = self.command("tests", argv, timeout)
        return ("passed" if status == 0 else "failed"), tail

    def sanitizer(self, timeout):
        workload_argv = [self.python, str(Path(__file__).resolve()), "--workload"]
        with (self.out / "sanitizer.log").open("w") as log:
            if self.dry_run:
                status, tail = self.command("sanitizer workload (dry run: C++ backends, no sanitizer)",
                                            workload_argv + ["--device", "cpu"], timeout, log=log)
                return ("passed" if status == 0 else "failed"), tail
            tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
            if not os.path.exists(tool):
                return "skipped", "compute-sanitizer not found"
            verdicts = []
            for check in ("memcheck", "racecheck"):
                status, tail = self.command(f"compute-sanitizer --tool {check}", [
                    tool, "--tool", check, "--error-exitcode", "3", "--target-processes", "all", *workload_argv],
                    timeout / 2, log=log)
                refused = any(word in tail for word in ("Device not supported", "not supported", "error 999"))
                if refused:
                    verdicts.append((check, "skipped", tail))
                elif status != 0:
                    return "failed", f"{check}: {tail}"
                else:
                    verdicts.append((check, "passed", tail))
        skipped = [c for c, v, _ in verdicts if v == "skipped"]
        detail = "; ".join(f"{c}: {v}" for c, v, _ in verdicts)
        return ("skipped" if len(skipped) == len(verdicts) else "passed"), detail

    def bench(self, timeout):
        record = self.out / "bench.json"
        argv = [self.python, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                f"--benchmark-json={record}", f"--benchmark-min-rounds={BENCH_ROUNDS}",
                "--benchmark-max-time=0.000001", "--benchmark-warmup=on", "--benchmark-warmup-iterations=2"]
        if self.dry_run:
            argv = [self.python, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--collect-only"]
        status, tail = self.command("bench", argv, timeout)
        return ("passed" if status == 0 else "failed"), tail

    def sm90(self, timeout):
        argv = [self.python, str(REPO / "scripts" / "sm90_check.py"), "--out-dir", str(self.out),
                "--name", "sm90-resources"]
        argv += ["--only", "attention.backward_delta D=64, dtype=float32", "--no-cuda", "--jobs", "1"] if self.dry_run else ["--device", "--jobs", "16"]
        env = dict(self.env)
        env.pop("TRITON_INTERPRET", None)
        status, tail = self.command("sm90", argv, timeout, env=env)
        return ("passed" if status == 0 else "failed"), tail

    def finish(self, started: float) -> int:
        failed = [p for p in self.phases if p["verdict"] == "failed"]
        total = round(time.perf_counter() - started, 1)
        summary = {"dry_run": self.dry_run, "total_s": total, "phases": self.phases,
                   "verdict": "failed" if failed else "passed"}
        versions = subprocess.run([self.python, "-c", "import json, torch, triton; print(json.dumps({'torch': "
                                   "torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda, "
                                   "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"],
                                  capture_output=True, text=True, env=self.env)
        summary["versions"] = (json.loads(versions.stdout.strip().splitlines()[-1]) if versions.returncode == 0
                               else {"error": versions.stderr.strip()[-300:]})
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = [f"# GPU validation ({'dry run, CPU stand-ins' if self.dry_run else 'device'})", "",
                 f"Versions: {summary['versions']}. Total {total} s.", "",
                 "| phase | verdict | seconds | budget s | detail |", "|---|---|---|---|---|"]
        for p in self.phases:
            detail = p["detail"].replace("\n", " / ").replace("|", "\\|")[:300]
            lines.append(f"| {p['phase']} | {p['verdict']} | {p['seconds']} | {p['budget_s']} | {detail} |")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        self.log.close()
        print(f"== gpu-validate: {summary['verdict']} in {total} s; records in {self.out}")
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu-validate"))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every phase's time limit (the dry run on a 2-core CI machine needs more)")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workload:
        workload(args.device)
        return 0
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; known: {', '.join(PHASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry_run, args.budget_scale * (5 if args.dry_run else 1))
    started = time.perf_counter()
    print(f"== gpu-validate: {'DRY RUN with CPU stand-ins' if args.dry_run else 'device run'}, phases "
          f"{', '.join(phases)}, records in {out}", flush=True)
    for name in PHASES:
        if name in phases and not run.phase(name, getattr(run, name)):
            print(f"== gpu-validate: stopping after the failed phase {name}", flush=True)
            break
    return run.finish(started)


if __name__ == "__main__":
    sys.exit(main())
