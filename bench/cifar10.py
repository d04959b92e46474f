"""The paper's Table 1 rows and claims on natural images, at a budget two CPU cores can afford: CIFAR-10.

    python bench/cifar10.py                      # ../shared/cifar10-jpeg, the JPEG copy (about 14 job-hours, 2 jobs)
    python bench/cifar10.py --dataset cifar10    # the real CIFAR-10 (torchvision's files under --data-dir)
    python bench/cifar10.py --budget             # then: vanilla and PAG-CM at more images and epochs (seed 0)
    python bench/cifar10.py --collect            # the tables and figures from the committed result files; trains nothing
    python bench/cifar10.py --collect --budget   # the same, and the budget curve's
    python bench/cifar10.py --quick              # smoke run on synthetic images (minutes)

The claims bench's protocol (bench/fashion_mnist.py, whose code this reuses) on CIFAR-10 images: a fixed
class-balanced validation split chooses lambda (PAG-CM's sweep, the same SELECTION_RULE) and is the only
data any choice looks at; every model is trained by the ordinary scripts and evaluated once on the test
images by attack.py (AutoAttack APGD-CE + APGD-T at the paper's radii, L2 0.5 and L-inf 8/255, and
held-out alignment); claims are computed from the numbers by the claims bench's rule. The rows:

  vanilla, pag-oi, pag-cm, pag-nn, pag-sbg (fields from sbg.py's own denoiser, trained here on the same
  training images, its noise level chosen by `sbg.py sweep` on them), pgd-at (L2 0.5: the reference a
  reader expects), each at every seed; pag-cm at every lambda of the sweep.

and, after them, standard AutoAttack (FAB-T and Square added) on PAG-CM seed 0: the check that APGD is
enough. The paper's CIFAR-10 numbers (ResNet-18, 100 epochs, full test set) are printed beside each row as
the reference a reader compares with, never as a pass mark. Why this network and budget: bench/README.md.

Result files go to RESULTS/<name>_runs/ (name: cifar10_jpeg for the JPEG copy, cifar10 for the real set),
the denoiser and its sweep to RESULTS/<name>_sbg/ (committed), checkpoints and fields to --out-dir. A killed
bench continues from them. At the end: <name>_seeds.json (+ .md), <name>_lambda.json, <name>_tradeoff.png,
<name>_alignment.png, <name>_standard_aa.json; with --budget: <name>_budget.json (+ .md, .png).
"""
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
import cli  # noqa: E402 - the project's parser
import files  # noqa: E402 - the one atomic writer
import fashion_mnist as fm  # noqa: E402 - the claims bench: its protocol, rule and tables
from reports import budget_figure, budget_markdown, natural_images_notes  # noqa: E402
from runner import add_bench_flags, git_commit, run_jobs, sh  # noqa: E402
from checkpoint import read_metrics, write_metrics  # noqa: E402 - metrics.jsonl, read checked

RESULTS = os.path.join(BENCH, "results")
JPEG_COPY = os.path.join("..", "shared", "cifar10-jpeg")  # relative to the project root, where jobs run

# The paper's robust accuracies on CIFAR-10 (%, AutoAttack L2 0.5, L-inf 8/255; ResNet-18, 100 epochs, 10,000 test
# images; read from its figures, PAG-SBG the lambda 2.0 point of its sweep; the other sources' lambda is not stated).
PAPER = {"vanilla": (0.00, 0.00), "pag-oi": (46.63, 13.50), "pag-cm": (47.25, 11.24), "pag-nn": (42.12, 7.51),
         "pag-sbg": (55.39, 23.97)}
MODELS = {m: fm.MODELS[m] for m in ("vanilla", "pag-oi", "pag-cm", "pag-nn", "pag-sbg", "pgd-at")}

