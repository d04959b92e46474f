"""Evaluate a checkpoint: clean accuracy, PGD, AutoAttack, gradient alignment, pictures.

    python attack.py --checkpoint runs/pag_cm_cifar10_resnet18/model.pt --attacks clean pgd-l2 aa-l2 aa-linf align visualize

The checkpoint alone rebuilds the model and its test data (the same first N test
images for every attack). Every adversarial example is checked to lie in its
eps ball and in the input box before it is counted, and robust accuracy counts
a point only if it is classified correctly both clean and attacked.
The PGD is train_baseline.py's (the project's one, which adversarial training uses too).
"""
import logging
import math
import os

import torch

import data as D
from train_baseline import (Progress, attack_batch_size, check_perturbation, load_checkpoint, pgd, pick_device, predict,
                            robust_mask)
from train_pag import pag_loss, sample_targets

ATTACKS = ("clean", "pgd-l2", "pgd-linf", "aa-l2", "aa-linf", "exact-l2", "align", "visualize")


# ----------------------------------------------------------------------------- evaluation helpers
@torch.no_grad()
def boundary_distance_2d(model, x, y, max_radius, directions=360, radial_step=0.25, refine_steps=12, batch=32):
    """Per 2-D point: L2 distance to the nearest input the model does not label y (0 if x itself
    is wrong, inf if none within max_radius).

    Attack-free, so it checks what PGD reports: in 2-D the whole eps ball can be searched. Each of
    `directions` rays is sampled every `radial_step`; the first wrong sample is refined by bisection
    (to radial_step / 2**refine_steps). Exact up to the grid: a wrong region thinner than the ray
    spacing (2*pi*r/directions) or than radial_step along every ray can be missed.
    """
    angles = torch.arange(directions, device=x.device) * (2 * math.pi / directions)
    rays = torch.stack([angles.cos(), angles.sin()], dim=1)  # [D, 2]
    radii = torch.arange(int(math.ceil(max_radius / radial_step)) + 1, device=x.device) * radial_step  # [R], from 0
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i: i + batch], y[i: i + batch]
        wrong_at = lambda r: model((xb[:, None] + r[..., None] * rays).reshape(-1, 2)).argmax(1).view(r.shape) != yb[:, None]  # noqa: E731
        wrong = model((xb[:, None, None] + radii[:, None] * rays[:, None, :]).reshape(-1, 2)).argmax(1)
        wrong = wrong.view(len(xb), directions, len(radii)) != yb[:, None, None]  # [P, D, R]
        hit, first = wrong.any(2), wrong.float().argmax(2)  # first wrong sample on each ray
        hi, lo = radii[first], radii[(first - 1).clamp_min(0)]
        for _ in range(refine_steps):  # the boundary lies in (lo, hi]
            mid = (lo + hi) / 2
            w = wrong_at(mid)
            hi, lo = torch.where(w, mid, hi), torch.where(w, lo, mid)
        dist = torch.where(hit, torch.where(first == 0, torch.zeros_like(hi), hi), torch.full_like(hi, float("inf")))
        out.append(dist.amin(1))
    return torch.cat(out)


def import_autoattack():
    """AutoAttack class and its flavour: PyPI's `pyautoattack`, else upstream `autoattack`."""
    try:
        from pyautoattack import AutoAttack
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack
        return AutoAttack, "autoattack"
    except ImportError:
        raise D.UserError("AutoAttack is not installed: pip install pyautoattack") from None


