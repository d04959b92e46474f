"""The paper's four claims at CPU scale on real data (Fashion-MNIST): seeds, intervals, choices on validation images.

    python bench/fashion_mnist.py            # 8 seeds of every row, the lambda sweep at 3 (hours on 2 CPU cores)
    python bench/fashion_mnist.py --quick    # smoke run: 2 seeds, tiny subsets, 1 epoch (minutes)

Every model is trained by the ordinary scripts and evaluated by attack.py, once per seed (the seed
sets initialisation, batch order, PAG targets and attack starts; the training images, the validation
images and the test images stay fixed):

  rows     vanilla, pag-cm, pag-nn, pag-oi, pag-sbg, pgd-at, trades, pag-cm+pgd-at (every seed of --seeds)
  sweep    pag-cm at every lambda of --lambdas (the seeds of --sweep-seeds: lambda is chosen there once,
           and further seeds add models at that lambda without choosing again)

The protocol (CONFIG below holds every number):
  1. A validation split (--val-samples training images, a fixed random subset, never trained on) is
     the only data any choice looks at: every per-epoch check, and lambda.
  2. lambda for every PAG row = the SELECTION_RULE applied to the sweep's validation accuracies (sweep seeds).
  3. The test images are touched once per model, by the final evaluation: clean accuracy, AutoAttack
     (APGD-CE + APGD-T, standard settings) L2 and L-inf, and held-out alignment: the cosine between the
     model's grad log softmax and the targets on those test images, NN targets from the training
     images and SBG fields exported for the test images by the same denoiser (never the training
     fields a model was fit to). The denoiser (sbg.py, trained once, seed 0) is a fixed source of
     ground truth like the data, shared by every seed.
  4. Claims are computed from the numbers by CLAIM_RULE (claims(), below), never written by hand.

Each finished (model, seed) lands in a small JSON in RESULTS/fashion_mnist_runs/ (committed for the
full run), so a killed bench, or one started on a fresh machine, continues from those: a model whose
file is there is not trained again, and a file made with other settings is refused. The denoiser
(3.5 MB) is kept beside them in RESULTS/fashion_mnist_sbg/ (committed too: every machine exports the same
fields from it); checkpoints, logs and the fields go to --out-dir. Jobs run as one-thread processes, --jobs at a time. At the end:
fashion_mnist_seeds.json (+ .md), fashion_mnist_lambda.json, and the figures fashion_mnist_tradeoff.png
and fashion_mnist_alignment.png in RESULTS.
"""
import json
import math
import os
import statistics
import sys

# This file says what to run and what to conclude; the pieces it runs on are bench/runner.py (the jobs, the
# result files), bench/stats.py (the intervals, the verdict rule) and bench/reports.py (the .md and figures).
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # the bench's pieces, and the project's modules
import cli  # noqa: E402 - the project's parser
import files  # noqa: E402 - the one atomic writer
from reports import claims_figures, claims_markdown  # noqa: E402
from runner import RESULT_FIELDS, RESULT_OPTIONAL, Bench, add_bench_flags, run_jobs  # noqa: E402
from stats import combine, correlation_over_seeds, mean_interval, paired, verdict  # noqa: E402
RESULTS = os.path.join(BENCH, "results")

