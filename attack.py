"""Evaluate a checkpoint: clean accuracy, PGD, AutoAttack, gradient alignment, pictures.

    python attack.py --checkpoint runs/pag_cm_cifar10_resnet18/model.pt --measures clean pgd-l2 aa-l2 aa-linf align visualize

The checkpoint alone rebuilds the model and its test data (the same N test images for every attack, a fair sample
of every class). Every adversarial example is checked to lie in its eps ball and in the input box before it is
counted; a point is robust only if classified right both clean and attacked. The PGD is pgd.py's, the project's one.
"""
import argparse
import logging
import math
import os
import re
import time
from dataclasses import dataclass

import torch

import cli
import data as D
import sources as S
import files
from checkpoint import check_data_fits, load_checkpoint
from cli import Progress
from files import UserError
from models import from_official
from pgd import attack_batch_size, check_perturbation, pgd, predict, robust_mask
from ranks import pick_device
from train_pag import pag_loss, sample_targets

MEASURES = ("clean", "pgd-l2", "pgd-linf", "aa-l2", "aa-linf", "exact-l2", "align", "visualize")


# ----------------------------------------------------------------------------- evaluation helpers
EXACT_MAX_RADIUS = 1000.0  # exact-l2 samples every ray up to its largest eps: 4,000 samples at most (the toy's
# points lie within ~300 of each other, so larger radii measure nothing more)


@torch.no_grad()
def boundary_distance_2d(model, x, y, max_radius, directions=360, radial_step=0.25, refine_steps=12, batch=32, chunk=128):
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
        # The first wrong sample on each ray, `chunk` radii at a time (bounded memory), until every ray has one.
        first = torch.full((len(xb), directions), -1, dtype=torch.long, device=x.device)
        for s in range(0, len(radii), chunk):
            r = radii[s: s + chunk]
            wrong = model((xb[:, None, None] + r[:, None] * rays[:, None, :]).reshape(-1, 2)).argmax(1)
            wrong = wrong.view(len(xb), directions, len(r)) != yb[:, None, None]  # [P, D, chunk]
            new = (first < 0) & wrong.any(2)
            first[new] = s + wrong.float().argmax(2)[new]
            if bool((first >= 0).all()):
                break
        hit, first = first >= 0, first.clamp_min(0)
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
        raise UserError("AutoAttack is not installed: pip install pyautoattack") from None


def autoattack_mask(model, x, y, eps, norm, box, version="standard", seed=0, batch_size=250, n_iter=None):
    """Per point: classified right both clean and under AutoAttack (examples checked in the eps ball).

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
    return (predict(model, x) == y) & (predict(model, x_adv) == y)


def alignment(model, x, gt_grad_fn, num_classes, targets_per_image=None, batch_size=100, seed=0, indices=None):
    """Mean cosine between grad_x log softmax(f(x))_t and the source's gt_grad(x, t).

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
        gt_grad = gt_grad_fn(xb, target_classes, None if indices is None else indices[i: i + batch_size])
        total += (1 - pag_loss(model, xb, gt_grad, target_classes, create_graph=False)).item() * len(xb)
    return total / len(x)


# ----------------------------------------------------------------------------- pictures
def run_label(checkpoint, other=None):
    """A model's name in a picture: its run folder (a model.pt's, or the folder given), else the file's name;
    with `other` (the model drawn beside it), as many trailing path parts as tell the two apart (a/run, b/run)."""
    def parts(c):
        path = os.path.abspath(c)
        if not os.path.isdir(path) and os.path.basename(path) == "model.pt":
            path = os.path.dirname(path)
        return path.strip(os.sep).split(os.sep)
    mine, theirs = parts(checkpoint), parts(other) if other else None
    n = 1
    while theirs and mine[-n:] == theirs[-n:] and n < len(mine):
        n += 1
    return "/".join(mine[-n:])


def targeted_grid(model, xs, num_shown, eps, steps, box):
    """[n, num_shown] targeted large-eps L2 PGD of each image toward each of the first num_shown classes,
    and whether the model then predicts the target: (adversarial images [n, shown, ...], success [n, shown])."""
    src = xs.repeat_interleave(num_shown, 0)
    targets = torch.arange(num_shown, device=xs.device).repeat(len(xs))
    adv = pgd(model, src, targets, eps, "l2", steps=steps, targeted=True, random_start=False, box=box)
    hit = predict(model, adv) == targets
    return adv.view(len(xs), num_shown, *xs.shape[1:]), hit.view(len(xs), num_shown)