# Every setting of the bench, in one place (written into the results' config). Why these: bench/README.md,
# "CIFAR-10 images at CPU scale" (the cnn at lambda 0.2 stays near chance on these images; 0.1 learns).
CONFIG = dict(
    fm.CONFIG, dataset="folder", data_dir=JPEG_COPY, data_label="CIFAR-10 (JPEG copy)", arch="cnn",
    epochs=10, train_samples=10000, val_samples=1000, test_samples=1000, seeds=[0, 1, 2],
    lambdas=[0.05, 0.1, 0.15], sweep_seeds=[0, 1, 2], eps_l2=0.5, eps_linf=8 / 255,
    adv_training="PGD L2 eps 0.5, 10 steps of 2.5*eps/10",
    sbg=dict(epochs=30, seed=0, timestep="the sweep's largest gap", noise_draws=1,
             sweep_timesteps=[50, 100, 200, 300, 400, 600], sweep_images=256),
    standard_check="pag-cm", standard_iterations=None, budgets=[[5000, 5], [10000, 10], [25000, 20]], budget_rows=["vanilla", "pag-cm"],
    budget_seed=0,
    reference="the paper's CIFAR-10 robust accuracies (ResNet-18, 100 epochs, λ·C 15-20, AutoAttack on the 10,000 "
              "real test images; PAG-SBG at λ 2.0, the other sources' λ unstated): a reference for scale, not a "
              "pass mark",
)
QUICK = dict(dataset="synthetic", data_dir=None, data_label="synthetic (quick)", epochs=1, train_samples=384,
             val_samples=64, test_samples=32, seeds=[0, 1], lambdas=[0.05, 0.1], sweep_seeds=[0, 1],
             sbg=dict(CONFIG["sbg"], epochs=1, sweep_timesteps=[100, 300], sweep_images=16),
             standard_iterations=2, budgets=[[256, 1], [384, 1]])


