"""The paper's 2-D toy experiment in one command (about 40 s for one seed on 2 CPU cores).

    python bench/toy.py                     # seed 2: results/toy/metrics.json, exact.json and toy.png
    python bench/toy.py --seed 0 1 2 3 4 5 6 7 8 9 --out-dir DIR   # ten draws + DIR/seeds.json, seeds.png
    python bench/toy.py --seed 0 1 2 3 4 5 6 7 8 9 --standardize --out-dir DIR   # on standardised points
    python bench/toy.py --seed 2 --nudge float64 --out-dir DIR      # one initial weight moved by one ulp

It only orchestrates the ordinary scripts (their main(), in this process), so the toy
exercises the same code as the image experiments:
    python train_baseline.py --dataset toy --out-dir DIR/vanilla --seed S --data-seed S
    python train_pag.py      --dataset toy --out-dir DIR/pag     --seed S --data-seed S
    python attack.py --checkpoint DIR/<model>/model.pt --measures clean pgd-l2 exact-l2 visualize
        --eps-l2 1 2 5 10 15 20 30 --target runner-up --steps 100   (one command)
Both models see the same data and the same initialisation: the seed fixes the draw of the
data and the initialisation. The outcome depends on both (bench/README.md: PAG keeps 16.7-90.3% of
the points at eps 15 over ten seeds, and one ulp of one initial weight re-draws a seed), so one seed
is an anecdote; report several. Both models train in float64 on one thread (data.DATASETS), so a
seed gives the same numbers with any OMP_NUM_THREADS on one machine. The attack is
targeted L2 PGD toward the other class (runner-up of two), normalised-gradient steps,
projection onto the eps ball, 100 steps of 2.5*eps/100. In 2-D the eps ball can also be
searched without an attack: exact.json holds the robust accuracy from each point's distance to
the decision boundary (attack.py's exact-l2: 360 rays, refined by bisection), which checks the PGD numbers.
"""
import contextlib
import importlib
import math
import os
import shlex
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402 - ours, found through ROOT
import files  # noqa: E402
import train_pag  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from data import TOY_CENTRES, TOY_SLOPE, make_toy  # noqa: E402

EPS = (1, 2, 5, 10, 15, 20, 30)
STEPS = 100


