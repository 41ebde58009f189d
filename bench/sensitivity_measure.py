"""Benchmark 3, sensitivity measurement: `measure_sensitivity` over N pairs against two plain forward
passes over the same data (eval mode, no_grad), and its peak memory at N = 1k and 10k pairs.

    python -m bench --only sensitivity_measure --quick

Targets: measure/two_forwards <= 1.2; peak memory flat in N. Memory is measured in a fresh
process per N (ru_maxrss is a high-water mark; on CUDA, torch.cuda.max_memory_allocated), with the
pairs generated batch by batch so the data itself is not held: any growth with N is the code's.
"""

from __future__ import annotations

import time

import torch

from bench.harness import Context, interleave, make_case, max_rss_bytes, reset_peak_rss, result, run_isolated, sync
from ns_core.models import create_model
from ns_core.sensitivity import measure_sensitivity
from ns_core.utils import pick_device

NAME = "sensitivity_measure"
FLAT_TOLERANCE = 0.05  # peak(10k) may exceed peak(1k) by 5% (or 16 MiB) and still count as flat
FLAT_SLACK_BYTES = 16 * 2**20


def make_pairs(n: int, batch: int, shape, device, seed: int = 0):
    """n (x, x_adv) pairs in batches, generated lazily: x uniform, x_adv = x + 0.03-noise, clipped."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.rand(b, *shape, generator=generator, device=device)
        noise = torch.rand(b, *shape, generator=generator, device=device).sub_(0.5).mul_(0.06)
        yield x, (x + noise).clamp_(0, 1)


@torch.no_grad()
def two_forwards(model: torch.nn.Module, pairs) -> None:
    """The limit: one plain forward of x and one of x_adv per batch, nothing kept."""
    for x, x_adv in pairs:
        model(x)
        model(x_adv)


def memory_probe(model_name: str, shape: list[int], n: int, batch: int, device: str, hold: bool = False) -> dict:
    """Run in a fresh process: peak memory of measure_sensitivity over n lazily generated pairs.
    `hold=True` is the control: it materializes all pairs first, to show the probe sees O(N) growth."""
    dev = pick_device(device)
    torch.manual_seed(0)
    model = create_model(model_name, tuple(shape), 10).to(dev).eval()
    measure_sensitivity(model, make_pairs(batch, batch, shape, dev, seed=1), model.default_layers)  # warm up
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.max_memory_allocated(dev)
    reset = reset_peak_rss()
    before_rss = max_rss_bytes()
    pairs = list(make_pairs(n, batch, shape, dev)) if hold else make_pairs(n, batch, shape, dev)
    smap = measure_sensitivity(model, pairs, model.default_layers)
    sync(dev)
    out = {"n": n, "batch": batch, "num_pairs": smap.num_pairs, "peak_rss_bytes": max_rss_bytes(),
           "rss_before_bytes": before_rss, "peak_reset": reset}
    if dev.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["cuda_before_bytes"] = before
    return out


def memory_check(ctx: Context, model_name: str, shape: tuple[int, int, int], batch: int) -> dict:
    """Peak memory at 1k and 10k pairs, each in its own process; flat = within 5% or 16 MiB."""
    sizes = ctx.pick((100, 1000), (1000, 10000), (1000, 10000))
    probes = [run_isolated("bench.sensitivity_measure", "memory_probe",
                           {"model_name": model_name, "shape": list(shape), "n": n, "batch": batch,
                            "device": str(ctx.device)}, ctx.threads) for n in sizes]
    key = "peak_cuda_bytes" if ctx.cuda else "peak_rss_bytes"
    small, large = probes[0][key], probes[1][key]
    growth = large - small
    data_bytes = 2 * sizes[1] * 4 * int(torch.tensor(shape).prod())  # what holding all pairs would cost
    passed = growth <= max(FLAT_TOLERANCE * small, FLAT_SLACK_BYTES)
    control = run_isolated("bench.sensitivity_measure", "memory_probe",
                           {"model_name": model_name, "shape": list(shape), "n": sizes[1], "batch": batch,
                            "device": str(ctx.device), "hold": True}, ctx.threads)
    return {"case": f"{model_name} b{batch}", "name": f"peak memory N={sizes[0]} -> {sizes[1]}",
            "value_text": f"{small / 2**20:.0f} -> {large / 2**20:.0f} MiB ({growth / 2**20:+.1f})",
            "target_text": "flat (≤ +5% or +16 MiB)", "passed": bool(passed), "metric": key,
            "probes": probes, "growth_bytes": growth, "all_pairs_bytes": data_bytes,
            "control_holding_all_pairs": control, "control_growth_bytes": control[key] - small}


def cases(ctx: Context) -> list[tuple[str, tuple[int, int, int], int, int]]:
    """(model, input shape, pairs N, batch) for the timing comparison."""
    if ctx.cuda:
        return [("lenet5", (1, 28, 28), 10000, 1000), ("resnet18", (3, 32, 32), ctx.pick(256, 2048, 4096), 256)]
    return [("lenet5", (1, 28, 28), ctx.pick(256, 1000, 2000), 250),
            ("resnet18", (3, 32, 32), ctx.pick(8, 32, 64), 16)]


def run_case(ctx: Context, model_name: str, shape: tuple[int, int, int], n: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, shape, 10).to(ctx.device).eval()
    pairs = list(make_pairs(n, batch, shape, ctx.device))  # the same tensors for both variants
    variants = {"measure": lambda: measure_sensitivity(model, pairs, model.default_layers),
                "two_forwards": lambda: two_forwards(model, pairs)}
    times = interleave(variants, ctx.reps, ctx.warmup, ctx.device)
    return make_case(f"{model_name} N={n}", times, ratios={"measure/two_forwards": ("measure", "two_forwards", 1.2)},
                     params={"model": model_name, "input_shape": list(shape), "pairs": n, "batch": batch,
                             "layers": list(model.default_layers)})


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    out = [run_case(ctx, *case) for case in cases(ctx)]
    checks = [memory_check(ctx, "lenet5", (1, 28, 28), 250)]
    return result(ctx, NAME, "measure_sensitivity vs two plain forwards; peak memory at 1k and 10k pairs", out,
                  ["memory: each N in a fresh process, pairs generated lazily so only the code's own "
                   "memory can grow; all_pairs_bytes is what holding every pair would take"],
                  time.perf_counter() - start, extra={"checks": checks})
