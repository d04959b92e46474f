"""PAG training (Ganz, Kawar & Elad, ICML 2023): cross-entropy plus gradient alignment.

    python train_pag.py --dataset stl                      # ResNet-18, class-mean targets, paper settings
    python train_pag.py --dataset cifar10 --source sbg --sbg-file cifar10_sbg.pt
    python train_pag.py --dataset toy                      # the 2-D toy: MLP, NN targets, lambda 5 (x C = 10), float64

    L(x, y) = CE(f(x), y) + lambda * C * mean_j [1 - cos(grad_x log softmax(f(x))_{t_j}, g(x, t_j))]

over k target classes t_j per image, sampled without replacement (k = C up to 10:
then C * mean is exactly the paper's sum over classes). The training loop is
train_baseline.py's; this file only adds the term.

How the gradients are taken (`input_gradients`), as the official code does: every image
is repeated k times and ONE forward of the B*k replicas (train mode) gives every
gradient, so batch-norm statistics are shared by all replicas of the batch. Exact
replicas have the plain batch's mean and variance, so the same forward also gives
the CE logits (read from each image's first replica): one forward per step, and the
running statistics are updated once per step (the official code's separate CE
forward updates them twice). Where no layer couples the samples of a batch (no
batch-norm in train mode) a per-target-column product on the plain batch gives
identical numbers; it is used there on the CPU, where it measured faster (cnn 2.8x,
vit 1.8x), and the replicated forward everywhere else.
"""
import torch
import torch.nn.functional as F

import cli
import data as D
import sources as S
from files import UserError
from train_baseline import Method, add_common_args, classification_loss, eval_images, train

FORMULATIONS = ("auto", "replicated", "per-column")


# ----------------------------------------------------------------------------- the method (torch only)
def sample_targets(batch_size, num_classes, k, generator=None):
    """[B, k] distinct random classes per row (without replacement), vectorised."""
    return torch.rand(batch_size, num_classes, generator=generator).argsort(dim=1)[:, :k]


def couples_samples(model):
    """Whether a layer mixes the samples of a batch: batch-norm in train mode."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def at_least_fp32(t):
    """Losses and cosines in (at least) float32, also under bf16 autocast."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def input_gradients(model, x, target_classes, create_graph=True, formulation="auto"):
    """(grads [B, k, *x.shape[1:]], logits [B, C]): grads[i, j] = grad_x log softmax(model(x))_t at
    x_i for t = target_classes[i, j], and the logits of x.

    "replicated" (the official computation): each image repeated k times, one forward of the
    B*k replicas, one gradient of sum_r log p_r[t_r] w.r.t. the replicas. Under train-mode
    batch-norm all replicas share the batch statistics (the plain batch's, as replicas are
    exact), so every gradient carries O(1/(B*k)) cross terms from all of them.
    "per-column": one forward of x, then one vector-Jacobian product per target column j.
    Identical where no layer couples samples; "auto" takes "replicated" under train-mode
    batch-norm or on a GPU (per-column launches k small backward passes and is
    launch-bound there), else "per-column" (faster on a CPU).
    With create_graph the grads are differentiable in the weights (double back-propagation).
    """
    b, k = target_classes.shape
    if formulation == "auto":
        formulation = "replicated" if x.is_cuda or couples_samples(model) else "per-column"
    if formulation == "replicated":
        replicas = x.detach().repeat_interleave(k, 0).requires_grad_(True)
        logits = model(replicas)
        log_probs = F.log_softmax(at_least_fp32(logits), dim=1).gather(1, target_classes.reshape(-1, 1))
        (grads,) = torch.autograd.grad(log_probs.sum(), replicas, create_graph=create_graph)
        return grads.view(b, k, *x.shape[1:]), logits.view(b, k, -1)[:, 0]
    if formulation != "per-column":
        raise ValueError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")
    x = x.detach().requires_grad_(True)
    logits = model(x)
    log_probs = F.log_softmax(at_least_fp32(logits), dim=1)
    grads = [torch.autograd.grad(log_probs.gather(1, target_classes[:, j: j + 1]).sum(), x,
                                 create_graph=create_graph, retain_graph=True)[0] for j in range(k)]
    return torch.stack(grads, dim=1), logits