# Every setting of the bench, in one place (written into the results' config).
CONFIG = dict(
    dataset="fashion-mnist", arch="cnn", optimizer="adam", lr=1e-3, lr_drops=None, augment=False, batch_size=64,
    epochs=10, train_samples=6000, val_samples=1000, test_samples=500, seeds=[0, 1, 2, 3, 4, 5, 6, 7],
    lambdas=[0.1, 0.25, 0.5, 1.0], sweep_seeds=[0, 1, 2], selection_split="val",
    selection_rule="the largest lambda of the sweep whose mean validation clean accuracy (last epoch, over seeds) "
                   "is at most 10 points below vanilla's; the smallest lambda if none is",
    selection_max_drop=0.10,
    attack="AutoAttack APGD-CE + APGD-T (standard settings)", aa_version="apgd", eps_l2=1.5, eps_linf=0.1,
    adv_training="PGD L2 eps 1.5, 10 steps of 2.5*eps/10; TRADES beta 6",
    align="mean cos(grad_x log softmax_t, g(x, t)) over all 10 classes on the test images",
    sbg=dict(epochs=15, seed=0, timestep=300, noise_draws=1),
    interval="95% Student-t interval over seeds (paired by seed for differences)",
    correlation_interval="Pearson r within each seed, 95% Student-t interval over seeds on Fisher's z scale",
    claim_rule="holds: the interval lies above 0 for every comparison of the claim; contradicted: it lies below 0 "
               "for some comparison; not shown: otherwise",
)
QUICK = dict(epochs=1, train_samples=384, val_samples=64, test_samples=32, seeds=[0, 1], lambdas=[0.1, 1.0],
             sweep_seeds=[0, 1], sbg=dict(CONFIG["sbg"], epochs=1))
MODELS = {  # row -> (script, flags); PAG rows also get --pag-coeff (the selected lambda)
    "vanilla": ("train_baseline.py", []),
    "pag-cm": ("train_pag.py", ["--source", "cm"]),
    "pag-nn": ("train_pag.py", ["--source", "nn"]),
    "pag-oi": ("train_pag.py", ["--source", "oi"]),
    "pag-sbg": ("train_pag.py", ["--source", "sbg"]),  # + --sbg-file, made by sbg.py first
    "pgd-at": ("train_baseline.py", ["--adv", "pgd", "--adv-norm", "l2"]),
    "trades": ("train_baseline.py", ["--adv", "trades", "--adv-norm", "l2"]),
    "pag-cm+pgd-at": ("train_pag.py", ["--source", "cm", "--adv", "pgd", "--adv-norm", "l2"]),
}
PAG_ROWS = [m for m, (script, _) in MODELS.items() if script == "train_pag.py"]
COST = {"vanilla": 1, "pag-cm": 10, "pag-nn": 11, "pag-oi": 10, "pag-sbg": 10, "pgd-at": 11, "trades": 12,
        "pag-cm+pgd-at": 18}  # relative training time: the longest ready jobs start first
METRICS = ("clean", "aa_l2", "aa_linf", "align_nn", "align_sbg")


# ----------------------------------------------------------------------------- what to conclude
def select_lambda(val_clean, lambdas, max_drop):
    """SELECTION_RULE: val_clean[name][seed] = validation clean accuracy; names "vanilla" and lambda floats."""
    base = statistics.fmean(val_clean["vanilla"])
    ok = [lam for lam in lambdas if statistics.fmean(val_clean[lam]) >= base - max_drop]
    return max(ok) if ok else min(lambdas)


def row_stats(results):
    """A row of the tables: every metric's mean and interval over the result files of its seeds."""
    return {k: mean_interval([r[k] for r in results]) for k in (*METRICS, "val_acc", "val_pgd_l2_acc")}


CLAIMS = {  # claim -> (what it says, [(model, compared with)]), each pair on AutoAttack L2 and L-inf
    "1": ("every PAG source is more robust than vanilla (AutoAttack L2 and L-inf)",
          [(m, "vanilla") for m in ("pag-cm", "pag-nn", "pag-oi", "pag-sbg")]),
    "2": ("SBG is the most robust source (AutoAttack L2 and L-inf)", [("pag-sbg", m) for m in ("pag-cm", "pag-nn", "pag-oi")]),
    "4": ("adding PAG to adversarial training makes it more robust (AutoAttack L2 and L-inf)", [("pag-cm+pgd-at", "pgd-at")]),
}


def claims(rows):
    """Claims 1, 2 and 4 from rows[model][metric]["per_seed"], by CLAIM_RULE; "not run" where a row is missing."""
    out = {}
    for k, (text, pairs) in CLAIMS.items():
        if not all(a in rows and b in rows for a, b in pairs):
            out[k] = {"claim": text, "verdict": "not run", "difference": None, "ci95": None}
            continue
        out[k] = combine([paired(rows[a][m]["per_seed"], rows[b][m]["per_seed"], f"{a} - {b}, {m}")
                          for a, b in pairs for m in ("aa_l2", "aa_linf")])
        out[k]["claim"] = text
    return out