def visualize(models, data, x, args):
    """The picture, computed now and drawn by the function returned: (draw(path), eps or None).

    models: [(label, model, checkpoint fields)], one or two (--vis-compare: the paper's figure 1 puts a
    vanilla and a PAG model side by side). Images: for each test image one row per model, the original
    first, then one column per target class, each the result of a large-eps targeted L2 PGD toward that
    class (the same images, targets, eps and steps for every model), framed green where the model then
    predicts the target and red where the attack did not get there. 2-D: the decision regions, with
    the ground-truth field of a PAG model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not data.is_image:
        import toy_data

        label, model, ckpt = models[0]
        arrows = None
        if ckpt["pag_source"]:  # a PAG model: show the field it was trained to follow
            arrows = toy_data.gt_grad_arrows(data.train_x.cpu(), data.train_y.cpu())
        dev = next(model.parameters()).device

        def draw_regions(path):
            fig = toy_data.toy_figure(data.test_x.cpu(), data.test_y.cpu(), arrows=arrows, title=f"{label}: decision regions",
                                      predict=lambda p: predict(model, p.to(dev, next(model.parameters()).dtype), 65536).cpu())
            files.save_figure(fig, path, dpi=120)
            plt.close(fig)
        return draw_regions, None
    shown = min(data.num_classes, 10)
    pick = D.subset_indices(data.name, data.test_y, args.vis_images).to(x.device)  # never one class of a sorted folder
    xs = x[pick]
    eps = args.vis_eps if args.vis_eps is not None else 10 * D.DATASETS[data.name]["eps_l2"]
    ys = data.test_y[pick].cpu()
    grids = [(label, *targeted_grid(model, xs, shown, eps, args.vis_steps, data.box)) for label, model, _ in models]
    preds = [predict(model, xs).cpu() for _, model, _ in models]  # by position: two models never share a key
    rows = [(i, label, adv[i].cpu(), hit[i].cpu(), m) for i in range(len(xs)) for m, (label, adv, hit) in enumerate(grids)]
    clean_pred = [int(preds[m][i]) for i, _, _, _, m in rows]

    def draw(path):
        fig, axes = plt.subplots(len(rows), shown + 1, figsize=(1.1 * (shown + 1) + 0.6, 1.15 * len(rows) + 1.1),
                                 squeeze=False)
        for r, (i, label, adv, hit, _) in enumerate(rows):
            for j in range(shown + 1):
                ax = axes[r, j]
                img = (xs[i] if j == 0 else adv[j - 1]).cpu().permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j > 0:  # did the attack reach its target class?
                    for side in ax.spines.values():
                        side.set_edgecolor("#2ca02c" if hit[j - 1] else "#d62728")
                        side.set_linewidth(2.5)
                if r == 0 and j > 0:
                    ax.set_title(f"→ {data.class_name(j - 1)}", fontsize=8)
            axes[r, 0].set_title(f"{data.class_name(int(ys[i]))}, {label} says {data.class_name(clean_pred[r])}"
                                 if r == 0 or len(models) > 1 else f"{data.class_name(int(ys[i]))}", fontsize=6)
            axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        names = " vs ".join(label for label, _, _ in models)
        fig.suptitle(f"{names}: targeted L2 PGD toward each class, ε = {eps:g} (L2 norm of the change, pixels in "
                     f"[0, 1]), {args.vis_steps} steps\nfirst column: the test image, its label and each model's "
                     "prediction; frame: green = the model now predicts the target class, red = it does not", fontsize=9)
        fig.tight_layout()
        files.save_figure(fig, path, dpi=110)
        plt.close(fig)
    return draw, eps


# ----------------------------------------------------------------------------- checkpoints, ours or the authors'
OFFICIAL_IMAGE_SIDE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32}


def load_any_checkpoint(path, device, dataset=None):
    """(model in eval mode, checkpoint fields) for this project's model.pt, or for a file of the
    official PAG-ROB release (models.from_official), whose missing metadata is filled in: the
    dataset (default CIFAR-10), its default data flags, and weights "official". The fields' "sha256"
    is the content of the very bytes the model was loaded from (what attack.json names it by)."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    obj, sha256 = files.load_file(path, "checkpoint", with_sha256=True)
    model, ckpt = model_of(obj, path, device, dataset)
    return model, {**ckpt, "sha256": sha256}