class NaturalImagesBench(fm.ClaimsBench):
    """The claims bench on CIFAR-10 images: its rows, sweep, selection, claims and tables; the data from a
    folder (or torchvision), the SBG noise level from the denoiser's sweep, the paper's numbers beside the rows."""
    models = MODELS
    reference = PAPER

    def __init__(self, cfg, out_dir, results_dir, workers, rows=None, name=None):
        self.name = name
        super().__init__(cfg, out_dir, results_dir, workers, rows)

    def common_flags(self, cfg):
        data, train = super().common_flags(cfg)
        where = ["--data-dir", cfg["data_dir"]] if cfg["data_dir"] else []
        return [*data, *where], [*train[:len(data)], *where, *train[len(data):]]

    def settings(self, model, seed, lam):
        """The claims bench's, with the data folder named as DATA_DIR: a path is not a setting (the data's content
        is recorded in each result file instead)."""
        want = super().settings(model, seed, lam)
        if self.cfg["data_dir"]:
            want["train"] = want["train"].replace(f"--data-dir {self.cfg['data_dir']} ", "--data-dir DATA_DIR ")
        return want

    def sbg_timestep(self, ckpt, log):
        """The noise level with the largest gap between the fields toward an image's own class and toward the others,
        measured by `sbg.py sweep` on training images (kept beside the denoiser: RESULTS/<name>_sbg/sweep.json)."""
        s, out = self.cfg["sbg"], os.path.join(self.denoiser_dir, "sweep.json")
        sweep_settings = {"denoiser_sha256": files.file_sha256(ckpt), "timesteps": s["sweep_timesteps"],
                          "images": s["sweep_images"]}
        if not os.path.exists(out) or files.read_json_object(out, "SBG sweep file").get("settings") != sweep_settings:
            sh(log, "sbg.py", "sweep", *self.data_flags, "--checkpoint", ckpt, "--sweep-timesteps", *s["sweep_timesteps"],
               "--sweep-images", s["sweep_images"], "--seed", s["seed"], "--out", out,
               "--vis-out", os.path.join(self.denoiser_dir, "sweep.png"))
            result = files.read_json_object(out, "SBG sweep file")
            files.write_json({**result, "settings": sweep_settings, "commit": git_commit()}, out)
        return files.read_json_object(out, "SBG sweep file")["best_timestep"]

    def config_extras(self, results):
        """The data every model was trained and tested on, by content (one value, or the tables are refused)."""
        seen = {json.dumps(r.get("data_sha256"), sort_keys=True) for r in results.values()}
        if len(seen) != 1:
            raise files.UserError(f"the result files in {self.runs_dir} were made on different data ({len(seen)} "
                                  "contents): delete those of the other data, or pass another --results-dir")
        return {"data_sha256": json.loads(seen.pop()), "made_at_commits": sorted({str(r.get("commit")) for r in results.values()})}

    # -- standard AutoAttack on one model: is APGD-CE + APGD-T enough here?
    def standard_path(self):
        return os.path.join(self.results_dir, f"{self.name}_standard_aa.json")

    def standard_check(self):
        """The runner's check (APGD against standard AutoAttack) on the standard_check row at the first seed."""
        model, seed = self.cfg["standard_check"], self.cfg["seeds"][0]
        lam = self.lam if model in fm.PAG_ROWS else None
        if os.path.exists(self.standard_path()) and files.read_json_object(self.standard_path(), "standard AutoAttack file")["apgd"]["key"] == self.key(model, seed, lam):
            return None  # made by an earlier call, for this model
        return super().standard_check(model, seed, lam, self.standard_path())

    def run(self):
        """The claims bench's plan, then the standard AutoAttack check once its model is in."""
        wall = super().run()
        if self.cfg["standard_check"] in self.rows:
            wall += run_jobs({"standard": self.standard_check}, {}, 1)
        return wall

    def assemble(self, wall):
        """The claims bench's tables and figures, and below its table: the SBG ground truth's sweep and the standard
        AutoAttack check, from their files."""
        out = super().assemble(wall)
        if not self.wrote_tables:  # a subset of rows beside the full tables: nothing is added to them
            return out
        md_path = os.path.join(self.results_dir, f"{self.name}_seeds.md")
        sweep_path = os.path.join(self.denoiser_dir, "sweep.json")
        sweep = files.read_json_object(sweep_path, "SBG sweep file") if os.path.exists(sweep_path) else None
        standard = files.read_json_object(self.standard_path(), "standard AutoAttack file") if os.path.exists(self.standard_path()) else None
        if standard is not None and standard["apgd"]["key"] != self.key(self.cfg["standard_check"], self.cfg["seeds"][0],
                                                                         self.lam):
            standard = None  # made for another model (another selected lambda): not this table's
        md = open(md_path).read() + natural_images_notes(self.cfg, sweep, standard)
        files.atomic_write(md_path, text=md)
        print(natural_images_notes(self.cfg, sweep, standard))
        return out

    def missing(self):
        """The result files the tables need that are not there or were made with other settings (--collect refuses
        to train them, or to table them): "key (why)" each."""
        seeds, sweep_seeds = self.cfg["seeds"], self.cfg["sweep_seeds"]

        def why(model, seed, lam=None):
            reason = self.unusable(model, seed, lam)
            return reason and f"{self.key(model, seed, lam)} ({reason})"
        plan = [(m, s, None) for m in self.rows if m not in fm.PAG_ROWS for s in seeds]
        plan += [("pag-cm", s, lam) for lam in self.cfg["lambdas"] for s in sweep_seeds] + [("vanilla", s, None) for s in sweep_seeds]
        missing = [w for w in (why(*p) for p in plan) if w]
        if not missing:
            self.select()
            missing = [w for w in (why(m, s, self.lam) for m in self.rows if m in fm.PAG_ROWS for s in seeds) if w]
        return missing


# ----------------------------------------------------------------------------- more images, more epochs
class BudgetBench(NaturalImagesBench):
    """vanilla and PAG-CM (at the main bench's selected lambda) at each budget of cfg["budgets"] (training images x
    epochs), one seed, the main bench's evaluation; the main bench's own budget is read from its result files."""
    align = False  # no SBG alignment (no fields needed): the curve is about accuracy and robustness
    result_fields = {k: v for k, v in fm.CLAIMS_RESULT_FIELDS.items() if k != "align_sbg"}

    def __init__(self, cfg, out_dir, results_dir, workers, name, budget, lam):
        self.budget, self.lam = budget, lam
        super().__init__({**cfg, "train_samples": budget[0], "epochs": budget[1]}, out_dir, results_dir, workers,
                         cfg["budget_rows"], name=name)
        self.runs_dir = os.path.join(results_dir, f"{name}_budget_runs")

    def key(self, model, seed, lam=None):
        return f"{super().key(model, seed, lam)}_n{self.budget[0]}_e{self.budget[1]}"

    def run_dir(self, key):
        return os.path.join(self.out_dir, "budget", key)

    def result_extras(self, model):
        return {}