CLAIM_3_MEASURES = (("align_sbg", "pag-sbg"), ("align_nn", "pag-nn"))  # each measure, and the row trained on its targets


def claim_3(points, seeds, over="the PAG rows and the lambda sweep"):
    """Claim 3 by CLAIM_RULE: among PAG models, held-out alignment correlates with AutoAttack L2, for each measure
    of alignment (SBG fields, NN targets), each without the row trained on that measure's own targets (aligned
    to them by construction). The correlations with those rows are kept beside it (`with_own_rows`)."""
    text = (f"better-aligned models are more robust: within-seed Pearson r of held-out alignment with aa_l2 over {over}, "
            "for SBG and NN alignment")

    def correlation(measure, rows, what):
        c = correlation_over_seeds([(p["seed"], p[measure], p["aa_l2"]) for p in rows], seeds)
        return {"comparison": what, "measure": measure, "points": len(rows), "difference": c["r"], "ci95": c["ci95"],
                "per_seed": c["per_seed"], "verdict": verdict(c["ci95"])}
    comparisons = [correlation(m, [p for p in points if p["model"] != own], f"r({m}, aa_l2) without {own}")
                   for m, own in CLAIM_3_MEASURES]
    with_own = {m: correlation(m, points, f"r({m}, aa_l2)") for m, _ in CLAIM_3_MEASURES}
    if any(c["difference"] is None for c in comparisons):
        return {"claim": text, "verdict": "not run", "difference": None, "ci95": None, "comparisons": comparisons,
                "with_own_rows": with_own}
    return {**combine(comparisons), "claim": text, "with_own_rows": with_own}


# ----------------------------------------------------------------------------- what to run
CLAIMS_RESULT_FIELDS = {**RESULT_FIELDS, **{k: RESULT_OPTIONAL[k] for k in (
    "seed", "lambda", "val_acc", "val_pgd_l2_acc", "train_seconds", "seconds")},
    **{k: lambda v: v is not None and RESULT_OPTIONAL["align_nn"](v) for k in ("align_nn", "align_sbg")}}  # numbers here


def attack_command(cfg, ckpt, seed, out):
    """The final evaluation on the test images: clean, AutoAttack L2 and L-inf, NN alignment (cfg: a bench config,
    or a result file's settings["attack"]: aa_version, eps_l2, eps_linf, test_samples)."""
    return ["attack.py", "--checkpoint", ckpt, "--measures", "clean", "aa-l2", "aa-linf", "align", "--aa-version",
            cfg["aa_version"], "--eps-l2", cfg["eps_l2"], "--eps-linf", cfg["eps_linf"],
            "--eval-samples", cfg["test_samples"], "--align-source", "nn", "--seed", seed, "--out", out]


