"""The benchmark harness: interleaved timing, medians and IQRs, paired ratios, peak memory, machine info.

Machines here are shared and noisy, so a benchmark never compares times taken minutes apart. It runs
its variants interleaved (A B C, B C A, C A B, ...) after a warm-up, and a ratio is the median of
the per-repetition ratios A_i / B_i measured side by side. On CUDA every timer reads after
`torch.cuda.synchronize()`.

    ctx = Context(device=torch.device("cpu"), mode="quick", threads=1)
    times = interleave({"ours": run_ours, "theirs": run_theirs}, ctx.reps, ctx.warmup, ctx.device)
    case = make_case("lenet5 b256", times, ratios={"ours/theirs": ("ours", "theirs", 0.9)})
    write_result(result(ctx, "attack_throughput", "...", [case]), out_dir)

Every result JSON has the keys in RESULT_KEYS; each case has CASE_KEYS; each variant VARIANT_KEYS;
each ratio RATIO_KEYS (see README.md, "Performance" for what they mean).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

RESULT_KEYS = ("name", "description", "mode", "device", "threads", "reps", "warmup", "machine", "cases",
               "passed", "notes", "seconds")
CASE_KEYS = ("case", "params", "variants", "ratios")
VARIANT_KEYS = ("median_s", "iqr_s", "q1_s", "q3_s", "min_s", "times_s")
RATIO_KEYS = ("value", "iqr", "numerator", "denominator", "target", "passed")
MODES = ("tiny", "quick", "full")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Context:
    """What every benchmark gets: where to run, how hard, and how many timed repetitions."""

    device: torch.device
    mode: str = "quick"  # tiny (tests) | quick (minutes) | full
    threads: int = 1
    study_reps: int | None = None  # repetitions of the whole-study benchmarks (None: the mode's)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown bench mode {self.mode!r}; choose one of: {', '.join(MODES)}")

    @property
    def reps(self) -> int:
        return {"tiny": 2, "quick": 7, "full": 15}[self.mode]

    @property
    def warmup(self) -> int:
        return {"tiny": 1, "quick": 2, "full": 3}[self.mode]

    def study_repetitions(self, tiny: int, quick: int, full: int) -> int:
        """Repetitions of a benchmark that runs whole studies (minutes each): --study-reps, else the mode's."""
        return self.study_reps or self.pick(tiny, quick, full)

    def pick(self, tiny, quick, full):
        """The value for this mode."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.mode]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer read afterwards covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(variants: Mapping[str, Callable[[], object]], reps: int, warmup: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed rounds, then `reps` rounds in rotating order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate so no variant always runs first
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); a single value is its own quartiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarize(times: list[float]) -> dict:
    q1, median, q3 = quartiles(times)
    return {"median_s": median, "iqr_s": q3 - q1, "q1_s": q1, "q3_s": q3, "min_s": min(times),
            "times_s": [round(t, 6) for t in times]}


def paired_ratio(times: Mapping[str, list[float]], numerator: str, denominator: str,
                 target: float | None) -> dict:
    """Median (and IQR) of numerator_i / denominator_i over repetitions; passes when <= target."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    q1, median, q3 = quartiles(ratios)
    return {"value": median, "iqr": q3 - q1, "numerator": numerator, "denominator": denominator,
            "target": target, "passed": None if target is None else bool(median <= target)}


def make_case(case: str, times: Mapping[str, list[float]], ratios: Mapping[str, tuple[str, str, float | None]],
              params: Mapping | None = None) -> dict:
    """One compared setting: its variants' summaries and named ratios `name: (num, den, target)`."""
    return {"case": case, "params": dict(params or {}),
            "variants": {name: summarize(t) for name, t in times.items()},
            "ratios": {name: paired_ratio(times, *spec) for name, spec in ratios.items()}}


def result(ctx: Context, name: str, description: str, cases: list[dict], notes: list[str] | None = None,
           seconds: float = 0.0, extra: Mapping | None = None) -> dict:
    """A benchmark's JSON document; `passed` is None when nothing had a target, else all targets met."""
    verdicts = [r["passed"] for c in cases for r in c["ratios"].values() if r["passed"] is not None]
    verdicts += [c["passed"] for c in (extra or {}).get("checks", []) if c.get("passed") is not None]
    doc = {"name": name, "description": description, "mode": ctx.mode, "device": str(ctx.device),
           "threads": ctx.threads, "reps": ctx.reps, "warmup": ctx.warmup, "machine": machine_info(ctx.device),
           "cases": cases, "passed": all(verdicts) if verdicts else None, "notes": list(notes or []),
           "seconds": round(seconds, 2)}
    doc.update(extra or {})
    return doc


def write_result(doc: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['name']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def machine_info(device: torch.device) -> dict:
    """CPU model and cores, torch/CUDA versions, GPU name, torch threads, git commit (+dirty)."""
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpu": None, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def max_rss_bytes() -> int:
    """This process's peak resident set size (since the last `reset_peak_rss`), in bytes.

    Linux: VmHWM from /proc/self/status (ru_maxrss keeps the peak of exited threads, which a reset
    does not clear); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current RSS (Linux >= 4.0; False where unsupported).

    Without it, the peak left by `import torch` can hide a workload that grows less than that peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_isolated(module: str, function: str, kwargs: Mapping, threads: int, timeout: float = 600) -> dict:
    """Call `module.function(**kwargs)` in a fresh Python process and return its JSON-able result.

    Peak memory needs a fresh process per measurement: ru_maxrss is a high-water mark that never
    goes down, and tracemalloc does not see torch's allocations.
    """
    code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[3])); "
            f"from {module} import {function} as f; print('RESULT ' + json.dumps(f(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dict(kwargs)), "", str(threads)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module}.{function} failed in a subprocess (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def format_table(docs: list[dict]) -> str:
    """A Markdown table: one row per ratio with a target or a reference value."""
    rows = ["| benchmark | case | ratio | value (IQR) | target | pass |", "|---|---|---|---|---|---|"]
    for doc in docs:
        for case in doc["cases"]:
            for name, r in case["ratios"].items():
                target = "—" if r["target"] is None else f"≤ {r['target']:g}"
                verdict = "—" if r["passed"] is None else ("yes" if r["passed"] else "**no**")
                rows.append(f"| {doc['name']} | {case['case']} | {name} | {r['value']:.3f} ({r['iqr']:.3f}) "
                            f"| {target} | {verdict} |")
        for check in doc.get("checks", []):
            target = check.get("target_text", "—")
            verdict = "—" if check.get("passed") is None else ("yes" if check["passed"] else "**no**")
            rows.append(f"| {doc['name']} | {check['case']} | {check['name']} | {check['value_text']} "
                        f"| {target} | {verdict} |")
    return "\n".join(rows)
