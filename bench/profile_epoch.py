"""Where one PGD-AT epoch's time goes: torch.profiler over the `epoch` benchmark's variants.

    python -m bench.profile_epoch --device cuda          # or --device cpu
    python -m bench.profile_epoch --device cuda --case resnet18

For each variant (nslab with and without bf16 autocast, the plain loop) it prints the wall time of one
profiled epoch, the number of kernels (CUDA) or operator calls (CPU), the busy time of the device, and
the top operators. On a GPU, busy / wall far below 1 means the epoch is bound by kernel launches and
Python, not by arithmetic: a small model then gains nothing from bf16 (autocast adds cast kernels).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.epoch import _data, cases, nslab_epoch, plain_epoch
from bench.harness import Context
from ns_core.models import create_model
from ns_core.utils import pick_device


def profile_variant(name: str, epoch, device: torch.device, top: int) -> dict:
    epoch()  # warm-up: cudnn autotuning, allocator, first-call costs
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6
        count = len(kernels)
        table = events.table(sort_by="device_time_total", row_limit=top)
    else:
        busy = sum(e.self_cpu_time_total for e in events) / 1e6
        count = sum(e.count for e in events)
        table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    print(f"--- {name}: wall {wall:.3f} s, {count} {'kernels' if device.type == 'cuda' else 'op calls'}, "
          f"device busy {busy:.3f} s ({busy / wall:.0%} of wall)")
    print(table)
    return {"variant": name, "wall_s": wall, "count": count, "busy_s": busy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_epoch", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--case", choices=("lenet5", "resnet18", "both"), default="both")
    parser.add_argument("--top", type=int, default=12, help="operators listed per variant")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    ctx = Context(device=device, mode="quick")
    summary = []
    for case in cases(ctx):
        if args.case != "both" and case["model"] != args.case:
            continue
        data = _data(case)
        torch.manual_seed(0)
        base = create_model(case["model"], data.input_shape, 10)
        variants = {"nslab": nslab_epoch(copy.deepcopy(base), data, case, device),
                    "plain": plain_epoch(copy.deepcopy(base), data, case, device, channels_last=False)}
        if device.type == "cuda":
            variants["nslab_fp32"] = nslab_epoch(copy.deepcopy(base), data, case, device, amp=False)
        for name, epoch in variants.items():
            summary.append({"case": case["name"], **profile_variant(f"{case['name']} {name}", epoch, device, args.top)})
    print("\n| case | variant | wall s | kernels/ops | device busy s | busy/wall |\n|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['case']} | {row['variant'].split()[-1]} | {row['wall_s']:.3f} | {row['count']} | "
              f"{row['busy_s']:.3f} | {row['busy_s'] / row['wall_s']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