class ClaimsBench(Bench):
    """The claims bench on the runner: every row with held-out alignment, the lambda sweep, the selection on
    the validation split, and the tables, claims and figures from the result files."""
    models = MODELS
    name = "fashion_mnist"
    align = True
    result_fields = CLAIMS_RESULT_FIELDS  # what a result file must hold for assemble()
    lam = None  # the selected lambda, once the sweep is in (select)
    reference = None  # row -> the paper's (L2, L-inf) robust accuracy in %, beside the rows (cifar10.py)

    def common_flags(self, cfg):
        """(the data flags sbg.py shares, every training command's flags)."""
        data = ["--dataset", cfg["dataset"], "--train-samples", cfg["train_samples"], "--val-samples", cfg["val_samples"]]
        return data, [*data, "--arch", cfg["arch"], "--optimizer", cfg["optimizer"], "--lr", cfg["lr"], "--lr-drops=",
                      "--no-augment", "--batch-size", cfg["batch_size"], "--epochs", cfg["epochs"],
                      "--eval-samples", cfg["val_samples"], "--log-every", 100]

    def attack_command(self, ckpt, seed, out):
        return attack_command(self.cfg, ckpt, seed, out)

    def measures(self, res):
        """The runner's numbers, and the NN alignment that attack_command asks for."""
        return {**super().measures(res), "align_nn": res["align"]["nn test"]["cos"]}

    def choose_lambda(self, source):
        """SELECTION_RULE on the validation accuracies of vanilla and `source`'s sweep (every sweep seed):
        (those accuracies, the chosen lambda)."""
        seeds, lambdas = self.cfg["sweep_seeds"], self.cfg["lambdas"]
        val = {"vanilla": [self.read_result(self.key("vanilla", s))["val_acc"] for s in seeds]}
        for lam in lambdas:
            val[lam] = [self.read_result(self.key(source, s, lam))["val_acc"] for s in seeds]
        lam = select_lambda(val, lambdas, self.cfg["selection_max_drop"])
        print(f"{source}: selected lambda {lam:g} (validation clean: vanilla {statistics.fmean(val['vanilla']):.1%}, "
              + ", ".join(f"{x:g}: {statistics.fmean(val[x]):.1%}" for x in lambdas) + ")", flush=True)
        return val, lam

    def select(self):
        """lambda for every PAG row: chosen on PAG-CM's sweep."""
        val, self.lam = self.choose_lambda("pag-cm")
        return val

    def run(self):
        """The plan: the rows that need no lambda, the sweep at the sweep seeds, the selection once the sweep is in,
        then every PAG row at the selected lambda; the SBG fields first, as every model's alignment needs them.
        Returns the wall seconds."""
        seeds, lambdas = self.cfg["seeds"], self.cfg["lambdas"]
        # "sbg" starts first: with alignment on, every model waits for its fields after its attack.
        jobs, needs, cost = {"sbg": self.sbg_job}, {}, {"sbg": math.inf}

        def add(model, seed, lam, after):
            """One job per model: train, attack, align (once the SBG fields exist), write its result file."""
            name = f"{model}{f' lambda {lam:g}' if isinstance(lam, float) else ''} seed {seed}"
            if name in jobs:  # vanilla at a sweep seed is a row too
                return name
            value = lambda: self.lam if lam == "selected" else lam  # noqa: E731 - known once "select" ran
            jobs[name], needs[name], cost[name] = (lambda: self.train_and_attack(model, seed, value())), after, COST[model]
            return name
        sweep, pag, sweep_seeds = set(), any(m in PAG_ROWS for m in self.rows), self.cfg["sweep_seeds"]
        for s in seeds:
            for model in [m for m in self.rows if m not in PAG_ROWS]:
                add(model, s, None, set())
        for s in sweep_seeds if pag else []:  # the selection's inputs: vanilla and pag-cm at every lambda
            sweep |= {add("vanilla", s, None, set()), *(add("pag-cm", s, lam, set()) for lam in lambdas)}
        if pag:
            jobs["select"], needs["select"], cost["select"] = self.select, sweep, math.inf  # it gates every later PAG row
            for name in sweep:  # every later PAG row waits for the selection: its inputs go first
                cost[name] += 100
        for s in seeds:
            for model in self.rows:  # at a sweep seed the pag-cm row is the sweep's run at the selected lambda
                if model in PAG_ROWS and not (model == "pag-cm" and s in sweep_seeds):
                    add(model, s, "selected", {"select", "sbg"} if model == "pag-sbg" else {"select"})
        return run_jobs(jobs, needs, self.workers, cost)

    # -- the tables, claims and figures, from the result files alone
    def assemble(self, wall):
        seeds, sweep_seeds, lambdas, cfg = self.cfg["seeds"], self.cfg["sweep_seeds"], self.cfg["lambdas"], self.cfg
        pag = any(m in PAG_ROWS for m in self.rows)
        val = self.select() if pag else {}
        results = {m: [self.read_result(self.key(m, s, self.lam if m in PAG_ROWS else None)) for s in seeds] for m in self.rows}
        sweep = {lam: [self.read_result(self.key("pag-cm", s, lam)) for s in sweep_seeds] for lam in (lambdas if pag else [])}
        rows = {m: row_stats(rs) for m, rs in results.items()}
        lambda_rows = {f"{lam:g}": row_stats(rs) for lam, rs in sweep.items()}
        found = claims(rows)
        points = [r for m in self.rows if m in PAG_ROWS and m != "pag-cm+pgd-at" for r in results[m]]
        swept = [r for lam, rs in sweep.items() if lam != self.lam for r in rs]
        if set(seeds) <= set(sweep_seeds):  # every seed has the sweep: its points join the rows'
            points += swept
            found["3"] = claim_3(points, seeds)
        else:  # the same models at every seed for the verdict; the sweep seeds' fuller correlation beside it
            found["3"] = claim_3(points, seeds, over="the PAG rows")
            found["3"]["with_lambda_sweep"] = claim_3([p for p in points if p["seed"] in sweep_seeds] + swept, sweep_seeds)
            points += swept
        every = {r["key"]: r for rs in (*results.values(), *sweep.values()) for r in rs}  # pag-cm is also a sweep point
        train_minutes = sum(r["train_seconds"] for r in every.values()) / 60
        job_minutes = sum(r["seconds"] for r in every.values()) / 60
        config = {**cfg, "rows": self.rows, "selected_lambda": self.lam,
                  "validation_clean_acc": {str(k): v for k, v in val.items()},
                  "wall_minutes_this_call": round(wall / 60, 1), "models": len(every),
                  "train_minutes_sum": round(train_minutes, 1), "job_minutes_sum": round(job_minutes, 1)}
        config.update(self.config_extras(every))
        seeds_out = {"config": config, "seeds": seeds, "rows": rows, "claims": found}
        name = self.name
        existing = os.path.join(self.results_dir, f"{name}_seeds.json")
        held = set(files.read_json_object(existing, "bench table").get("rows", {})) if os.path.exists(existing) else set()
        self.wrote_tables = held <= set(self.rows)
        if not self.wrote_tables:  # --rows R beside tables of more rows: R's numbers are printed, nothing rewritten
            print(claims_markdown(rows, lambda_rows, found, config, self.reference))
            print(f"left {os.path.relpath(existing)} and the other tables and figures as they were: they hold rows "
                  f"({', '.join(sorted(held - set(self.rows)))}) this call did not run; a call with every row rewrites them")
            return seeds_out
        files.write_json(seeds_out, os.path.join(self.results_dir, f"{name}_seeds.json"))
        files.write_json({"config": config, "seeds": sweep_seeds if pag else [], "rows": lambda_rows},  # the sweep's seeds
                         os.path.join(self.results_dir, f"{name}_lambda.json"))
        md = claims_markdown(rows, lambda_rows, found, config, self.reference)
        files.atomic_write(os.path.join(self.results_dir, f"{name}_seeds.md"), text=md)
        others = [r for m in self.rows if m not in PAG_ROWS or m == "pag-cm+pgd-at" for r in results[m]]
        claims_figures(rows, lambda_rows, points, others, found["3"], config, self.results_dir, list(self.models), PAG_ROWS,
                       name)
        print(md)
        for f in (f"{name}_seeds.json", f"{name}_seeds.md", f"{name}_lambda.json", f"{name}_tradeoff.png",
                  f"{name}_alignment.png"):
            print(f"wrote {os.path.relpath(os.path.join(self.results_dir, f))}")
        return seeds_out

    def config_extras(self, results):
        """What a bench adds to its results' config from its result files (cifar10.py: the data's content hash)."""
        return {}