def autoattack_accuracy(model, x, y, eps, norm, box, version="standard", seed=0, batch_size=250, n_iter=None):
    """Robust accuracy under AutoAttack.

    version "standard": APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020).
    version "apgd": its APGD-CE + APGD-T part with standard settings (the cheap
    core: on our CPU runs FAB-T and Square changed no result; README, Fashion-MNIST).
    n_iter overrides the APGD iterations (tests use a handful).
    """
    AutoAttack, flavour = import_autoattack()
    attacks = ["apgd-ce", "apgd-t"] if version == "apgd" else None
    kw = dict(norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps, seed=seed, device=x.device,
              version="custom" if attacks else "standard")
    if flavour == "pyautoattack":
        adversary = AutoAttack(model, attacks=attacks, **kw)
    else:
        adversary = AutoAttack(model, attacks_to_run=attacks or [], verbose=False, **kw)
    # Standard settings, and never more target classes than there are other classes.
    num_classes = model(x[:1]).shape[1]
    adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    adversary.fab.n_target_classes = min(9, num_classes - 1)
    if n_iter is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = n_iter
        adversary.square.n_queries = n_iter
    if flavour == "pyautoattack":
        out = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    else:
        out = adversary.run_standard_evaluation(x, y, bs=batch_size)
    x_adv = out[0] if isinstance(out, tuple) else out  # pyautoattack returns (x_adv, y_adv)
    check_perturbation(x_adv, x, eps, norm, box, f"autoattack-{norm}")
    clean = predict(model, x) == y
    return (clean & (predict(model, x_adv) == y)).float().mean().item()


def alignment(model, x, gt_grad_fn, num_classes, targets_per_image=None, batch_size=100, seed=0, indices=None):
    """Mean cosine between grad_x log softmax(f(x))_t and the source's g(x, t).

    Over all classes (or k sampled per image), on the given (test) images: the
    paper's measure linking PAG to robustness, comparable across models because
    the targets depend only on the source, not on the model. gt_grad_fn(x, t, idx)
    gets the images' dataset indices when `indices` is given (training images).
    """
    gen = torch.Generator().manual_seed(seed)
    k = targets_per_image or num_classes
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        target_classes = sample_targets(len(xb), num_classes, k, gen).to(x.device)
        gt = gt_grad_fn(xb, target_classes, None if indices is None else indices[i: i + batch_size])
        total += (1 - pag_loss(model, xb, gt, target_classes, create_graph=False)).item() * len(xb)
    return total / len(x)


