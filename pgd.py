"""PGD, the project's one: L2 and L-inf, targeted or not, from a random start in the ball; the ball projections;
the check that every adversarial example lies in its ball and box; robust accuracy. Adversarial training
(train_baseline.py), the per-epoch check and attack.py all attack through it (the official code keeps its PGD
in a file of its own too).

    from pgd import pgd, robust_accuracy
    x_adv = pgd(model, x, y, eps=0.5, norm="l2", steps=20, loss="margin")

`pgd` and its helpers (per_sample_norm, project, random_in_ball, attack_loss) need only torch and math.
"""
import math

import torch
import torch.nn.functional as F

from files import UserError


def per_sample_norm(t):
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def project(delta, eps, norm):
    """Project perturbations onto the eps ball of `norm` ("l2" or "linf")."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def random_in_ball(shape, eps, norm, generator=None):
    """Uniform sample from the eps ball (L-inf: a cube; L2: direction x eps*u^(1/d))."""
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator)
    direction = direction / per_sample_norm(direction).clamp_min(1e-12)
    d = math.prod(shape[1:])
    radius = eps * torch.rand(shape[0], generator=generator) ** (1.0 / d)
    return direction * radius.view(-1, *[1] * (len(shape) - 1))


def attack_loss(logits, y, loss="ce"):
    """Summed per-sample loss that an untargeted attack ascends: "ce", "margin"
    (max_{j != y} z_j - z_y, Carlini-Wagner), whose gradient never saturates, or
    a function loss(logits, y) -> scalar (TRADES passes its KL to the clean prediction)."""
    if callable(loss):
        return loss(logits, y)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return (logits.scatter(1, y[:, None], float("-inf")).amax(1) - z_y).sum()


def pgd(model, x, y, eps, norm="l2", steps=10, step_size=None, targeted=False, random_start=True,
        box=(0.0, 1.0), generator=None, loss="ce"):
    """Projected gradient descent; returns x_adv (detached).

    Untargeted: ascend the loss (CE or margin, see attack_loss) at label y.
    Targeted: y holds the target classes and PGD descends it toward them. On a
    very confident model CE saturates (softmax == 1 in float32) and its
    gradient is rounding noise: measured on a tiny synthetic model, CE-PGD left
    33% robust at L2 eps 8 where margin-PGD left 0%. L2 steps follow the per-sample normalised
    gradient, L-inf steps its sign; every iterate is projected onto the eps
    ball around x and clipped to `box` (None: unbounded, e.g. the 2-D toy).
    step_size defaults to 2.5 * eps / steps (Madry et al.). The caller chooses
    the model's mode (eval for evaluation and for crafting training attacks).
    Needs per_sample_norm, project, random_in_ball and attack_loss (above); torch only.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    clip = (lambda t: t.clamp(*box)) if box is not None else (lambda t: t)
    delta = torch.zeros_like(x)
    if random_start and eps > 0:
        delta = random_in_ball(x.shape, eps, norm, generator).to(x)
    x_adv = clip(x + delta)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Summed per-sample losses: each sample's gradient is its own (model in eval mode).
        (grad,) = torch.autograd.grad(attack_loss(model(x_adv), y, loss), x_adv)
        if targeted:
            grad = -grad
        if norm == "linf":
            step = step_size * grad.sign()
        else:
            step = step_size * grad / per_sample_norm(grad).clamp_min(1e-12)
        x_adv = clip(x + project(x_adv.detach() + step - x, eps, norm))
    return x_adv.detach()


def check_perturbation(x_adv, x, eps, norm, box, name):
    """Refuse to count adversarial examples outside their eps ball or the input box, or not finite
    (a point the model cannot classify would silently count as robust or not)."""
    if not bool(torch.isfinite(x_adv).all()):
        raise UserError(f"{name}: the attack produced non-finite inputs at eps {eps:g}; a radius or step this "
                        "large overflows float32 here")
    dist_ = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    if (dist_ > eps * (1 + 1e-4) + 1e-6).any():
        raise RuntimeError(f"{name}: perturbation of {dist_.max().item():.6g} exceeds eps {eps:g} ({norm})")
    if box is not None and ((x_adv < box[0] - 1e-6).any() or (x_adv > box[1] + 1e-6).any()):
        raise RuntimeError(f"{name}: adversarial example leaves the input box {box}")


@torch.no_grad()
def predict(model, x, batch_size=500):
    return torch.cat([model(x[i: i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def runner_up(model, x, y):
    """The most likely wrong class for each point (the target of a 'runner-up' attack)."""
    with torch.no_grad():
        logits = model(x)
    return logits.scatter(1, y[:, None], float("-inf")).argmax(1)


def robust_mask(model, x, y, eps, norm, box, batch_size=250, target="none", progress=None, **pgd_kwargs):
    """Per point: classified right both clean and under PGD (adversarial examples checked in the eps ball).

    target: "none" (untargeted PGD), "runner-up" (targeted toward each point's
    most likely wrong class) or a class index. Either way a point counts as
    robust only if the attacked input still gets its true label.
    """
    masks = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], y[i: i + batch_size]
        if target == "none":
            x_adv = pgd(model, xb, yb, eps, norm, box=box, **pgd_kwargs)
        else:
            tb = runner_up(model, xb, yb) if target == "runner-up" else torch.full_like(yb, int(target))
            x_adv = pgd(model, xb, tb, eps, norm, targeted=True, box=box, **pgd_kwargs)
        check_perturbation(x_adv, xb, eps, norm, box, f"pgd-{norm}")
        with torch.no_grad():
            masks.append((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb))
        if progress:
            progress(min(i + batch_size, len(x)))
    return torch.cat(masks)


def robust_accuracy(*args, **kwargs):
    """Fraction of points that robust_mask counts as robust."""
    return robust_mask(*args, **kwargs).float().mean().item()


def attack_batch_size(data):
    """Images per attack batch: CIFAR's 250, and as many pixels for bigger images (27 at 96 px), so that
    evaluating an STL model takes about the memory of a CIFAR one."""
    pixels = math.prod(data.input_shape[1:]) if data.is_image else 1
    return max(1, min(250, 250 * 32 * 32 // pixels))