def parse(argv, description, rows=True):
    """The bench's flags (shared with lambda_per_source.py, which has no --rows) -> (cfg, out_dir, results_dir, args)."""
    p = cli.Parser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()
                                                                                  if k != "sbg") + ", 1 denoiser epoch")
    p.add_argument("--seeds", type=cli.seed, nargs="+", help=f"default: {CONFIG['seeds']} ({QUICK['seeds']} with --quick)")
    p.add_argument("--lambdas", type=cli.loss_weight, nargs="+", help=f"the sweep (default: {CONFIG['lambdas']})")
    p.add_argument("--sweep-seeds", type=cli.seed, nargs="+",
                   help=f"the seeds the sweep runs at and lambda is chosen on (default: {CONFIG['sweep_seeds']}; "
                        f"{QUICK['sweep_seeds']} with --quick; every seed of --seeds when --seeds is given alone): the other "
                        "seeds add models at the lambda chosen there, no re-selection")
    p.add_argument("--epochs", type=cli.positive_int, help=f"default: {CONFIG['epochs']}")
    p.add_argument("--train-samples", type=cli.positive_int, help=f"default: {CONFIG['train_samples']}")
    p.add_argument("--val-samples", type=cli.positive_int, help=f"default: {CONFIG['val_samples']}")
    p.add_argument("--eval-samples", "--n-samples", dest="test_samples", type=cli.positive_int,
                   help=f"test images of the final evaluation (default: {CONFIG['test_samples']})")
    add_bench_flags(p, MODELS if rows else None, "runs/fashion_mnist_bench[_quick]")
    if rows:
        p.add_argument("--standard-check", metavar="ROW", choices=list(MODELS),
                       help="only this: standard AutoAttack beside APGD on ROW's seed-0 checkpoint (trained again if it is "
                            "gone) -> RESULTS/fashion_mnist_standard_aa.json")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps({**CONFIG, **(QUICK if args.quick else {})}))
    for k in ("seeds", "sweep_seeds", "lambdas", "epochs", "train_samples", "val_samples", "test_samples"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if len(set(cfg["seeds"])) != len(cfg["seeds"]) or len(cfg["seeds"]) < 2:
        raise files.UserError(f"--seeds needs at least two distinct seeds (intervals are over seeds), got {cfg['seeds']}")
    if args.seeds is not None and args.sweep_seeds is None:  # seeds of one's own: the sweep runs at each
        cfg["sweep_seeds"] = cfg["seeds"]
    if len(set(cfg["sweep_seeds"])) != len(cfg["sweep_seeds"]) or len(cfg["sweep_seeds"]) < 2 \
            or not set(cfg["sweep_seeds"]) <= set(cfg["seeds"]):
        raise files.UserError(f"--sweep-seeds needs at least two distinct seeds among --seeds {cfg['seeds']}, got "
                          f"{cfg['sweep_seeds']}")
    keys = [f"{lam:g}" for lam in cfg["lambdas"]]  # result files are named by lambda as printed
    if len(set(keys)) != len(keys):
        same = next(k for k in keys if keys.count(k) > 1)
        raise files.UserError(f"--lambdas {' '.join(repr(v) for v, k in zip(cfg['lambdas'], keys) if k == same)} print alike "
                              f"({same}) and would share one result file: give values that differ in their first 6 "
                              "significant digits")
    cfg["lambdas"] = sorted(cfg["lambdas"])
    out_dir = os.path.abspath(args.out_dir or os.path.join("runs", "fashion_mnist_bench" + ("_quick" if args.quick else "")))
    results_dir = os.path.abspath(args.results_dir or (out_dir if args.quick else RESULTS))
    return cfg, out_dir, results_dir, args


def main(argv=None):
    cfg, out_dir, results_dir, args = parse(argv, __doc__)
    rows = set(args.rows) | ({"vanilla", "pag-cm"} if set(args.rows) & set(PAG_ROWS) else set())
    bench = ClaimsBench(cfg, out_dir, results_dir, args.jobs, rows)
    if args.standard_check:  # one model's check; its lambda is the selection's (the sweep's files must be in)
        model, seed = args.standard_check, cfg["seeds"][0]
        if model in PAG_ROWS:
            bench.select()
        return bench.standard_check(model, seed, bench.lam if model in PAG_ROWS else None,
                                    os.path.join(results_dir, "fashion_mnist_standard_aa.json"))
    return bench.assemble(bench.run())


if __name__ == "__main__":
    cli.run_cli(main)