# ----------------------------------------------------------------------------- pictures
def visualize(model, ckpt, data, x, args, path):
    """Images (paper fig. 1): rows of test images, the original first, then one column per target
    class, each the result of a large-eps targeted L2 PGD toward that class; labelled, eps in the
    title. 2-D: the decision regions, with the ground-truth field of a PAG model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    if not data.is_image:
        import toy_data

        arrows = None
        if ckpt["pag_source"]:  # a PAG model: show the field it was trained to follow
            arrows = toy_data.ground_truth_arrows(data.train_x.cpu(), data.train_y.cpu())
        dev = next(model.parameters()).device
        toy_data.save_toy_figure(path, data.test_x.cpu(), data.test_y.cpu(),
                                 predict=lambda p: predict(model, p.to(dev), 65536).cpu(), arrows=arrows,
                                 title=f"{run}: decision regions")
        return
    n, shown = args.vis_images, min(data.num_classes, 10)
    xs = x[:n]
    eps = args.vis_eps if args.vis_eps is not None else 10 * D.DATASETS[data.name]["eps_l2"]
    # [n, shown] grid of (image, target class) pairs, attacked in one batch.
    src = xs.repeat_interleave(shown, 0)
    targets = torch.arange(shown, device=x.device).repeat(len(xs))
    adv = pgd(model, src, targets, eps, "l2", steps=args.vis_steps, targeted=True, random_start=False, box=data.box)
    grid = torch.cat([xs[:, None], adv.view(len(xs), shown, *xs.shape[1:])], dim=1).cpu()  # [n, 1 + shown, C, H, W]
    fig, axes = plt.subplots(len(xs), shown + 1, figsize=(1.1 * (shown + 1), 1.15 * len(xs) + 0.9), squeeze=False)
    for i in range(len(xs)):
        for j in range(shown + 1):
            img = grid[i, j].permute(1, 2, 0).numpy()
            axes[i, j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                              vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title("original" if j == 0 else f"→ {data.class_name(j - 1)}", fontsize=8)
    fig.suptitle(f"{run}: targeted L2 PGD toward each class, ε = {eps:g}, {args.vis_steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = D.Parser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model.pt written by a training script")
    p.add_argument("--attacks", nargs="+", default=["clean", "pgd-l2", "pgd-linf"], choices=ATTACKS, help="what to measure")
    p.add_argument("--eps-l2", type=D.nonneg_float, nargs="+", help="L2 radii (default: the dataset's, e.g. 0.5 for CIFAR)")
    p.add_argument("--eps-linf", type=D.nonneg_float, nargs="+", help="L-inf radii (default: 8/255 for CIFAR/STL, 0.1 Fashion-MNIST)")
    p.add_argument("--steps", type=D.positive_int, default=20, help="PGD iterations")
    p.add_argument("--step-size", type=D.positive_float, help="PGD step (default: 2.5*eps/steps)")
    p.add_argument("--pgd-loss", default="margin", choices=("margin", "ce"),
                   help="margin (default: does not saturate on confident models) or ce")
    p.add_argument("--target", default="none", help="PGD target: none (untargeted), runner-up, or a class index")
    p.add_argument("--aa-version", default="standard", choices=("standard", "apgd"),
                   help="standard AutoAttack, or its APGD-CE + APGD-T subset")
    p.add_argument("--n-samples", type=D.positive_int, default=1000, help="the first N test images")
    p.add_argument("--batch-size", type=D.positive_int,
                   help="images per attack batch (default: 250 at 32 px, as many pixels for bigger images: 27 at 96 px)")
    p.add_argument("--align-source", choices=D.SOURCES,
                   help="ground truth for align (default: the model's own PAG source, else nn)")
    p.add_argument("--align-targets", type=D.positive_int, help="classes per image for align (default: all)")
    p.add_argument("--align-split", default="test", choices=("test", "train"),
                   help="images for align: held-out test images, or the training images the model was fit to")
    p.add_argument("--sbg-file", help="fields for --align-source sbg: sbg.py export --split test for test images")
    p.add_argument("--vis-images", type=D.positive_int, default=8, help="test images in the picture (rows)")
    p.add_argument("--vis-eps", type=D.nonneg_float, help="L2 radius of the pictures' targeted attack (default: 10x the dataset's eps)")
    p.add_argument("--vis-steps", type=D.positive_int, default=60, help="steps of the picture's targeted attack")
    p.add_argument("--vis-out", help="PNG path (default: next to the checkpoint)")
    p.add_argument("--out", help="results JSON (default: attack.json next to the checkpoint)")
    p.add_argument("--data-dir", help="override the checkpoint's --data-dir")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--cache-dir", default="cache", help="where nearest-neighbour tables are cached")
    p.add_argument("--seed", type=int, default=0, help="random starts of PGD and AutoAttack, align targets")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if there is one")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    model.requires_grad_(False)  # attacks need input gradients only
    targs = ckpt["args"]
    data = D.get_data(targs["dataset"], args.data_dir or targs["data_dir"], args.download or targs.get("download", False),
                      targs.get("train_samples"), args.n_samples, targs.get("image_size"), targs.get("data_seed"),
                      targs.get("val_samples")).to(device)
    x, y = D.to_float(data.test_x), data.test_y
    args.batch_size = args.batch_size or attack_batch_size(data)
    if args.target not in ("none", "runner-up") and not (args.target.isdigit() and int(args.target) < data.num_classes):
        raise D.UserError(f"--target must be none, runner-up or a class in 0..{data.num_classes - 1}, got {args.target!r}")
    if args.align_targets is not None and args.align_targets > data.num_classes:
        raise D.UserError(f"--align-targets must be in 1..{data.num_classes}, got {args.align_targets}")
    args.align_source = args.align_source or (ckpt["pag_source"] if ckpt["pag_source"] in ("oi", "cm", "nn") else "nn")
    defaults = D.DATASETS[data.name]
    eps_l2 = args.eps_l2 or [defaults["eps_l2"]]
    eps_linf = args.eps_linf or [defaults["eps_linf"]]
    out_dir = os.path.dirname(args.checkpoint)  # paths are written as given
    results = {"checkpoint": args.checkpoint, "dataset": data.name, "arch": ckpt["arch"], "n_samples": len(y)}
    pgd_settings = dict(steps=args.steps, step_size=args.step_size, loss=args.pgd_loss)
    torch.manual_seed(args.seed)

    results["clean_acc"] = (predict(model, x) == y).float().mean().item()
    for norm, eps_list in (("l2", eps_l2), ("linf", eps_linf)):
        if f"pgd-{norm}" in args.attacks:
            results[f"pgd_{norm}"] = {}
            # Balls are nested: a point is robust at eps only if it survives every radius <= eps
            # run here (an adversarial example found at a smaller radius is valid at a larger one).
            survived = torch.ones_like(y, dtype=torch.bool)
            for eps in sorted(eps_list):
                print(f"PGD-{norm} eps={eps:g}, {args.steps} steps, target={args.target}", flush=True)
                survived &= robust_mask(model, x, y, eps, norm, data.box, args.batch_size, args.target,
                                        Progress(f"  pgd-{norm} eps={eps:g}:", len(x), "img"),
                                        generator=torch.Generator().manual_seed(args.seed),
                                        **pgd_settings)
                results[f"pgd_{norm}"][f"{eps:g}"] = survived.float().mean().item()
            results["pgd"] = {"steps": args.steps, "step_size": args.step_size or "2.5*eps/steps", "target": args.target,
                              "loss": args.pgd_loss, "random_start": True,
                              "nested": "robust at eps = survives every radius <= eps that was run"}
    if "exact-l2" in args.attacks:
        if data.is_image:
            raise D.UserError("exact-l2 searches the whole eps ball and needs 2-D inputs (the toy); use pgd-l2 or aa-l2")
        print(f"exact L2 robustness by ray search up to eps={max(eps_l2):g}", flush=True)
        dist = boundary_distance_2d(model, x, y, max(eps_l2))
        results["exact_l2"] = {f"{eps:g}": (dist > eps).float().mean().item() for eps in sorted(eps_l2)}
        # per test point, for analyses of where the boundary is (null: farther than the largest eps)
        results["exact_l2_distance"] = [None if d == float("inf") else round(d, 4) for d in dist.tolist()]
    for norm, eps_list in (("l2", eps_l2), ("linf", eps_linf)):
        if f"aa-{norm}" in args.attacks:
            logging.basicConfig(format="  %(name)s: %(message)s")
            logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # AutoAttack's own progress lines
            results[f"autoattack_{norm}"] = {}
            for eps in eps_list:
                print(f"AutoAttack ({args.aa_version}) {norm} eps={eps:g}", flush=True)
                results[f"autoattack_{norm}"][f"{eps:g}"] = autoattack_accuracy(
                    model, x, y, eps, norm, data.box, args.aa_version, args.seed, args.batch_size)
            results["autoattack_version"] = args.aa_version
    if "align" in args.attacks:
        gt_fn = D.make_source(args.align_source, data, args.cache_dir, seed=targs.get("seed", 0), sbg_file=args.sbg_file,
                              split=args.align_split)
        images = data.train_x[: args.n_samples] if args.align_split == "train" else data.test_x
        xa, idx = D.to_float(images), torch.arange(len(images), device=device)  # the first N, with their indices
        results["alignment"] = {"source": args.align_source, "split": args.align_split, "cos": alignment(
            model, xa, gt_fn, data.num_classes, args.align_targets, seed=args.seed, indices=idx)}
    if "visualize" in args.attacks:
        vis_path = args.vis_out or os.path.join(out_dir, "pag_grid.png" if data.is_image else "regions.png")
        visualize(model, ckpt, data, x, args, vis_path)
        results["visualization"] = vis_path
        print(f"wrote {vis_path}")

    out = args.out or os.path.join(out_dir, "attack.json")
    D.write_json(results, out)
    print(f"\n{'measure':<28}{'accuracy':>10}")
    print(f"{'clean':<28}{results['clean_acc']:>10.2%}")
    for key in ("pgd_l2", "pgd_linf", "exact_l2", "autoattack_l2", "autoattack_linf"):
        for eps, acc in results.get(key, {}).items():
            print(f"{key + ' eps=' + eps:<28}{acc:>10.2%}")
    if "alignment" in results:
        print(f"{'alignment cos (' + args.align_source + ')':<28}{results['alignment']['cos']:>10.4f}")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    D.run_cli(main)
