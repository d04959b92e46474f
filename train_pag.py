"""PAG training (Ganz, Kawar & Elad, ICML 2023): cross-entropy plus gradient alignment.

    python train_pag.py --dataset stl                      # ResNet-18, class-mean targets, paper settings
    python train_pag.py --dataset cifar10 --source sbg --sbg-file cifar10_sbg.pt
    python train_pag.py --dataset toy                      # the 2-D toy: MLP, NN targets, lambda 2.5 (x C = 5)

    L(x, y) = CE(f(x), y) + lambda * C * mean_j [1 - cos(grad_x log softmax(f(x))_{t_j}, g(x, t_j))]

over k target classes t_j per image, sampled without replacement (k = C up to 10:
then C * mean is exactly the paper's sum over classes). The training loop is
train_baseline.py's; this file only adds the term.
"""
import argparse

import torch
import torch.nn.functional as F

import data as D
from train_baseline import add_common_args, train

# lambda: official configs (resnet18, vit). cnn (no paper value): 0.25, which trained every source on
# Fashion-MNIST; at 0.5 the NN source stayed at 17% clean with crop/flip and lr drops (README).
# Toy: a public re-run used 5 on the *mean*
# over the two classes, i.e. lambda * C = 5 here; lambda * C = 10 was no better in our runs (83.3%
# clean on seeds 0 and 1 of the first data draw).
PAG_COEFF = {"resnet18": 1.5, "vit": 3.0, "cnn": 0.25, "mlp": 2.5}
DEFAULT_SOURCE = {"toy": "nn"}  # images: "cm" (sbg, the paper's best, needs a precomputed file)


def sample_targets(batch_size, num_classes, k, generator=None):
    """[B, k] distinct random classes per row (without replacement), vectorised."""
    return torch.rand(batch_size, num_classes, generator=generator).argsort(dim=1)[:, :k]


def input_gradients(model, x, target_classes, logits=None, create_graph=True):
    """grad_x log softmax(model(x))_t for every (i, j): t = target_classes[i, j] -> [B, k, *x.shape[1:]].

    One forward (reused if `logits` are given, computed from this x), then one
    vector-Jacobian product per target column j: samples are independent, so
    the gradient of sum_i log p_i[t_ij] w.r.t. x holds every sample's own
    gradient. (One batched VJP over all k via is_grads_batched gives the same
    numbers but measured 1.3-2.7x slower on CPU for cnn, resnet18 and vit.)
    With create_graph the result is differentiable in the model's parameters
    (double back-propagation). In train mode, batch-norm couples the samples
    of a batch, so each gradient carries O(1/B) cross terms, as in the
    official code.
    """
    if logits is None:
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        logits = model(x)
    log_probs = F.log_softmax(logits, dim=1)
    grads = [torch.autograd.grad(log_probs.gather(1, target_classes[:, j: j + 1]).sum(), x,
                                 create_graph=create_graph, retain_graph=True)[0]
             for j in range(target_classes.shape[1])]
    return torch.stack(grads, dim=1)


def pag_loss(model, x, gt_grad, target_classes, logits=None, create_graph=True):
    """Mean over (i, j) of 1 - cos(grad_x log softmax(model(x_i))[t_ij], gt_grad[i, j]).

    x [B, ...]; target_classes [B, k] long; gt_grad [B, k, ...]. Pass `logits`
    (= model(x), with x requiring grad) to reuse the CE forward. Depends only
    on torch.
    """
    grads = input_gradients(model, x, target_classes, logits, create_graph)
    cos = F.cosine_similarity(grads.flatten(2), gt_grad.flatten(2).to(grads.dtype), dim=2, eps=1e-12)
    return (1 - cos).mean()


def make_pag_term(args, data):
    """The per-batch PAG term for train_baseline.train: lambda * C * pag_loss."""
    gt_grad_fn = D.make_source(args.source, data, args.cache_dir, args.seed, args.sbg_file)
    num_classes = data.num_classes
    if args.targets_per_image is None:  # resolved here: a folder dataset knows its classes only now
        args.targets_per_image = min(num_classes, 10)
    k = args.targets_per_image
    if not 1 <= k <= num_classes:
        raise D.UserError(f"--targets-per-image must be in 1..{num_classes}, got {k}")
    chunk = args.pag_chunk or k

    def term(model, x, logits, idx, x_clean, augment, epoch, generator, **_):
        target_classes = sample_targets(len(idx), num_classes, k, generator).to(x.device)
        # Targets are made for the clean image, then get the image's own crop/flip.
        gt_grad = augment(gt_grad_fn(x_clean, target_classes, idx))
        scale = args.pag_first_half_scale if epoch < args.epochs / 2 else 1.0
        weight = args.pag_coeff * scale * num_classes
        if chunk >= k:
            loss = pag_loss(model, x, gt_grad, target_classes, logits)
            return weight * loss, {"pag": loss.item()}
        # Memory bound: back-propagate one chunk of targets at a time, so only one
        # chunk's double-backward graph is alive; the result comes back detached.
        total = 0.0
        for s in range(0, k, chunk):
            part = pag_loss(model, x, gt_grad[:, s: s + chunk], target_classes[:, s: s + chunk], logits)
            share = target_classes[:, s: s + chunk].shape[1] / k
            (weight * share * part).backward(retain_graph=True)
            total += share * part.item()
        return torch.tensor(weight * total, device=x.device), {"pag": total}
    return term


def add_pag_args(p):
    p.add_argument("--source", choices=D.SOURCES,
                   help="ground-truth PAG: oi, cm, nn, sbg (default: sbg with --sbg-file, nn for the toy, else cm)")
    p.add_argument("--sbg-file", help="precomputed score-based fields (sbg.py export, or the official release)")
    p.add_argument("--pag-coeff", type=float, help="lambda (default 1.5 resnet18, 3.0 vit, 0.25 cnn, 2.5 toy mlp)")
    p.add_argument("--pag-first-half-scale", type=float,
                   help="lambda is multiplied by this in the first half of training (default 2/3 for vit, else 1)")
    p.add_argument("--targets-per-image", type=int, help="k target classes per image (default: all classes, at most 10)")
    p.add_argument("--pag-chunk", type=int, help="process targets in chunks of this many to save memory (default: all at once)")
    return p


def resolve_pag_defaults(args):
    args.dataset = D.canonical_dataset(args.dataset)
    args.arch = args.arch or D.DATASETS[args.dataset]["arch"]
    args.source = args.source or ("sbg" if args.sbg_file else DEFAULT_SOURCE.get(args.dataset, "cm"))
    if args.pag_coeff is None:
        args.pag_coeff = PAG_COEFF.get(args.arch, 1.5)  # an unknown arch is refused by the loop
    if args.pag_first_half_scale is None:
        args.pag_first_half_scale = 2 / 3 if args.arch == "vit" else 1.0
    if args.pag_chunk is not None and args.pag_chunk < 1:
        raise D.UserError("--pag-chunk must be at least 1")
    return args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pag_args(add_common_args(p))
    args = resolve_pag_defaults(p.parse_args(argv))
    train(args, make_pag_term, run_name=f"pag_{args.source}")


if __name__ == "__main__":
    D.run_cli(main)