def pag_loss(model, x, gt_grad, target_classes, create_graph=True, formulation="auto", return_logits=False):
    """Mean over (i, j) of 1 - cos(grad_x log softmax(model(x_i))[t_ij], gt_grad[i, j]).

    x [B, ...]; target_classes [B, k] long; gt_grad [B, k, ...]. With return_logits, also
    model(x) from the same forward (for the CE). Cosines in float32 under autocast.
    Depends only on torch.
    """
    grads, logits = input_gradients(model, x, target_classes, create_graph, formulation)
    grads = at_least_fp32(grads)
    cos = F.cosine_similarity(grads.flatten(2), gt_grad.flatten(2).to(grads.dtype), dim=2, eps=1e-12)
    loss = (1 - cos).mean()
    return (loss, logits) if return_logits else loss


class isolated_pass:
    """`with isolated_pass(model, no_sync):` a forward/backward pass whose effects stay local: batch-norm
    keeps its running statistics (and counters), and `no_sync()` (DDP's, if given) keeps the
    gradients from being synchronised. A class, so that it pastes with torch alone."""

    def __init__(self, model, no_sync=None):
        self.norms = [m for m in model.modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        self.sync_off = no_sync() if no_sync is not None else None

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        if self.sync_off is not None:
            self.sync_off.__enter__()
        return self

    def __exit__(self, *exc):
        for m, (momentum, count) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        if self.sync_off is not None:
            self.sync_off.__exit__(*exc)


def chunked_pag_loss(model, x, gt_grad, target_classes, weight, chunk, formulation="auto", no_sync=None):
    """weight * pag_loss over all k targets, `chunk` targets per forward pass, to bound memory.

    Every pass but the last is back-propagated here (its graph freed at once; inside
    `no_sync()`, so that DDP synchronises gradients once, with the last) and the loss
    comes back with the last pass's graph only, though its value is the whole term's
    (the earlier passes enter as a constant). Every pass holds each image, so the
    last pass's logits are the batch's (for the CE). Running statistics are updated
    by the last pass only: once per step, however many passes. Under batch-norm a
    pass's replicas share statistics only among themselves.
    Returns (weight * mean of 1 - cos over all k, logits, that mean, detached).
    """
    k = target_classes.shape[1]
    starts = list(range(0, k, chunk))
    done = 0.0  # the earlier passes' share of the mean, detached (no wait for the GPU here)
    for s in starts[:-1]:
        with isolated_pass(model, no_sync):
            part = pag_loss(model, x, gt_grad[:, s: s + chunk], target_classes[:, s: s + chunk],
                            formulation=formulation) * (min(chunk, k - s) / k)
            (weight * part).backward()
        done = done + part.detach()
    s = starts[-1]
    part, logits = pag_loss(model, x, gt_grad[:, s:], target_classes[:, s:], formulation=formulation,
                            return_logits=True)
    part = part * ((k - s) / k) + done
    return weight * part, logits, part.detach()


# ----------------------------------------------------------------------------- the script: defaults, loss, checks
# The PAG flags' defaults, in one place (docs/choices.md says why). Per dataset: the source of the ground truth
# (sbg needs a file, so cm for images; nn for the toy) and pag_chunk, the targets per forward pass: fixed per
# dataset, never chosen from the GPU at hand, because under batch-norm a pass's replicas share statistics only
# among themselves, so the chunk is part of the result. STL (96 px, batch 32, k 10) all at once needs ~35 GiB,
# 4 per pass ~14 GiB. Per architecture: lambda and its factor in the first half of training: the official
# configs for resnet18 (1.5) and vit (3.0, at 2/3 in the first half: "stabilises training at a small robustness
# cost"); the small cnn 0.1 on natural images (bench/cifar10.py: at 0.2 and 0.25 it stays near chance on
# CIFAR-10 images), 0.25 on Fashion-MNIST (its claims bench chose it on validation images; synthetic, the
# tests' data, keeps it); the toy's mlp 5 (its public re-run puts 5 on the *sum* over its two classes: 5 *
# sum_classes (1 - mean cos), i.e. lambda * C = 10). Beyond 10 classes lambda is scaled by 10 / C
# (pag_coeff_default).
PAG_DATASET_DEFAULTS = {name: dict(source="nn" if name == "toy" else "cm", pag_chunk=4 if name == "stl10" else None)
                        for name in D.DATASETS}
PAG_ARCH_DEFAULTS = {
    "resnet18": dict(pag_coeff=1.5, pag_first_half_scale=1.0),
    "vit": dict(pag_coeff=3.0, pag_first_half_scale=2 / 3),
    "cnn": dict(pag_coeff=0.1, pag_first_half_scale=1.0),
    "mlp": dict(pag_coeff=5.0, pag_first_half_scale=1.0),
}
CNN_PAG_COEFF = {"fashion-mnist": 0.25, "synthetic": 0.25}  # the cnn's lambda where it is not 0.1


def pag_coeff_default(arch, num_classes, dataset=None):
    """The default lambda for `arch` on C classes of `dataset`: the architecture's (PAG_ARCH_DEFAULTS, or
    CNN_PAG_COEFF's for the cnn), times 10 / C beyond 10 classes, so that the PAG term weighs against the CE as
    in the official code (10 * mean of 1 - cos over 10 targets): CIFAR-100 resnet18 gets 0.15 (lambda * C = 15)."""
    lam = PAG_ARCH_DEFAULTS[arch]["pag_coeff"]
    if arch == "cnn":
        lam = CNN_PAG_COEFF.get(dataset, lam)
    return lam * min(num_classes, 10) / num_classes


def pag_weight(settings, num_classes, epoch):
    """What multiplies the mean (1 - cos) PAG term in an epoch (0-based): lambda (settings.pag_coeff, by
    default pag_coeff_default) x C, as the official code's sum over classes, x pag_first_half_scale in the
    first half of training (the ViT's 2/3)."""
    scale = settings.pag_first_half_scale if epoch < settings.epochs / 2 else 1.0
    return settings.pag_coeff * num_classes * scale


def pag_defaults(s, data):
    """PAG's unset flags, filled once (train_baseline.resolve_settings calls it): the source (sbg when fields are
    given), the targets per pass, lambda and its first-half factor, k."""
    if s["source"] is None and s["sbg_file"]:
        s["source"] = "sbg"  # fields given: the paper's best source
    for key, value in {**PAG_DATASET_DEFAULTS[data.name], **PAG_ARCH_DEFAULTS[s["arch"]],
                       "targets_per_image": min(data.num_classes, 10),
                       "pag_coeff": pag_coeff_default(s["arch"], data.num_classes, data.name)}.items():
        if s.get(key) is None:
            s[key] = value
    if not 1 <= s["targets_per_image"] <= data.num_classes:
        raise UserError(f"--targets-per-image must be in 1..{data.num_classes}, got {s['targets_per_image']}")


def describe(args, data):
    """PAG's part of a run's first line."""
    return (f", PAG source {args.source} lambda {args.pag_coeff:g} (x C = {args.pag_coeff * data.num_classes:g}), "
            f"{args.targets_per_image} targets per image")


def make_pag_loss(args, data):
    """train_pag.py's loss: the classification loss (CE, or --adv's) + lambda * C * pag_loss."""
    gt_grad_fn = S.make_source(args.source, data, args.cache_dir, args.seed, args.sbg_file)
    num_classes, k = data.num_classes, args.targets_per_image
    chunk = min(args.pag_chunk or k, k)

    def loss_fn(model, train_model, batch):
        target_classes = sample_targets(len(batch.idx), num_classes, k, batch.generator).to(batch.x.device)
        # Targets are made for the clean image, then get the image's own crop/flip.
        gt_grad = batch.augment(gt_grad_fn(batch.x_clean, target_classes, batch.idx))
        term, logits, pag = chunked_pag_loss(train_model, batch.x, gt_grad, target_classes,
                                             pag_weight(args, num_classes, batch.epoch), chunk, args.pag_formulation,
                                             getattr(train_model, "no_sync", None))
        class_loss, logs = classification_loss(model, train_model, batch, logits, args, data.box)
        return class_loss + term, {**logs, "pag": pag}
    # The fields by content: --resume refuses a file exported again under the same path.
    loss_fn.input_files_sha256 = {"sbg_file": gt_grad_fn.file_sha256} if args.source == "sbg" else {}
    return loss_fn


def not_learning(row, args, data):
    """A warning for a run whose PAG term keeps it from learning its classes (None if it learns): after epochs 2
    and 3, the per-epoch check's accuracy still near chance (less than a tenth of the way from chance to 100%;
    chance: always answering the check's most common class) while lambda * C * mean(1 - cos) is a sizable part
    of the loss (at least a quarter of the classification term). Measured on CIFAR-10 images with the cnn
    (bench/NOTES.md): lambda 0.2 stays near chance, 0.1 learns; no default fits every dataset, so the run says
    it and what to try."""
    epoch, split = row["epoch"], row["eval_split"]
    classification = row.get("ce", row.get("adv"))
    if not 2 <= epoch <= 3 or "pag" not in row or classification is None:
        return None
    _, y = eval_images(data, args.eval_samples)
    chance, acc = y.bincount().max().item() / len(y), row[f"{split}_acc"]
    term = pag_weight(args, data.num_classes, epoch - 1) * row["pag"]
    if acc >= chance + 0.1 * (1 - chance) or term < 0.25 * classification:
        return None
    smaller = float(f"{args.pag_coeff / 3:.1g}")
    return (f"after {epoch} epochs the {split} accuracy is {acc:.1%}, near chance ({chance:.1%}), while the PAG term "
            f"(lambda x C x mean(1 - cos) = {term:.2f}) weighs against a {'cross-entropy' if 'ce' in row else 'loss'} "
            f"of {classification:.2f}: this run is not learning its classes. Stop it (Ctrl-C) and try a smaller lambda, "
            f"e.g. --pag-coeff {smaller:g} (lambda {args.pag_coeff:g} now; choose it on held-out images with "
            "--val-samples: README, 'Your own images')")


def add_pag_args(p):
    p.add_argument("--source", choices=S.SOURCES,
                   help="ground-truth PAG: oi, cm, nn, sbg (default: sbg with --sbg-file, nn for the toy, else cm)")
    p.add_argument("--sbg-file", help="precomputed score-based fields (sbg.py export, or the official release)")
    p.add_argument("--pag-coeff", type=cli.loss_weight,
                   help="lambda (default: 1.5 resnet18, 3.0 vit, 0.1 cnn (0.25 on fashion-mnist), 5 toy mlp; times 10/C beyond 10 classes, "
                        "e.g. 0.15 for CIFAR-100 resnet18: the official code's weight)")
    p.add_argument("--pag-first-half-scale", type=cli.loss_weight,
                   help="lambda is multiplied by this in the first half of training (default: 2/3 for vit, else 1)")
    p.add_argument("--targets-per-image", type=cli.positive_int,
                   help="k target classes per image (default: all classes, at most 10)")
    p.add_argument("--pag-chunk", type=cli.positive_int,
                   help="targets per forward pass, to bound memory (default: all k at once; 4 for STL: PAG_DATASET_DEFAULTS). Under "
                        "batch-norm a pass's B*chunk replicas share batch statistics only among themselves, so "
                        "the chunk is part of the result; bench/README.md: memory per paper setting)")
    p.add_argument("--pag-formulation", default="auto", choices=FORMULATIONS,
                   help="how input-gradients are taken: replicated (the official code's one forward of B*k "
                        "replicas), per-column (one product per target column on the plain batch; identical "
                        "without batch-norm), auto (replicated on a GPU or under batch-norm)")
    return p


PAG = Method(name=lambda args: f"pag_{args.source}", make_loss=make_pag_loss, defaults=pag_defaults, describe=describe,
             check_epoch=not_learning, epochs_matter=lambda flags: flags.get("pag_first_half_scale", 1.0) not in (1.0, None))


def main(argv=None):
    p = add_pag_args(add_common_args(cli.Parser(description=__doc__)))
    train(p.parse_args(argv), PAG)


if __name__ == "__main__":
    cli.run_cli(main)