def model_of(obj, path, device, dataset):
    """load_any_checkpoint's model and fields from the loaded object."""
    if isinstance(obj, dict) and ("kind" in obj or "format" in obj):  # ours (checked in full by load_checkpoint)
        model, ckpt = load_checkpoint(path, device, loaded=obj)
        if dataset is not None and D.canonical_dataset(dataset) != ckpt["dataset"]:
            raise UserError(f"{path} was trained on {ckpt['dataset']}; --dataset {dataset} is for files without metadata")
        return model, ckpt
    dataset = D.canonical_dataset(dataset or "cifar10")
    if dataset not in OFFICIAL_IMAGE_SIDE:
        raise UserError(f"--dataset {dataset}: official checkpoints are for {', '.join(OFFICIAL_IMAGE_SIDE)}")
    try:
        model = from_official(obj, image_size=OFFICIAL_IMAGE_SIDE[dataset])
    except ValueError as e:
        raise UserError(f"{path} is neither a checkpoint of this project nor an official PAG-ROB one: {e}") from None
    side = model.patch * 8 if hasattr(model, "patch") else OFFICIAL_IMAGE_SIDE[dataset]
    arch = "vit" if hasattr(model, "patch") else "resnet18"
    channels = model.conv1.in_channels if arch == "resnet18" else 3
    if channels != 3:  # the official release's datasets are all RGB
        raise UserError(f"{path} holds an official-format {arch} for {channels}-channel images; {dataset} images have 3")
    num_classes = (model.fc[1] if arch == "vit" else model.linear).out_features
    args = {"dataset": dataset, "data_dir": "data", "download": False, "train_samples": None, "image_size": None,
            "data_seed": None, "val_samples": None, "seed": 0, "epochs": 0}
    ckpt = {"arch": arch, "dataset": dataset, "num_classes": num_classes, "input_shape": (3, side, side),
            "classes": list(D.CLASS_NAMES[dataset]) if dataset in D.CLASS_NAMES else None, "pag_source": None,
            "weights": "official", "args": args, "epoch": None}
    print(f"{path}: the official release's {arch} ({num_classes} classes), evaluated on {dataset} "
          "(images in [0, 1], normalised to [-1, 1] inside, as the official code does)", flush=True)
    return model.to(device), ckpt


# ----------------------------------------------------------------------------- results
RADIUS_MEASURES = ("pgd_l2", "pgd_linf", "aa_l2", "aa_linf", "exact_l2")  # {radius: entry with "acc"}
_unit = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1  # noqa: E731
_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
_text = lambda v: isinstance(v, str)  # noqa: E731
_text_or_none = lambda v: v is None or isinstance(v, str)  # noqa: E731
_radii = lambda v: isinstance(v, list) and all(isinstance(r, str) for r in v)  # noqa: E731
_sha256 = lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None  # noqa: E731
_epoch = lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
# What attack.py writes, key by key: the file's identity, then each measure's entries (required keys first).
RESULT_FIELDS = {"checkpoint": _text, "dataset": _text, "arch": _text, "pag_source": _text_or_none, "weights": _text}
RESULT_OPTIONAL = {"checkpoint_sha256": _sha256, "epoch": _epoch}
ENTRY_FIELDS = {  # measure -> (required, optional)
    "clean": ({"acc": _unit, "eval_samples": _count}, {"made": _text}),
    "pgd": ({"acc": _unit, "eval_samples": _count}, {"steps": _count, "step_size": _number, "loss": _text, "target": _text,
                                                     "random_start": lambda v: isinstance(v, bool), "seed": _epoch,
                                                     "nested_with": _radii, "made": _text}),
    "aa": ({"acc": _unit, "eval_samples": _count}, {"version": _text, "seed": _epoch, "nested_with": _radii, "made": _text}),
    "exact_l2": ({"acc": _unit, "eval_samples": _count}, {"made": _text}),
    "align": ({"cos": lambda v: _number(v) and -1 <= v <= 1, "eval_samples": _count},
              {"source": _text, "split": _text, "targets": _count, "seed": _epoch, "made": _text}),
    "visualize": ({"path": _text}, {"eps": lambda v: v is None or _number(v), "steps": _count,
                                    "compared_with": _text_or_none, "made": _text}),
    "exact_l2_distance": ({"distances": lambda v: isinstance(v, list) and all(d is None or _number(d) and d >= 0 for d in v)},
                          {"max_radius": _number, "made": _text}),
}


