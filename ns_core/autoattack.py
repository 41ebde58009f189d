"""AutoAttack (Croce & Hein 2020) from its reference implementation, `pyautoattack`, behind one module.

Registered in the attack registry (ns_core/attacks.py) as `autoattack` (the standard version: APGD-CE,
APGD-T, FAB-T and Square with 5,000 queries, cascaded) and as its single stages `apgd_ce`, `apgd_t`,
`fab_t` and `square`, each configured exactly as the standard version configures it. The evaluation
suite expands `autoattack` into its four stages so every stage gets its own row and seconds.

    x_adv = apgd_ce(model, x, y, eps=0.3, generator=make_generator(0, x.device))

Each function keeps nslab's attack contract: [0, 1] inputs, the model in eval mode and restored, its
parameters untouched, and a `generator` for repeatability. pyautoattack reseeds the global torch RNG in
every `perturb`; we hand it a seed drawn from the generator and restore the global RNG afterwards.
`reference_checks` runs AutoAttack's own defence checks (randomized, softmax output, dynamic, classes).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ns_core.utils import eval_mode, frozen_parameters

STAGES = ("autoattack", "apgd_ce", "apgd_t", "fab_t", "square")
STANDARD = ("apgd_ce", "apgd_t", "fab_t", "square")  # the order of AutoAttack's standard version
NORMS = {"linf": "Linf", "l2": "L2"}
logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its progress lines are DEBUG/INFO chatter


def _standard(model: nn.Module, x: Tensor, eps: float, norm: str, seed: int):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=NORMS[norm], eps=eps, version="standard", seed=seed, device=x.device)
    adversary.verbose = False
    return adversary


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator
                             is not None else "cpu")) if generator is not None else 0


@contextlib.contextmanager
def _contract(model: nn.Module, x: Tensor) -> Iterator[None]:
    """eval mode, frozen parameters, and the global RNG as we found it (pyautoattack reseeds it)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with eval_mode(model), frozen_parameters(model), torch.random.fork_rng(devices=devices):
        yield


def _run(stage: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int | None,
         restarts: int, generator: torch.Generator | None) -> Tensor:
    if eps == 0:
        return x.detach().clone()
    x, seed = x.detach(), _seed(generator)
    with _contract(model, x):
        adversary = _standard(model, x, eps, norm, seed)
        if stage == "autoattack":
            return adversary.run_standard_evaluation(x, y, batch_size=len(x))[0].to(x.dtype)
        attack = {"apgd_ce": adversary.apgd, "apgd_t": adversary.apgd_targeted, "fab_t": adversary.fab,
                  "square": adversary.square}[stage]
        attack.seed = seed
        if stage == "apgd_ce":
            attack.loss = "ce"
        if stage == "fab_t":  # as run_standard_evaluation sets it
            attack.targeted, attack.n_restarts = True, 1
        if steps is not None:
            if stage == "square":
                attack.n_queries = steps
            else:
                attack.n_iter = steps
        attack.n_restarts = restarts
        x_adv = attack.perturb(x, y)
    return x_adv.detach().to(x.dtype).clamp_(0, 1)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
               generator: torch.Generator | None = None) -> Tensor:
    """AutoAttack's standard version on this batch (its own cascade; the evaluation suite runs the stages)."""
    return _run("autoattack", model, x, y, eps, norm, None, 1, generator)


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
            restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """APGD on cross-entropy (100 iterations, 1 restart in the standard version)."""
    return _run("apgd_ce", model, x, y, eps, norm, steps, restarts, generator)


def apgd_t(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
           restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Targeted APGD on the DLR loss against the 9 most likely wrong classes (100 iterations each)."""
    return _run("apgd_t", model, x, y, eps, norm, steps, restarts, generator)


def fab_t(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 100,
          restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Targeted FAB (minimal-distortion, 9 target classes, 100 iterations), kept if within eps."""
    return _run("fab_t", model, x, y, eps, norm, steps, restarts, generator)


def square(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 5000,
           restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Square Attack: gradient-free random search, `steps` = queries (5,000 in the standard version)."""
    return _run("square", model, x, y, eps, norm, steps, restarts, generator)


class _Recorder:
    """Stands in for AutoAttack's logger: keeps the warnings its checks raise."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, message: str) -> None:
        self.messages.append(message)


def reference_checks(model: nn.Module, x: Tensor, y: Tensor, num_classes: int,
                     batch_size: int = 256) -> list[tuple[str, bool, str]]:
    """AutoAttack's own checks on (x, y): (name, flagged, detail) for randomized, output_range, dynamic and
    classes. check_dynamic traces one forward with sys.settrace: its global counter is reset first and any
    tracer already installed (a debugger, coverage) is put back afterwards."""
    from pyautoattack import checks

    x, y = x[:batch_size], y[:batch_size]
    results = []
    with eval_mode(model):
        for name, run in (
            ("randomized", lambda log: checks.check_randomized(model, x, y, bs=len(x), logger=log)),
            ("output_range", lambda log: checks.check_range_output(model, x, logger=log)),
            ("dynamic", lambda log: _check_dynamic(checks, model, x, log)),
            ("classes", lambda log: checks.check_n_classes(num_classes, list(_AA_NAMES), 9, 9, logger=log)),
        ):
            recorder = _Recorder()
            run(recorder)
            flagged = bool(recorder.messages)
            detail = recorder.messages[0].split(" See ")[0] if flagged else f"AutoAttack's check_{name}: nothing found"
            results.append((name, flagged, detail))
    return results


_AA_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")


def _check_dynamic(checks, model: nn.Module, x: Tensor, log: _Recorder) -> None:
    previous = sys.gettrace()
    for key in checks.funcs:
        checks.funcs[key] = 0
    try:
        checks.check_dynamic(model, x, False, logger=log)
    finally:
        sys.settrace(previous)
