"""The adaptive attacks: PGD on a defence's own quantity as well as cross-entropy, so that a defence that only
reshapes that quantity is attacked where it claims to be stable (Tramer et al. 2020, "On adaptive attacks to
adversarial example defenses"). feature_pgd targets SNS (the change of the watched neurons), cas_pgd targets CAS
(its channel heads, whose argmax masks pass no gradient). Both share `attacks.adaptive_pgd`: never weaker than
`pgd` at the same budget. Registered in ns_core.attacks.ATTACKS like every other attack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ns_core.attacks import ATTACKS, adaptive_pgd, ce_loss, pgd
from ns_core.cas import cas_forward, cas_heads, heads_cross_entropy
from ns_core.sensitivity import ActivationCapture
from ns_core.utils import eval_mode, frozen_parameters


@ATTACKS.register("feature_pgd")
def feature_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 20,
    norm: str = "linf",
    restarts: int = 1,
    layers: Sequence[str] | None = None,
    weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The adaptive attack on neuron stabilization: PGD on cross-entropy + weight x the mean change of the
    watched layers' activations between x and x' (the quantity SNS keeps small), each layer's change divided
    by its mean benign |activation| so that layers and models of any scale weigh alike: a defence that only
    flattens its watched neurons is pushed exactly where it claims to be stable. From each random start it
    also runs plain cross-entropy PGD and keeps, per example, whichever run fools the model (else the higher
    loss), so it is never weaker than PGD at its budget (2 x steps passes per restart)."""
    layers = list(layers or model.default_layers)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()
    with eval_mode(model), frozen_parameters(model), ActivationCapture(model, layers) as capture:
        with torch.no_grad():
            model(x)
            benign = capture.pop()  # {layer: (N, C, ...)}
        scale = {layer: benign[layer].abs().mean().clamp_min(1e-12) for layer in layers}

        def feature_loss(logits: Tensor, y_: Tensor) -> Tensor:
            adv = capture.pop()
            change = sum((adv[layer] - benign[layer]).abs().flatten(1).mean(1) / scale[layer] for layer in layers)
            return ce_loss(logits, y_) + weight * change / len(layers)  # (N,)

        return adaptive_pgd(model, x, y, feature_loss, eps=eps, alpha=alpha, steps=steps, norm=norm,
                            restarts=restarts, generator=generator)



@ATTACKS.register("cas_pgd")
def cas_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: str = "linf",
    restarts: int = 1,
    beta: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The adaptive attack on channel-wise activation suppressing (ns_core/cas.py): PGD on cross-entropy + beta x
    the mean cross-entropy of the CAS heads of the same test-time forward (CAS's own loss). At test time each CAS
    layer keeps the channels of the class its head predicts, an argmax that passes no gradient, so cross-entropy
    alone cannot see the mask turn; pushing the heads off the label turns it. From each random start it also
    runs plain cross-entropy PGD and keeps, per example, whichever run fools the model (else the higher loss),
    so it is never weaker than `pgd` at its budget (2 x steps passes per restart). Without CAS: `pgd`, draw for
    draw."""
    if cas_heads(model) is None:
        return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=restarts, generator=generator)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()
    with eval_mode(model), frozen_parameters(model), cas_forward(model) as head_logits:

        def cas_loss(logits: Tensor, y_: Tensor) -> Tensor:  # (N,), the heads' logits of the same forward
            return ce_loss(logits, y_) + beta * heads_cross_entropy(head_logits, y_)

        return adaptive_pgd(model, x, y, cas_loss, eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=restarts,
                            generator=generator)