def check_entry(entry, kind, path, what):
    """One entry: its required keys, each known key's value, and no key attack.py does not write."""
    required, optional = ENTRY_FIELDS[kind]
    files.require(entry, required, path, what)
    files.require(entry, {k: check for k, check in optional.items() if k in entry}, path, what)
    unknown = sorted(set(entry) - set(required) - set(optional))
    if unknown:
        raise UserError(f"{path}: {unknown[0]!r} is not a key of the {what}")


def check_results(obj, path):
    """attack.json as this script writes it, or a UserError naming what is wrong: the model's identity
    (checkpoint path and content hash), every measure's entries (accuracies in [0, 1], image counts,
    radii that are numbers, cosines in [-1, 1], nothing attack.py does not write), and robust accuracy
    never above the clean accuracy of the same number of images."""
    what = "results file of attack.py"
    files.require(obj, RESULT_FIELDS, path, what)
    files.require(obj, {k: check for k, check in RESULT_OPTIONAL.items() if k in obj}, path, what)
    known = {*RESULT_FIELDS, *RESULT_OPTIONAL, "clean", "align", "visualize", "exact_l2_distance", *RADIUS_MEASURES}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise UserError(f"{path}: {unknown[0]!r} is not a key of a {what}")
    for kind in ("clean", "visualize", "exact_l2_distance"):
        if kind in obj:
            check_entry(obj[kind], kind, path, f"{what}'s {kind} entry")
    for key in RADIUS_MEASURES:
        if key not in obj:
            continue
        files.require(obj, {key: dict}, path, what)
        for radius, entry in obj[key].items():
            try:
                ok = math.isfinite(float(radius)) and float(radius) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise UserError(f"{path}: {key} radius {radius!r} is not a finite number >= 0")
            check_entry(entry, key.split("_")[0] if key != "exact_l2" else key, path, f"{what}'s {key} entry at {radius}")
            clean = obj.get("clean")
            if clean and clean["eval_samples"] == entry["eval_samples"] and entry["acc"] > clean["acc"] + 1e-9:
                raise UserError(f"{path}: {key} at {radius} ({entry['acc']:.4f}) is above the clean accuracy of "
                                f"the same images ({clean['acc']:.4f}), which no attack can give")
    if "align" in obj:
        files.require(obj, {"align": dict}, path, what)
        for key, entry in obj["align"].items():
            check_entry(entry, "align", path, f"{what}'s align entry {key!r}")
    return obj


def merge_results(old, new, checkpoint, sha256):
    """attack.json after this call: every earlier entry kept, this call's entries added, and the same
    measure at the same radius (or alignment source and split) replaced by the newer one. Refuses a
    file that holds another model's results: the model is its checkpoint's content (sha256), so the same
    file named by any path is the same model, and a file trained further since is another; a file without
    that hash (an older attack.py's) cannot be matched to any model and is refused."""
    if old:
        if "checkpoint_sha256" in old:
            if old["checkpoint_sha256"] != sha256:
                raise UserError(f"the results file holds results of another model (checkpoint {old['checkpoint']!r} with "
                                f"other content: another model, or the same run trained further since), not of "
                                f"{checkpoint}; pass another --out")
        else:  # written before content hashes: which model it holds cannot be told (the path may hold another now)
            raise UserError(f"the results file holds results of {old.get('checkpoint')!r} without its content hash "
                            "(an older attack.py's), so they cannot be told to be this model's; pass another --out "
                            "(or move that file)")
    merged = {**old, **{k: v for k, v in new.items() if not isinstance(v, dict) or k in ("clean", "visualize")}}
    for key, value in new.items():
        if isinstance(value, dict) and key not in ("clean", "visualize"):
            merged[key] = {**old.get(key, {}), **value}
    return merged