def run_script(script, log, *args):
    """Run one of our scripts' main() in this process (the same code as `python script args`,
    without paying torch's import once per script), its output appended to `log`. An interrupt says what
    continues the toy (the scripts' own "continue with" would name this call with their --resume)."""
    argv = [str(a) for a in args]
    print(f"$ python {script} " + " ".join(argv) + f"   >> {os.path.relpath(log)}", flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    try:
        with open(log, "a") as f, contextlib.redirect_stdout(f):
            importlib.import_module(script.removesuffix(".py")).main(argv)
    except (KeyboardInterrupt, files.Interrupted):
        raise files.Interrupted(f"{script} was interrupted; the toy trains each seed afresh (about 40 s): run "
                                f"{shlex.join(['python', 'bench/toy.py', *sys.argv[1:]])} again") from None


MARKER = "made_by_toy_bench"  # in each model folder the toy writes: its files may be replaced by the next call
MODEL_FILES = ("model.pt", "attack.json", "run.log", "regions.png")  # what a call replaces in a model folder


def clear_model_folder(run_dir):
    """Remove the previous call's model, results and log in run_dir (a fresh experiment every time: attack.json
    would merge), only where bench/toy.py made them: a folder holding such files without the toy's marker (a
    user's run, another tool's) is refused in one line, its files untouched. Under the folder's run lock, so a
    run training there is never cleared."""
    names = [n for n in MODEL_FILES if os.path.lexists(os.path.join(run_dir, n))]
    if names and not os.path.exists(os.path.join(run_dir, MARKER)):
        raise files.UserError(f"{run_dir} holds {', '.join(names)} that bench/toy.py did not make; choose another "
                              "--out-dir (the toy replaces only its own files)")
    with files.RunLock(run_dir):
        for n in names:
            os.remove(os.path.join(run_dir, n))
        files.atomic_write(os.path.join(run_dir, MARKER), text="bench/toy.py replaces this folder's files at each call\n")


def figure(out_dir, seed, models, results, exact):
    """toy.png: both models' decision regions (PAG with the ground-truth field it follows) and robust
    accuracy against eps: exact (attack-free, solid) and targeted PGD (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import toy_data

    train_x, train_y, test_x, test_y = make_toy(seed)
    arrows = toy_data.gt_grad_arrows(train_x, train_y)
    fig, axes = plt.subplots(1, 3, figsize=(14, 7.5), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax, name, title in ((axes[0], "vanilla", "vanilla"), (axes[1], "pag", "PAG (NN targets)")):
        toy_data.plot_toy(ax, test_x, test_y, predict=lambda p, m=models[name]: m(p.double()).argmax(1),
                          title=f"{title}: regions, test points",
                          arrows=arrows if name == "pag" else None)
    ax = axes[2]
    for name, colour, label in (("vanilla", "#1f77b4", "vanilla"), ("pag", "#d62728", "PAG")):
        ax.plot(EPS, [exact[name][str(e)] for e in EPS], "-o", color=colour, label=f"{label}, exact")
        ax.plot(EPS, [results[name]["robust_acc"][str(e)] for e in EPS], "--", color=colour, alpha=0.7, label=f"{label}, PGD")
    ax.set(xlabel="L2 radius ε", ylabel="robust accuracy (600 test points)", ylim=(-0.02, 1.02),
           title="robust accuracy against ε")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend()
    lam_c = train_pag.PAG_ARCH_DEFAULTS["mlp"]["pag_coeff"] * 2
    fig.suptitle(f"2-D toy, seed {seed}: MLP 2-32-2; PAG with λ·C = {lam_c:g} (NN targets); float64, one thread", fontsize=12)
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, "toy.png"), dpi=100)
    plt.close(fig)


def seeds_figure(summary, path):
    """seeds.png: exact robust accuracy against eps over the seeds: median line, min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, colour, label in (("vanilla", "#1f77b4", "vanilla"), ("pag", "#d62728", "PAG")):
        st = [summary[name]["exact_robust_acc"][str(e)] for e in EPS]
        ax.plot(EPS, [v["median"] for v in st], "-o", color=colour, label=f"{label}, median")
        ax.fill_between(EPS, [v["min"] for v in st], [v["max"] for v in st], color=colour, alpha=0.2,
                        label=f"{label}, min-max")
    ax.set(xlabel="L2 radius ε", ylabel="exact robust accuracy", ylim=(-0.02, 1.02),
           title=f"2-D toy over {len(summary['seeds'])} seeds (data draw and initialisation)\n"
                 + ("standardised inputs" if summary.get("config", {}).get("standardize") else "raw coordinates, λ·C = 10"))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.save_figure(fig, path, dpi=100)
    plt.close(fig)


def boundary_report(model, distances):
    """Where a model's boundaries are: per test mode, the distance from its points to the decision
    boundary (any direction; `distances` from attack.py's exact-l2, None = beyond the largest eps),
    and the x1 where the prediction changes along the data line x2 = 2*x1 (midpoints between
    modes: -40, -20, 0, 20, 40)."""
    # make_toy's test set: 100 points per mode, in TOY_CENTRES order
    dist = torch.tensor([float("inf") if d is None else d for d in distances]).view(-1, 100)
    modes = [{"class": label, "x1": c} for label, centres in enumerate(TOY_CENTRES) for c in centres]
    for m, d in zip(modes, dist):
        # null in JSON: farther than the largest eps searched
        m["min_dist"], m["median_dist"] = (None if v == float("inf") else round(v, 4) for v in (d.min().item(), d.median().item()))
    x1 = torch.arange(-70, 70, 0.01, dtype=torch.float64)
    with torch.no_grad():
        pred = model(torch.stack([x1, TOY_SLOPE * x1], 1)).argmax(1)
    crossings = x1[1:][pred[1:] != pred[:-1]]
    return {"modes": modes, "line_crossings_x1": [round(v, 2) for v in crossings.tolist()]}


@contextlib.contextmanager
def nudged_first_weight(ulps_of):
    """While active, every model the training loop builds has its first weight moved by one unit in the last
    place of `ulps_of` (torch.float32 or torch.float64) at initialisation: how far one rounding difference of
    another machine's kernels carries through training (bench/README.md)."""
    if ulps_of is None:
        yield
        return
    import train_baseline

    real = train_baseline.build_model

    def build(*a, **k):
        model = real(*a, **k).to(torch.float64)  # the toy's precision, before the nudge (float32 would round it away)
        with torch.no_grad():
            w = next(model.parameters()).view(-1)
            w[0] = torch.nextafter(w[0:1].to(ulps_of), torch.tensor([math.inf], dtype=ulps_of)).to(w.dtype)[0]
        return model
    train_baseline.build_model = build
    try:
        yield
    finally:
        train_baseline.build_model = real


def run_seed(seed, out_dir, epochs, device, standardize=False, nudge=None):
    """The whole experiment for one seed (data draw and initialisation) into out_dir; returns
    (metrics, exact robust accuracies, boundary report). standardize: both models on standardised points;
    nudge: a dtype whose last bit is added to one initial weight (nudged_first_weight)."""
    results, exact, boundaries, models = {}, {}, {}, {}
    for name, script in (("vanilla", "train_baseline.py"), ("pag", "train_pag.py")):
        run_dir = os.path.join(out_dir, name)
        clear_model_folder(run_dir)
        log = os.path.join(run_dir, "run.log")
        with nudged_first_weight(nudge):
            run_script(script, log, "--dataset", "toy", "--seed", seed, "--data-seed", seed, "--epochs", epochs, "--out-dir",
                       run_dir, "--device", device, "--log-every", 1000, "--cache-dir", os.path.join(ROOT, "cache"),
                       *(["--standardize"] if standardize else []))
        run_script("attack.py", log, "--checkpoint", os.path.join(run_dir, "model.pt"), "--measures", "clean", "pgd-l2", "exact-l2", "visualize",
                   "--eps-l2", *EPS, "--target", "runner-up", "--steps", STEPS, "--eval-samples", 600, "--device", device)
        res = files.read_json_object(os.path.join(run_dir, "attack.json"), "attack results")
        results[name] = {"clean_acc": res["clean"]["acc"], "robust_acc": {str(e): res["pgd_l2"][f"{e:g}"]["acc"] for e in EPS}}
        exact[name] = {str(e): res["exact_l2"][f"{e:g}"]["acc"] for e in EPS}
        models[name], _ = load_checkpoint(os.path.join(run_dir, "model.pt"))  # once, for the report and the figure
        boundaries[name] = boundary_report(models[name], res["exact_l2_distance"]["distances"])
    results["attack"] = (f"targeted L2 PGD toward the other class, {STEPS} normalised-gradient steps of 2.5*eps/{STEPS}, "
                         "projection onto the eps ball, random start, margin loss; 600 balanced test points")
    files.write_json(results, os.path.join(out_dir, "metrics.json"))  # exactly the shape tools read (atomic)
    files.write_json({"exact_robust_acc": exact, "how": "distance to the decision boundary by ray search "
                "(360 rays, samples every 0.25 refined by bisection): attack-free", "boundaries": boundaries,
                "config": {"seed": seed, "data_seed": seed, "epochs": epochs, "standardize": standardize,
                           "nudged_first_weight": str(nudge).removeprefix("torch.") if nudge else None}},
                     os.path.join(out_dir, "exact.json"))

    figure(out_dir, seed, models, results, exact)
    print(f"seed {seed}")
    print(f"{'eps':>5} {'vanilla PGD':>12} {'exact':>8} {'PAG PGD':>8} {'exact':>8}")
    for e in EPS:
        print(f"{e:>5} {results['vanilla']['robust_acc'][str(e)]:>12.1%} {exact['vanilla'][str(e)]:>8.1%} "
              f"{results['pag']['robust_acc'][str(e)]:>8.1%} {exact['pag'][str(e)]:>8.1%}")
    print(f"clean {results['vanilla']['clean_acc']:>12.1%} {'':>8} {results['pag']['clean_acc']:>8.1%}")
    for name in ("vanilla", "pag"):
        b = boundaries[name]
        print(f"{name}: nearest boundary per mode (x1 centre: min distance) "
              + ", ".join(f"{m['x1']:+.0f}: " + ("far" if m["min_dist"] is None else f"{m['min_dist']:.1f}") for m in sorted(b["modes"], key=lambda m: m["x1"]))
              + f"; crosses the data line at x1 = {', '.join(f'{v:.1f}' for v in b['line_crossings_x1'])}")
    rel = os.path.relpath(out_dir)
    print(f"wrote {rel}/metrics.json, {rel}/exact.json, {rel}/toy.png (logs: {rel}/<model>/run.log)")
    return results, exact, boundaries


def summarise(per_seed):
    """Across seeds: per model, clean accuracy and exact / PGD robust accuracy per eps, as
    {"per_seed": [...], "median": m, "min": a, "max": b}."""
    def stats(values):
        return {"per_seed": values, "median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {"seeds": [s for s, _ in per_seed]}
    for name in ("vanilla", "pag"):
        out[name] = {
            "clean_acc": stats([r[0][name]["clean_acc"] for _, r in per_seed]),
            "exact_robust_acc": {str(e): stats([r[1][name][str(e)] for _, r in per_seed]) for e in EPS},
            "pgd_robust_acc": {str(e): stats([r[0][name]["robust_acc"][str(e)] for _, r in per_seed]) for e in EPS},
        }
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--out-dir", default=os.path.join("results", "toy"), help="where results go")
    p.add_argument("--seed", type=cli.seed, nargs="+", default=[2],
                   help="seed of the data draw and of both models' initialisation (2: an arbitrary draw); several: "
                        "DIR/seed<S>/ each, and DIR/seeds.json and seeds.png with median, min and max over them")
    p.add_argument("--epochs", type=cli.positive_int, default=100, help="training epochs of both models")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train and attack")
    p.add_argument("--standardize", action="store_true",
                   help="both models on standardised points (mean 0, std 1 inside the model; radii stay raw): "
                        "shows that the toy's contrast comes from the raw coordinate scale")
    p.add_argument("--nudge", choices=("float32", "float64"),
                   help="move one initial weight of both models by one unit in the last place of this precision: "
                        "how far one rounding difference (another machine's kernels) carries through training")
    args = p.parse_args(argv)
    if len(set(args.seed)) != len(args.seed):
        p.error(f"--seed lists a seed twice: {args.seed}")
    out_dir = os.path.abspath(args.out_dir)
    nudge = getattr(torch, args.nudge) if args.nudge else None
    # Every model folder is checked before any is cleared or trained: a refusal leaves everything as it was.
    dirs = [out_dir] if len(args.seed) == 1 else [os.path.join(out_dir, f"seed{s}") for s in args.seed]
    for d in dirs:
        for name in ("vanilla", "pag"):
            held = [n for n in MODEL_FILES if os.path.lexists(os.path.join(d, name, n))]
            if held and not os.path.exists(os.path.join(d, name, MARKER)):
                raise files.UserError(f"{os.path.join(d, name)} holds {', '.join(held)} that bench/toy.py did not make; "
                                      "choose another --out-dir (the toy replaces only its own files)")
    with files.RunLock(out_dir):  # one toy call per folder: another would clear the models this one trains
        return run_seeds(args, out_dir, nudge)


def run_seeds(args, out_dir, nudge):
    if len(args.seed) == 1:
        return run_seed(args.seed[0], out_dir, args.epochs, args.device, args.standardize, nudge)
    per_seed = [(s, run_seed(s, os.path.join(out_dir, f"seed{s}"), args.epochs, args.device, args.standardize, nudge))
                for s in args.seed]
    summary = summarise(per_seed)
    summary["config"] = {"epochs": args.epochs, "standardize": args.standardize, "nudged_first_weight": args.nudge}
    files.write_json(summary, os.path.join(out_dir, "seeds.json"))
    seeds_figure(summary, os.path.join(out_dir, "seeds.png"))
    print(f"\nover seeds {args.seed}: exact robust accuracy, median [min, max]")
    print(f"{'eps':>5} {'vanilla':>22} {'PAG':>22}")
    for key, label in (("clean_acc", "clean"), *((e, str(e)) for e in EPS)):
        cells = []
        for name in ("vanilla", "pag"):
            st = summary[name]["clean_acc"] if key == "clean_acc" else summary[name]["exact_robust_acc"][str(key)]
            cells.append(f"{st['median']:.1%} [{st['min']:.1%}, {st['max']:.1%}]")
        print(f"{label:>5} {cells[0]:>22} {cells[1]:>22}")
    print(f"wrote {os.path.relpath(out_dir)}/seeds.json and seeds.png")
    return summary


if __name__ == "__main__":
    cli.run_cli(main)  # a bad input in any script: one `error:` line, exit status 1