def epoch_pgd(row):
    """A metrics.jsonl line's per-epoch PGD check on the validation images (its key names the radius), or None."""
    return next((v for k, v in row.items() if k.startswith("val_pgd_l2_")), None)


def keep_epochs(run_dir, copy, result, epochs):
    """A run's per-epoch log (metrics.jsonl: validation accuracy and PGD check, CE and PAG terms) copied beside its
    result file, so the budget figure's per-epoch curves are drawn from committed files. A log belongs to `result`
    only if it has every epoch and its last line holds the result's own validation numbers: the run folder's log is
    copied (over an older copy) where it does; else the copy there is used where it does (a fresh machine has no
    run folders); a copy of another run is refused. Returns the rows, or None where there is no log."""
    def rows_of(path):
        rows = read_metrics(path, epochs) if os.path.exists(path) else []
        last = rows[-1] if len(rows) == epochs else {}
        return rows if (last.get("val_acc"), epoch_pgd(last)) == (result["val_acc"], result["val_pgd_l2_acc"]) else None
    run_rows = rows_of(os.path.join(run_dir, "metrics.jsonl"))
    if run_rows is not None:
        if rows_of(copy) != run_rows:
            write_metrics(copy, run_rows)
        return run_rows
    if not os.path.exists(copy):
        return None
    rows = rows_of(copy)
    if rows is None:
        raise files.UserError(f"{copy} is not the per-epoch log of {result['key']} (its epochs or its last validation "
                              "numbers differ from the result file's); delete it, or restore the run's metrics.jsonl")
    return rows