def print_table(results):
    print(f"\n{'measure':<30}{'value':>10}  settings")
    if "clean" in results:
        print(f"{'clean':<30}{results['clean']['acc']:>10.2%}  {results['clean']['eval_samples']} images, "
              f"{results['clean']['made']}")
    for key in ("pgd_l2", "pgd_linf", "exact_l2", "aa_l2", "aa_linf"):
        for eps, e in results.get(key, {}).items():
            how = " ".join(filter(None, [e.get("version") and f"AutoAttack {e['version']}",
                                         e.get("steps") and f"{e['steps']} steps"]))
            print(f"{key + ' eps=' + eps:<30}{e['acc']:>10.2%}  {e['eval_samples']} images {how}, {e['made']}")
    for key, e in results.get("align", {}).items():
        print(f"{'align ' + key:<30}{e['cos']:>10.4f}  cos, {e['eval_samples']} images, {e['made']}")


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model.pt written by a training script, or its run folder")
    p.add_argument("--measures", "--attacks", nargs="+", default=["clean", "pgd-l2", "pgd-linf"], choices=MEASURES,
                   help="what to measure: clean accuracy, attacks, alignment, a picture (--attacks: its older name)")
    p.add_argument("--eps-l2", type=cli.radius, nargs="+", help="L2 radii (default: the dataset's, e.g. 0.5 for CIFAR)")
    p.add_argument("--eps-linf", type=cli.radius, nargs="+", help="L-inf radii (default: 8/255 for CIFAR/STL, 0.1 Fashion-MNIST)")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="PGD iterations")
    p.add_argument("--step-size", type=cli.step_size, help="PGD step (default: 2.5*eps/steps)")
    p.add_argument("--pgd-loss", default="margin", choices=("margin", "ce"),
                   help="margin (default: does not saturate on confident models) or ce")
    p.add_argument("--target", default="none", help="PGD target: none (untargeted), runner-up, or a class index")
    p.add_argument("--aa-version", default="standard", choices=("standard", "apgd"),
                   help="standard AutoAttack, or its APGD-CE + APGD-T subset (cheaper: the CPU benches use it)")
    p.add_argument("--aa-iterations", type=cli.positive_int,
                   help="override AutoAttack's iterations (smoke runs only: then it is not the standard attack)")
    p.add_argument("--eval-samples", "--n-samples", dest="eval_samples", type=cli.positive_int, default=1000,
                   help="N test images (of files stored class by class, folder and toy: a fair sample of every class)")
    p.add_argument("--batch-size", type=cli.positive_int,
                   help="images per attack batch (default: 250 at 32 px, as many pixels for bigger images: 27 at 96 px)")
    p.add_argument("--align-source", choices=S.SOURCES,
                   help="ground truth for align (default: the model's own PAG source, else nn)")
    p.add_argument("--align-targets", type=cli.positive_int, help="classes per image for align (default: all)")
    p.add_argument("--align-split", default="test", choices=("test", "train"),
                   help="images for align: held-out test images, or the training images the model was fit to")
    p.add_argument("--sbg-file", help="fields for --align-source sbg: sbg.py export --split test for test images")
    p.add_argument("--vis-images", type=cli.positive_int, default=8, help="test images in the picture (rows)")
    p.add_argument("--vis-eps", type=cli.radius, help="L2 radius of the pictures' targeted attack (default: 10x the dataset's eps)")
    p.add_argument("--vis-steps", type=cli.positive_int, default=60, help="steps of the picture's targeted attack")
    p.add_argument("--vis-compare", metavar="CHECKPOINT",
                   help="visualize: a second model (e.g. the vanilla run) drawn beside this one, on the same images, "
                        "targets, eps and steps (the paper's figure 1)")
    p.add_argument("--vis-out", "--png", dest="vis_out",
                   help="the picture (default: targeted_attacks.png, or regions.png for 2-D models, next to the checkpoint)")
    p.add_argument("--out", help="results JSON, merged with what it holds (default: attack.json next to the checkpoint)")
    p.add_argument("--dataset", help="the dataset of a checkpoint without metadata (the official release: default "
                                     "cifar10); for this project's checkpoints it must be theirs")
    p.add_argument("--data-dir", help="override the checkpoint's --data-dir")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download a missing CIFAR-10/100, STL-10 or Fashion-MNIST, with progress (--no-download: "
                        "never, e.g. on an offline cluster: the error says what to fetch and where)")
    p.add_argument("--cache-dir", default="cache", help="where nearest-neighbour tables are cached")
    p.add_argument("--seed", type=cli.seed, default=0, help="random starts of PGD and AutoAttack, align targets")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if there is one")
    args = p.parse_args(argv)
    checkpoint = os.path.join(args.checkpoint, "model.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    with files.folders_removed_if_failed(args.out or checkpoint, args.vis_out):  # a failed call leaves no folder it made
        return evaluate(args)


@dataclass
class Call:
    """One attack.py call once its inputs are checked: the model, its data, the images, the radii, the outputs."""
    args: argparse.Namespace
    path: str                # the checkpoint file
    out: str                 # attack.json
    vis_path: str            # the picture, or None
    model: torch.nn.Module
    ckpt: dict               # its fields (checkpoint.load_checkpoint's, or the official file's filled in)
    data: D.Data
    shown: list              # the models a picture shows: [(label, model, fields)]
    radii: dict              # norm -> sorted radii of this call
    batch_size: int

    @property
    def x(self):
        return D.to_float(self.data.test_x)


def made():
    return time.strftime("%Y-%m-%d %H:%M:%S")


def evaluate(args):
    """attack.py after its flags: check every input and output, measure, write attack.json, draw."""
    call = prepare(args)
    results = {"checkpoint": os.path.abspath(call.path), "checkpoint_sha256": call.ckpt["sha256"], "epoch": call.ckpt["epoch"],
               "dataset": call.data.name, "arch": call.ckpt["arch"], "pag_source": call.ckpt["pag_source"],
               "weights": call.ckpt.get("weights", "trained")}
    torch.manual_seed(args.seed)
    for name, measure in MEASURE_FUNCTIONS.items():
        if name in args.measures:
            results.update(measure(call))
    draw = None
    if call.vis_path:  # computed now; drawn after the numbers are written (a failed figure loses no result)
        draw, vis_eps = visualize(call.shown, call.data, call.x, args)
    merged = write_results(call, results)
    if any(k in results for k in ("clean", "align", *RADIUS_MEASURES)):
        y, data = call.data.test_y, call.data
        print(f"\n{len(y)} test images of {data.name} ({D.class_counts_text(y, data.num_classes, data.classes)})")
        print_table(results)
    kept = sorted(k for k in merged if k not in results and not (draw and k == "visualize"))
    print(f"wrote {call.out}" + (f" (kept its earlier {', '.join(kept)})" if kept else ""))
    if draw:  # the figure atomically, then the entry that points at it: attack.json never names a partial figure
        draw(call.vis_path)
        print(f"wrote {call.vis_path}" + (f" (beside {args.vis_compare})" if args.vis_compare else ""))
        merged = write_results(call, {**results, "visualize": {
            "path": call.vis_path, "eps": vis_eps, "steps": args.vis_steps,
            "compared_with": args.vis_compare and os.path.abspath(args.vis_compare), "made": made()}})
        print(f"wrote {call.out} (its visualize entry now names {call.vis_path})")
    return merged


def prepare(args):
    """Every check before any attack: the outputs (writable, none of the inputs), the checkpoint and any earlier
    results of it, the data (fits the model), the flags that depend on the data. Returns the Call."""
    path = os.path.join(args.checkpoint, "model.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    out_dir = os.path.dirname(path)  # paths are written as given
    out = args.out or os.path.join(out_dir, "attack.json")
    inputs = [path, args.sbg_file, args.vis_compare]
    files.check_output(out, "--out", inputs, (".json",))
    device = pick_device(args.device)
    model, ckpt = load_any_checkpoint(path, device, args.dataset)
    is_image = len(ckpt["input_shape"]) == 3
    vis_path = None
    if "visualize" in args.measures:
        vis_path = args.vis_out or os.path.join(out_dir, "targeted_attacks.png" if is_image else "regions.png")
        files.check_output(vis_path, "--vis-out", [*inputs, out], files.FIGURE_SUFFIXES)
    if args.vis_compare and ("visualize" not in args.measures or not is_image):
        raise UserError("--vis-compare draws a second image model beside this one in `--measures visualize`"
                        + ("" if is_image else " (for the 2-D toy: python bench/toy.py draws both models)"))
    if os.path.lexists(out):  # a broken file, or another model's: refused now, before any attack, and left as it is
        merge_results(check_results(files.read_json_object(out, "results file"), out), {}, path, ckpt["sha256"])
    model.requires_grad_(False)  # attacks need input gradients only
    D.use_dataset_precision(ckpt["dataset"])  # the toy: one thread, as it was trained
    targs = ckpt["args"]
    data = D.get_data(targs["dataset"], args.data_dir or targs["data_dir"], args.download, targs["train_samples"],
                      args.eval_samples, targs["image_size"], targs["data_seed"], targs["val_samples"]).to(device)
    check_data_fits(ckpt, data, path)
    shown = [(run_label(path, args.vis_compare), model, ckpt)]  # this model, and --vis-compare's (checked now)
    if args.vis_compare:
        other, other_ckpt = load_any_checkpoint(args.vis_compare, device, args.dataset)
        check_data_fits(other_ckpt, data, args.vis_compare)
        shown.append((run_label(args.vis_compare, path), other.requires_grad_(False), other_ckpt))
    return Call(args, path, out, vis_path, model, ckpt, data, shown, check_flags(args, data),
                args.batch_size or attack_batch_size(data))


def check_flags(args, data):
    """The flags whose valid values depend on the data; returns the radii of each norm."""
    if args.target not in ("none", "runner-up") and not (args.target.isdigit() and int(args.target) < data.num_classes):
        raise UserError(f"--target must be none, runner-up or a class in 0..{data.num_classes - 1}, got {args.target!r}")
    if args.align_targets is not None and args.align_targets > data.num_classes:
        raise UserError(f"--align-targets must be in 1..{data.num_classes}, got {args.align_targets}")
    if "exact-l2" in args.measures and data.is_image:
        raise UserError("exact-l2 searches the whole eps ball and needs 2-D inputs (the toy); use pgd-l2 or aa-l2")
    if "exact-l2" in args.measures and max(args.eps_l2 or [0]) > EXACT_MAX_RADIUS:
        raise UserError(f"exact-l2 samples every ray up to the largest --eps-l2 in steps of 0.25: at most "
                        f"{EXACT_MAX_RADIUS:g}, got {max(args.eps_l2):g} (the toy's points lie within ~300 of each other)")
    defaults = D.DATASETS[data.name]
    radii = {"l2": sorted(set(args.eps_l2 or [defaults["eps_l2"]])), "linf": sorted(set(args.eps_linf or [defaults["eps_linf"]]))}
    for norm, values in radii.items():  # results are keyed by the radius as printed: two that print alike would merge
        keys = [f"{e:g}" for e in values]
        if len(set(keys)) != len(keys):
            same = next(k for k in keys if keys.count(k) > 1)
            raise UserError(f"--eps-{norm} radii {', '.join(repr(e) for e, k in zip(values, keys) if k == same)} print "
                            f"alike ({same}), and results are keyed by the radius as printed: give radii that differ in "
                            "their first 6 significant digits")
    return radii


# ----------------------------------------------------------------------------- the measures: each returns its entries
def measure_clean(call):
    y = call.data.test_y
    return {"clean": {"acc": (predict(call.model, call.x) == y).float().mean().item(), "eval_samples": len(y), "made": made()}}


def measure_pgd(call, norm):
    """PGD at each radius. Balls are nested: a point is robust at eps only if it survives every radius <= eps of
    this call (an adversarial example found at a smaller radius is valid at a larger one)."""
    args, x, y = call.args, call.x, call.data.test_y
    survived, entries = torch.ones_like(y, dtype=torch.bool), {}
    for eps in call.radii[norm]:
        print(f"pgd-{norm} eps={eps:g}, {args.steps} steps, target={args.target}", flush=True)
        survived &= robust_mask(call.model, x, y, eps, norm, call.data.box, call.batch_size, args.target,
                                Progress(f"  pgd-{norm} eps={eps:g}:", len(x), "img"),
                                generator=torch.Generator().manual_seed(args.seed),
                                steps=args.steps, step_size=args.step_size, loss=args.pgd_loss)
        entries[f"{eps:g}"] = {
            "acc": survived.float().mean().item(), "eval_samples": len(y), "steps": args.steps,
            "step_size": args.step_size or 2.5 * eps / args.steps, "loss": args.pgd_loss, "target": args.target,
            "random_start": True, "seed": args.seed, "nested_with": [f"{e:g}" for e in call.radii[norm]], "made": made()}
    return {f"pgd_{norm}": entries}


def measure_exact_l2(call):
    """The 2-D toy's robustness without an attack: each point's distance to the decision boundary."""
    radii, y = call.radii["l2"], call.data.test_y
    print(f"exact L2 robustness by ray search up to eps={max(radii):g}", flush=True)
    dist = boundary_distance_2d(call.model, call.x, y, max(radii))
    return {"exact_l2": {f"{eps:g}": {"acc": (dist > eps).float().mean().item(), "eval_samples": len(y), "made": made()}
                         for eps in radii},
            # per test point, for analyses of where the boundary is (null: farther than the largest eps)
            "exact_l2_distance": {"max_radius": max(radii), "made": made(),
                                  "distances": [None if d == float("inf") else round(d, 4) for d in dist.tolist()]}}


def measure_autoattack(call, norm):
    """AutoAttack at each radius, nested like PGD's: never more robust at a larger radius."""
    args, x, y = call.args, call.x, call.data.test_y
    logging.basicConfig(format="  %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # AutoAttack's own progress lines
    survived, entries = torch.ones_like(y, dtype=torch.bool), {}
    version = args.aa_version + (f" ({args.aa_iterations} iterations: not the standard attack)" if args.aa_iterations else "")
    for eps in call.radii[norm]:
        print(f"aa-{norm} eps={eps:g}: AutoAttack ({args.aa_version})", flush=True)
        survived &= autoattack_mask(call.model, x, y, eps, norm, call.data.box, args.aa_version, args.seed, call.batch_size,
                                    n_iter=args.aa_iterations)
        entries[f"{eps:g}"] = {"acc": survived.float().mean().item(), "eval_samples": len(y), "version": version,
                               "seed": args.seed, "nested_with": [f"{e:g}" for e in call.radii[norm]], "made": made()}
    return {f"aa_{norm}": entries}


def measure_align(call):
    """Held-out (or training-image) alignment with a source's ground truth."""
    args, data, ckpt = call.args, call.data, call.ckpt
    source = args.align_source or (ckpt["pag_source"] if ckpt["pag_source"] in ("oi", "cm", "nn") else "nn")
    gt_grad_fn = S.make_source(source, data, args.cache_dir, seed=ckpt["args"]["seed"], sbg_file=args.sbg_file,
                               split=args.align_split)
    # The training images: N of them as a subset takes them (a fair sample of a sorted folder), with their indices.
    train = args.align_split == "train"
    idx = (D.subset_indices(data.name, data.train_y, args.eval_samples) if train
           else torch.arange(len(data.test_y))).to(data.test_y.device)
    xa = D.to_float((data.train_x if train else data.test_x)[idx])
    return {"align": {f"{source} {args.align_split}": {
        "cos": alignment(call.model, xa, gt_grad_fn, data.num_classes, args.align_targets, seed=args.seed, indices=idx),
        "source": source, "split": args.align_split, "eval_samples": len(xa),
        "targets": args.align_targets or data.num_classes, "seed": args.seed, "made": made()}}}


MEASURE_FUNCTIONS = {"clean": measure_clean, "pgd-l2": lambda c: measure_pgd(c, "l2"), "pgd-linf": lambda c: measure_pgd(c, "linf"),
                     "exact-l2": measure_exact_l2, "aa-l2": lambda c: measure_autoattack(c, "l2"),
                     "aa-linf": lambda c: measure_autoattack(c, "linf"), "align": measure_align}


def write_results(call, entries):
    """attack.json with this call's entries merged in, under its lock; a merge whose kept entries contradict this
    call's numbers (a hand-edited file) is refused and the file left as it was."""
    def merge(old):
        merged = merge_results(check_results(old, call.out) if old else old, entries, call.path, call.ckpt["sha256"])
        try:
            return check_results(merged, call.out)
        except UserError as e:
            measured = ", ".join(f"{k} {v}" for k, v in entries.items() if isinstance(v, dict))
            raise UserError(f"{e}; with this call's results merged in, so {call.out} is left as it was (this call "
                            f"measured: {measured[:300]}); pass another --out") from None
    return files.update_json(call.out, merge, "results file")


if __name__ == "__main__":
    cli.run_cli(main)
