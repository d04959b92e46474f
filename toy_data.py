"""The paper's 2-D toy: two classes on the line x2 = 2*x1, three modes each.

    python toy_data.py --out toy_data.png     # draws the data and its ground-truth PAG field

Class 0 has modes at x1 = -50, -10, 30 and class 1 at -30, 10, 50; x1 = centre +
N(0, 1) and x2 = 2*x1 exactly. The true perceptually aligned gradient toward
class t is the way to the nearest training point of class t: g(x, t) = nn_t(x) - x.
The draw itself is data.make_toy (every dataset lives in the data module); this file is the toy's
ground-truth field and its picture, and a script that draws both.
"""
import argparse
import os

import torch

import files
from data import TOY_SLOPE, make_toy
from sources import nearest_of_class

def toy_gt_grad(points, target_classes, train_x, train_y, exclude_self=False):
    """g(x, t) = nearest training point of class t - x, for t in target_classes [N, k] -> [N, k, 2], by the
    nn source's own search (sources.nearest_of_class). exclude_self: True when `points` is `train_x` itself, or
    the points' indices in train_x; then a point is never its own neighbour."""
    own = torch.arange(len(points)) if exclude_self is True else exclude_self if exclude_self is not False else None
    nn_idx = nearest_of_class(points, train_x, train_y, int(train_y.max()) + 1, query_idx=own)
    return train_x[nn_idx.gather(1, target_classes)] - points[:, None]


def gt_grad_arrows(train_x, train_y, count=60, seed=0):
    """(starts, vectors): g(x, other class) at `count` random training points, the field PAG learns."""
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:count]
    gt_grad = toy_gt_grad(train_x[pick], (1 - train_y[pick])[:, None], train_x, train_y, exclude_self=pick)
    return train_x[pick], gt_grad[:, 0]


# ----------------------------------------------------------------------------- picture
CLASS_COLOURS = ("#1f77b4", "#ff7f0e")   # points of class 0, class 1
REGION_COLOURS = ("#c6dbef", "#fdd0a2")  # where the model predicts class 0, class 1


def plot_toy(ax, points, labels, predict=None, arrows=None, title="", x1_range=(-70, 70), resolution=400):
    """Draw the toy on a matplotlib axis: decision regions, points, optional arrows, with axes and a key.

    predict: a function [M, 2] -> predicted class [M] (colours the background).
    arrows:  (starts [A, 2], vectors [A, 2]), drawn with heads: the ground-truth PAG.
    Equal aspect, so that margins look like what they are.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    x1_lo, x1_hi = x1_range
    x2_lo, x2_hi = TOY_SLOPE * x1_lo, TOY_SLOPE * x1_hi
    handles = []
    if predict is not None:
        g1, g2 = torch.meshgrid(torch.linspace(x1_lo, x1_hi, resolution), torch.linspace(x2_lo, x2_hi, 2 * resolution),
                                indexing="xy")
        with torch.no_grad():
            pred = predict(torch.stack([g1, g2], -1).reshape(-1, 2)).reshape(g1.shape)
        ax.imshow(pred.numpy(), origin="lower", extent=(x1_lo, x1_hi, x2_lo, x2_hi), cmap=ListedColormap(REGION_COLOURS),
                  vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        handles += [Patch(color=c, label=f"predicted {k}") for k, c in enumerate(REGION_COLOURS)]
    for k, colour in enumerate(CLASS_COLOURS):
        sel = labels == k
        handles.append(ax.scatter(points[sel, 0], points[sel, 1], s=4, color=colour, label=f"class {k}"))
    if arrows is not None:
        starts, vectors = arrows
        ax.quiver(starts[:, 0], starts[:, 1], vectors[:, 0], vectors[:, 1], angles="xy", scale_units="xy", scale=1,
                  width=0.004, color="black")
        handles.append(ax.plot([], [], color="black", marker=">", label="g(x, other class)")[0])
    ax.set(xlim=(x1_lo, x1_hi), ylim=(x2_lo, x2_hi), xlabel="x1", ylabel="x2", title=title, aspect="equal")
    ax.legend(handles=handles, loc="upper left", fontsize=7, framealpha=0.9)


def toy_figure(points, labels, predict=None, arrows=None, title=""):
    """One panel of plot_toy as a matplotlib figure (the caller saves and closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 8))
    plot_toy(ax, points, labels, predict, arrows, title)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="which draw of the data")
    parser.add_argument("--out", default=os.path.join("results", "toy", "toy_data.png"), help="PNG to write")
    parser.add_argument("--arrows", type=int, default=60, help="how many ground-truth arrows to draw")
    args = parser.parse_args(argv)
    if args.arrows < 0 or not args.out.lower().endswith((".png", ".pdf", ".svg")):
        parser.error("--arrows must be >= 0 and --out a .png, .pdf or .svg file")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    train_x, train_y, _, _ = make_toy(args.seed)
    # Arrows toward the *other* class from a random subset: the field PAG learns.
    fig = toy_figure(train_x, train_y, arrows=gt_grad_arrows(train_x, train_y, args.arrows, args.seed),
                     title="toy data and g(x, other class)")
    files.save_figure(fig, args.out, dpi=120)  # the project's one figure writer: atomically
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