def budget_curve(cfg, out_dir, results_dir, workers, main, collect=False):
    """Train and evaluate every budget (the main bench's from its own files), then <name>_budget.json/.md/.png.
    collect: only from the result files there are (a missing one is refused, nothing is trained)."""
    main.select()
    seed, lam = cfg["budget_seed"], main.lam
    points, jobs = [], {}
    for n, epochs in cfg["budgets"]:
        same = (n, epochs) == (cfg["train_samples"], cfg["epochs"])
        for model in cfg["budget_rows"]:
            pag = lam if model in fm.PAG_ROWS else None
            if same:
                points.append((n, epochs, model, lambda model=model, pag=pag: main.read_result(main.key(model, seed, pag))))
                continue
            b = BudgetBench(cfg, out_dir, results_dir, workers, main.name, [n, epochs], lam)
            why = collect and b.unusable(model, seed, pag)  # --collect: its file, or nothing is written
            if why:
                raise files.UserError(f"--collect --budget: {b.result_path(b.key(model, seed, pag))} is {why}; run "
                                      "python bench/cifar10.py --budget to make it")
            jobs[f"{model} {n} x {epochs}"] = lambda b=b, model=model, pag=pag: b.train_and_attack(model, seed, pag)
            points.append((n, epochs, model, lambda b=b, model=model, pag=pag: b.read_result(b.key(model, seed, pag))))
    cost = {name: int(name.split()[1]) * int(name.split()[3]) * (10 if "pag" in name else 1) for name in jobs}
    if not collect:
        run_jobs(jobs, {}, workers, cost)
    table = []
    runs_dir = os.path.join(results_dir, f"{main.name}_budget_runs")
    test_data = (main.read_result(main.key("vanilla", seed)).get("data_sha256") or {}).get("test")  # every point's test images
    for n, epochs, model, read in points:
        r = read()
        same = (n, epochs) == (cfg["train_samples"], cfg["epochs"])  # the main bench's run: its folder, its key
        copy = os.path.join(runs_dir, (f"{r['key']}_n{n}_e{epochs}" if same else r["key"]) + ".metrics.jsonl")
        if (r.get("data_sha256") or {}).get("test") != test_data:
            raise files.UserError(f"{r['key']} ({n} x {epochs}) was tested on other images than the main bench's: delete "
                                  "its result file and run --budget again")
        rows = keep_epochs(os.path.join(out_dir, *([] if same else ["budget"]), r["key"]), copy, r, epochs)
        per_epoch = rows and [{"epoch": e["epoch"], "val_acc": e.get("val_acc"), "pag": e.get("pag"),
                               "val_pgd_l2_acc": epoch_pgd(e)} for e in rows]
        table.append({"train_samples": n, "epochs": epochs, "images_seen": n * epochs, "model": model, "seed": seed,
                      "lambda": r["lambda"], **{m: r[m] for m in ("clean", "aa_l2", "aa_linf", "align_nn")},
                      "train_seconds": r["train_seconds"], "commit": r.get("commit"), "per_epoch": per_epoch})
    config = {k: cfg[k] for k in ("data_label", "arch", "optimizer", "lr", "batch_size", "val_samples", "test_samples",
                                  "attack", "eps_l2", "eps_linf", "budgets", "budget_rows", "budget_seed")}
    out = {"config": {**config, "selected_lambda": lam}, "points": table}
    base = os.path.join(results_dir, f"{main.name}_budget")
    files.write_json(out, base + ".json")
    files.atomic_write(base + ".md", text=budget_markdown(out))
    budget_figure(out, base + ".png")
    for suffix in (".json", ".md", ".png"):
        print(f"wrote {os.path.relpath(base + suffix)}")
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--dataset", choices=("folder", "cifar10"), default="folder",
                   help="folder: the JPEG copy (or --data-dir); cifar10: the real set (torchvision's files)")
    p.add_argument("--data-dir", help=f"the images (default: {JPEG_COPY} for folder, data for cifar10), relative to the "
                                      "project root")
    p.add_argument("--quick", action="store_true", help="smoke run on synthetic images: " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items() if k not in ("sbg", "data_dir", "data_label")))
    p.add_argument("--budget", action="store_true", help="the budget curve (after the main bench: it needs its lambda)")
    p.add_argument("--collect", action="store_true", help="only assemble the committed result files (with --budget: "
                                                          "the budget curve's too): never trains, refuses when one is missing")
    add_bench_flags(p, MODELS, "runs/<name>_bench")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps({**CONFIG, **(QUICK if args.quick else {})}))
    if args.quick and args.dataset != "folder":
        raise files.UserError("--quick runs on synthetic images; it takes no --dataset")
    if not args.quick:
        cfg["dataset"] = args.dataset
        cfg["data_dir"] = args.data_dir or (JPEG_COPY if args.dataset == "folder" else "data")
        if args.dataset == "cifar10":
            cfg["data_label"] = "CIFAR-10"
    root = os.path.dirname(BENCH)
    if cfg["data_dir"] and not args.collect and not os.path.isdir(os.path.join(root, cfg["data_dir"])):  # --collect reads no image
        raise files.UserError(f"--data-dir {cfg['data_dir']}: no such folder under {root} (the CIFAR-10 JPEG copy lives "
                              f"in {JPEG_COPY}; the real CIFAR-10: --dataset cifar10 --data-dir DIR)")
    name = "cifar10_quick" if args.quick else "cifar10_jpeg" if args.dataset == "folder" else "cifar10"
    out_dir = os.path.abspath(args.out_dir or os.path.join("runs", f"{name}_bench"))
    results_dir = os.path.abspath(args.results_dir or (out_dir if args.quick else RESULTS))
    rows = set(args.rows) | ({"vanilla", "pag-cm"} if set(args.rows) & set(fm.PAG_ROWS) else set())
    bench = NaturalImagesBench(cfg, out_dir, results_dir, args.jobs, rows, name=name)
    if args.collect:
        missing = bench.missing()
        if missing:
            raise files.UserError(f"--collect: {len(missing)} result file(s) in {bench.runs_dir} cannot be tabled ({', '.join(missing[:4])}"
                                  f"{', ...' if len(missing) > 4 else ''}); run the bench without --collect to make them")
        out = bench.assemble(0.0)
        return budget_curve(cfg, out_dir, results_dir, args.jobs, bench, collect=True) if args.budget else out
    if args.budget:
        if bench.missing():
            raise files.UserError("--budget needs the main bench's results (its selected lambda and its own budget): "
                                  "run python bench/cifar10.py first")
        return budget_curve(cfg, out_dir, results_dir, args.jobs, bench)
    return bench.assemble(bench.run())


if __name__ == "__main__":
    cli.run_cli(main)
