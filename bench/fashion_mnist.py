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
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402 - the project's parser
import files  # noqa: E402 - the one atomic writer
RESULTS = os.path.join(ROOT, "bench", "results")

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


# ----------------------------------------------------------------------------- statistics (pure Python)
def t_quantile_975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom (table to 30, then Cornish-Fisher)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    if df <= 30:
        return table[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values):
    """{"per_seed", "mean", "ci95"}: the mean and its 95% Student-t interval (None with one value)."""
    n, m = len(values), statistics.fmean(values)
    if n < 2:
        return {"per_seed": values, "mean": m, "ci95": None}
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"per_seed": values, "mean": m, "ci95": [m - half, m + half]}


def wilson_interval(k, n, z=1.959964):
    """The 95% Wilson score interval of a proportion k/n (an accuracy over n test images)."""
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def verdict(ci95):
    """CLAIM_RULE for one comparison: the interval above 0, below 0, or around it."""
    if ci95 is None:
        return "not shown"
    return "holds" if ci95[0] > 0 else "contradicted" if ci95[1] < 0 else "not shown"


def seeds_to_decide(values, most=1000):
    """What would change a verdict: the fewest seeds at which these values' mean and standard deviation would
    give a 95% t interval that excludes 0 (a projection: more seeds move both). None: the mean is 0, there
    are fewer than two values, or it takes more than `most` seeds."""
    if len(values) < 2 or statistics.fmean(values) == 0:
        return None
    m, sd = abs(statistics.fmean(values)), statistics.stdev(values)
    return next((n for n in range(2, most + 1) if t_quantile_975(n - 1) * sd / math.sqrt(n) < m), None)


def paired(a, b, what):
    """a - b paired by seed: mean difference, its 95% t interval, verdict, and the seeds that would decide it."""
    st = mean_interval([x - y for x, y in zip(a, b)])
    return {"comparison": what, "difference": st["mean"], "ci95": st["ci95"], "per_seed": st["per_seed"],
            "verdict": verdict(st["ci95"]), "seeds_to_decide": seeds_to_decide(st["per_seed"])}


def combine(comparisons):
    """A claim made of several comparisons: holds if all hold, contradicted if any is; the headline
    difference is the least favourable comparison's (a contradicted one, else the smallest lower bound)."""
    verdicts = [c["verdict"] for c in comparisons]
    overall = "holds" if all(v == "holds" for v in verdicts) else "contradicted" if "contradicted" in verdicts \
        else "not shown"
    worst = min(comparisons, key=lambda c: (c["verdict"] != "contradicted", c["ci95"][0] if c["ci95"] else -math.inf))
    return {"verdict": overall, "difference": worst["difference"], "ci95": worst["ci95"],
            "headline": worst["comparison"], "comparisons": comparisons}


def pearson(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def correlation_over_seeds(points, seeds):
    """points: [(seed, x, y)]. Pearson r within each seed (over its models), averaged on Fisher's z scale, with
    the 95% Student-t interval over seeds that every other number here gets, back to r. (A bootstrap over 3 seeds
    cannot give a 95% interval: a resample of one seed three times has probability 1/27, so its percentile
    limits are the extreme seeds' r.) r is None where a seed has fewer than 3 points or no spread."""
    per_seed = []
    for s in seeds:
        xy = [(x, y) for t, x, y in points if t == s]
        per_seed.append(pearson(*zip(*xy)) if len(xy) >= 3 else None)
    if any(r is None for r in per_seed):
        return {"r": None, "ci95": None, "per_seed": per_seed}
    z = mean_interval([math.atanh(max(-0.999999, min(0.999999, r))) for r in per_seed])
    return {"r": math.tanh(z["mean"]), "ci95": [math.tanh(v) for v in z["ci95"]] if z["ci95"] else None,
            "per_seed": per_seed}


def select_lambda(val_clean, lambdas, max_drop):
    """SELECTION_RULE: val_clean[name][seed] = validation clean accuracy; names "vanilla" and lambda floats."""
    base = statistics.fmean(val_clean["vanilla"])
    ok = [lam for lam in lambdas if statistics.fmean(val_clean[lam]) >= base - max_drop]
    return max(ok) if ok else min(lambdas)


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


# ----------------------------------------------------------------------------- result files
_acc = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1  # noqa: E731
_cos = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and -1 <= v <= 1  # noqa: E731
_seconds = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0  # noqa: E731
RESULT_FIELDS = {"key": str, "model": str, "settings": dict, "clean": _acc, "aa_l2": _acc, "aa_linf": _acc}
RESULT_OPTIONAL = {"seed": lambda v: isinstance(v, int), "lambda": lambda v: v is None or isinstance(v, (int, float)),
                   "align_nn": _cos, "align_sbg": _cos, "val_acc": _acc, "val_pgd_l2_acc": _acc, "test_acc": _acc,
                   "test_pgd_l2_acc": _acc, "train_seconds": _seconds, "seconds": _seconds}
CLAIMS_RESULT_FIELDS = {**RESULT_FIELDS, **{k: RESULT_OPTIONAL[k] for k in (
    "seed", "lambda", "align_nn", "align_sbg", "val_acc", "val_pgd_l2_acc", "train_seconds", "seconds")}}


def check_result(obj, path, required=RESULT_FIELDS):
    """One result file as the runner writes it: the `required` keys with their types, every other known
    key's type, accuracies in [0, 1], cosines in [-1, 1], and robust accuracy never above clean (a point
    is robust only if classified right clean, on the same images); else one UserError naming the file
    and the key. Returns obj."""
    files.require(obj, required, path, "bench result file")
    files.require(obj, {k: check for k, check in RESULT_OPTIONAL.items() if k in obj}, path, "bench result file")
    if not isinstance(obj["settings"].get("attack"), dict):
        raise D.UserError(f"{path}: its settings name no attack; it is not a bench result file")
    for m in ("aa_l2", "aa_linf"):
        if obj[m] > obj["clean"]:
            raise D.UserError(f"{path}: {m} {obj[m]} is above its clean accuracy {obj['clean']}, which no attack can "
                              "give; repair or delete the file")
    return obj


def fields_provenance(path, sha256=None):
    """What an SBG fields file is (recorded per SBG row): an `sbg.py export` (its denoiser's hash, timestep
    and noise draws) or the official release's tensor, and the file's own content hash (given, if known)."""
    obj = files.load_file(path, "sbg fields file", mmap=True)  # a glance: the tensors stay on disk
    if isinstance(obj, dict) and obj.get("kind") == "sbg-fields":
        out = {"made_by": "sbg.py export", "denoiser_sha256": obj.get("denoiser_sha256"),
               "timestep": obj.get("timestep"), "noise_draws": obj.get("noise_draws")}
    else:
        out = {"made_by": "the official release"}
    return {**out, "sha256": sha256 or files.file_sha256(path)}


# ----------------------------------------------------------------------------- running jobs
def sh(log, *cmd):
    """Run one of our scripts as a one-thread process, its output appended to `log`; fail loudly."""
    cmd = [sys.executable, *map(str, cmd)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise D.UserError(f"failed: {' '.join(cmd[1:])} (log: {log})")


def run_jobs(jobs, needs, workers, cost=None):
    """Run the callables in `jobs` (name -> fn) on `workers` threads, each once every job it needs is
    done, the costliest ready job first."""
    cost = cost or {}
    pending, running, done, start = list(jobs), {}, set(), time.time()
    stamp = lambda: f"[{(time.time() - start) / 60:5.1f} min]"  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:
        while pending or running:
            ready = sorted((n for n in pending if needs.get(n, set()) <= done), key=lambda n: -cost.get(n, 0))
            for name in ready[: workers - len(running)]:
                pending.remove(name)
                print(f"{stamp()} start {name}", flush=True)
                running[pool.submit(jobs[name])] = name
            if not running:
                raise D.UserError(f"jobs wait on each other: {sorted(pending)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed job stops the benchmark (running jobs finish first)
                done.add(name)
                print(f"{stamp()} done  {name} ({len(done)}/{len(jobs)} jobs)", flush=True)
    return time.time() - start


def recorded_settings(path):
    """What a settings file beside a run folder, the denoiser or the fields records (None: no file)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


class Bench:
    """One bench run: its settings, folders, and the jobs that fill RESULTS/<name>_runs/: train every
    (row, lambda, seed) with the ordinary scripts, attack it with attack.py, keep one result file each.
    The scale lives in cfg and in the few members a thin entry may override (bench/paper_table.py):
    models, name, align (held-out alignment in every job), common_flags, attack_command, measures."""
    models = MODELS
    name = "fashion_mnist"
    align = True
    result_fields = CLAIMS_RESULT_FIELDS  # what a result file must hold for assemble()

    def __init__(self, cfg, out_dir, results_dir, workers, rows=None):
        self.cfg, self.out_dir, self.results_dir, self.workers = cfg, out_dir, results_dir, workers
        self.rows = [m for m in self.models if rows is None or m in rows]
        self.runs_dir = os.path.join(results_dir, f"{self.name}_runs")
        # The denoiser is a fixed source of ground truth like the data: it lives beside the result files
        # (committed, 3.5 MB), so a bench continued on a fresh machine exports the same fields from it.
        self.denoiser_dir = os.path.join(results_dir, f"{self.name}_sbg")
        self.sbg_dir = os.path.join(out_dir, "sbg")  # the fields (hundreds of MB), remade from the denoiser
        self.fields = {s: os.path.join(self.sbg_dir, f"fields_{s}.pt") for s in ("train", "test")}
        self.lam = None  # the selected lambda, once the sweep is in
        self.sbg_done = threading.Event()  # set when the "sbg" job has ended (made the fields, or failed)
        self.sbg_made = False
        self.sha256_of_fields = {}  # split -> content hash, read once (fields_sha256)
        self.data_flags, self.common = self.common_flags(cfg)

    def common_flags(self, cfg):
        """(the data flags sbg.py shares, every training command's flags)."""
        data = ["--dataset", cfg["dataset"], "--train-samples", cfg["train_samples"], "--val-samples", cfg["val_samples"]]
        return data, [*data, "--arch", cfg["arch"], "--optimizer", cfg["optimizer"], "--lr", cfg["lr"], "--lr-drops=",
                      "--no-augment", "--batch-size", cfg["batch_size"], "--epochs", cfg["epochs"],
                      "--eval-samples", cfg["val_samples"], "--log-every", 100]

    def attack_command(self, ckpt, seed, out):
        """The final evaluation on the test images: clean, AutoAttack L2 and L-inf, NN alignment."""
        return ["attack.py", "--checkpoint", ckpt, "--attacks", "clean", "aa-l2", "aa-linf", "align", "--aa-version",
                self.cfg["aa_version"], "--eps-l2", self.cfg["eps_l2"], "--eps-linf", self.cfg["eps_linf"],
                "--n-samples", self.cfg["test_samples"], "--align-source", "nn", "--seed", seed, "--out", out]

    def measures(self, res):
        """The numbers a result file keeps from attack.py's results."""
        eps_l2, eps_linf = f"{self.cfg['eps_l2']:g}", f"{self.cfg['eps_linf']:g}"
        out = {"clean": res["clean"]["acc"], "aa_l2": res["aa_l2"][eps_l2]["acc"], "aa_linf": res["aa_linf"][eps_linf]["acc"]}
        if self.align:
            out.update(align_nn=res["align"]["nn test"]["cos"], align_sbg=None)
        return out

    # -- one result file per (model, lambda, seed)
    def key(self, model, seed, lam=None):
        return f"{model}_seed{seed}" if lam is None else f"{model}_lambda{lam:g}_seed{seed}"

    def result_path(self, key):
        return os.path.join(self.runs_dir, key + ".json")

    def read_result(self, key):
        """A result file, checked (check_result), or None where there is none yet."""
        path = self.result_path(key)
        if not os.path.lexists(path):
            return None
        return check_result(files.read_json_object(path, "result file"), path, self.result_fields)

    def result_extras(self, model):
        """What a result file records besides its numbers (a thin entry adds its own): which SBG fields, by
        content, the model was trained on (SBG rows) and aligned with (every model: the test fields)."""
        splits = (["train"] if "sbg" in self.models[model][1] else []) + (["test"] if self.align else [])
        fields = {s: fields_provenance(self.fields[s], self.fields_sha256(s)) for s in splits}
        return {"sbg_fields": fields} if fields else {}

    def fields_sha256(self, split):
        """The content hash of the SBG fields of a split, read once per bench (fields files are gigabytes at
        CIFAR scale; they do not change while it runs)."""
        if split not in self.sha256_of_fields:
            self.sha256_of_fields[split] = files.file_sha256(self.fields[split])
        return self.sha256_of_fields[split]

    def command(self, model, seed, lam):
        script, extra = self.models[model]
        if "sbg" in extra:  # --source sbg
            extra = [*extra, "--sbg-file", self.fields["train"]]
        pag = ["--pag-coeff", lam] if lam is not None else []
        return [script, *self.common, *extra, *pag, "--seed", seed]

    def settings(self, model, seed, lam):
        """What a result file must have been made with to be reused (paths are not settings)."""
        cmd = " ".join(map(str, self.command(model, seed, lam))).replace(self.fields["train"], "SBG_TRAIN_FIELDS")
        return {"train": cmd, "attack": {k: self.cfg[k] for k in ("test_samples", "aa_version", "eps_l2", "eps_linf")},
                "sbg": self.cfg["sbg"]}

    def run_dir(self, key):
        return os.path.join(self.out_dir, key)

    def train_and_attack(self, model, seed, lam=None):
        """Train (or resume), attack, align, and write the result file with every number of the model;
        skipped if the file is there, refused if it (or the run folder) was made with other settings."""
        key, want = self.key(model, seed, lam), self.settings(model, seed, lam)
        old = self.read_result(key)
        if old is not None:
            if old.get("settings") != want:
                raise D.UserError(f"{self.result_path(key)} was made with other settings; delete it (and "
                                  f"{self.run_dir(key)}) or pass another --results-dir and --out-dir")
            if not self.align or old.get("align_sbg") is not None:
                return
            # else: an earlier bench's file without its SBG alignment: made again (resumed where it can be)
        run_dir = self.run_dir(key)
        ckpt, log = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "run.log")
        metrics_path, run_settings = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "bench_settings.json")
        # The run folder is named without its settings: it says what it was made with, or it is not reused.
        made_with = recorded_settings(run_settings)
        if made_with != json.loads(json.dumps(want)) and (made_with is not None or os.path.exists(ckpt)):
            raise D.UserError(f"{run_dir} was made with other settings{'' if made_with else ' (or by an older bench)'}; "
                              "delete it or pass another --out-dir")
        if made_with is None:
            files.write_json(want, run_settings)
        epoch = lambda: files.load_file(ckpt, "checkpoint")["epoch"] if os.path.exists(ckpt) else 0  # noqa: E731
        if epoch() < self.cfg.get("epochs", math.inf):  # the checkpoint's epoch, not metrics.jsonl's lines
            sh(log, *self.command(model, seed, lam), "--out-dir", run_dir, *(["--resume"] if os.path.exists(ckpt) else []))
        done = epoch()
        by_epoch = {m["epoch"]: m for m in map(json.loads, open(metrics_path).read().splitlines()) if m["epoch"] <= done}
        last = by_epoch[done]
        train_seconds = sum(m["seconds"] for m in by_epoch.values())  # the run's own epochs, over every resume
        start = time.time()
        res_path = os.path.join(run_dir, "attack_test.json")
        sh(log, *self.attack_command(ckpt, seed, res_path))
        measured = self.measures(json.load(open(res_path)))
        if self.align:  # the held-out SBG alignment, so that a result file is complete when it lands
            self.sbg_done.wait()
            if not self.sbg_made:
                raise D.UserError(f"the SBG fields were not made ({self.fields['test']}): the sbg job failed (its error "
                                  "is printed above this one)")
            align_path = os.path.join(run_dir, "align_sbg_test.json")
            sh(log, "attack.py", "--checkpoint", ckpt, "--attacks", "align", "--align-source", "sbg", "--sbg-file",
               self.fields["test"], "--align-split", "test", "--n-samples", self.cfg["test_samples"], "--seed", seed,
               "--out", align_path)
            measured["align_sbg"] = json.load(open(align_path))["align"]["sbg test"]["cos"]
        split = last["eval_split"]  # the per-epoch check's images: "val" (choices look there) or "test"
        pgd = next(k for k in last if k.startswith(f"{split}_pgd_l2_"))
        result = {"key": key, "model": model, "seed": seed, "lambda": lam, **self.result_extras(model), "settings": want,
                  f"{split}_acc": last[f"{split}_acc"], f"{split}_pgd_l2_acc": last[pgd], **measured,
                  "train_seconds": round(train_seconds, 1), "seconds": round(train_seconds + time.time() - start, 1),
                  "commit": git_commit(), "made": time.strftime("%Y-%m-%d %H:%M:%S")}
        files.write_json(result, self.result_path(key))
        print(f"  {key}: clean {result['clean']:.1%}, AA L2 {result['aa_l2']:.1%}, L-inf {result['aa_linf']:.1%}"
              + (f", align NN {result['align_nn']:.3f} SBG {result['align_sbg']:.3f}" if self.align else "")
              + f" -> {os.path.relpath(self.result_path(key))}", flush=True)

    def make_sbg(self):
        """The denoiser (trained once, seed 0, kept in RESULTS/<name>_sbg/) and its fields for the training
        images and the test images (in --out-dir, refused once the denoiser file changes)."""
        s = self.cfg["sbg"]
        want = json.loads(json.dumps({**s, "data": self.data_flags}))  # as it reads back
        ckpt, log = os.path.join(self.denoiser_dir, "denoiser.pt"), os.path.join(self.sbg_dir, "sbg.log")
        denoiser_settings = os.path.join(self.denoiser_dir, "settings.json")
        if os.path.exists(ckpt):
            made_with = recorded_settings(denoiser_settings)
            if made_with != want:
                raise D.UserError(f"{ckpt} was made with other settings ({made_with}); delete {self.denoiser_dir} "
                                  "or pass another --results-dir")
        else:
            files.write_json(want, denoiser_settings)
        if not os.path.exists(ckpt) or files.load_file(ckpt, "denoiser checkpoint")["epoch"] < s["epochs"]:
            sh(log, "sbg.py", "train", *self.data_flags, "--epochs", s["epochs"], "--seed", s["seed"],
               "--out-dir", self.denoiser_dir, *(["--resume"] if os.path.exists(ckpt) else []))
        want_fields = {**want, "test_samples": self.cfg["test_samples"], "denoiser_sha256": files.file_sha256(ckpt)}
        settings_file = os.path.join(self.sbg_dir, "settings.json")
        if all(os.path.exists(p) for p in self.fields.values()):
            made_with = recorded_settings(settings_file)
            if made_with != want_fields:
                raise D.UserError(f"{self.sbg_dir} holds fields made with other settings or another denoiser "
                                  f"({made_with}); delete it or pass another --out-dir")
            return
        for split in ("test", "train"):
            sh(log, "sbg.py", "export", *self.data_flags, "--checkpoint", ckpt, "--timestep", s["timestep"],
               "--noise-draws", s["noise_draws"], "--split", split, "--eval-samples", self.cfg["test_samples"],
               "--seed", s["seed"], "--out", self.fields[split])
        files.write_json(want_fields, settings_file)

    def sbg_job(self):
        try:
            self.make_sbg()
            self.sbg_made = True
        finally:  # jobs waiting for the fields go on (and fail in one line if they are missing)
            self.sbg_done.set()

    def select(self):
        """SELECTION_RULE on the validation accuracies of vanilla and the sweep (every sweep seed)."""
        seeds, lambdas = self.cfg["sweep_seeds"], self.cfg["lambdas"]
        val = {"vanilla": [self.read_result(self.key("vanilla", s))["val_acc"] for s in seeds]}
        for lam in lambdas:
            val[lam] = [self.read_result(self.key("pag-cm", s, lam))["val_acc"] for s in seeds]
        self.lam = select_lambda(val, lambdas, self.cfg["selection_max_drop"])
        print(f"selected lambda {self.lam:g} (validation clean: vanilla {statistics.fmean(val['vanilla']):.1%}, "
              + ", ".join(f"{lam:g}: {statistics.fmean(val[lam]):.1%}" for lam in lambdas) + ")", flush=True)
        return val

    def run(self):
        """Every job, the SBG fields first where a row or the alignment needs them; returns the wall seconds."""
        seeds, lambdas = self.cfg["seeds"], self.cfg.get("lambdas")
        # "sbg" starts first: with alignment on, every model waits for its fields after its attack.
        jobs, needs, cost = {"sbg": self.sbg_job}, {}, {"sbg": math.inf}

        def add(model, seed, lam, after):
            """One job per model: train, attack, align (once the SBG fields exist), write its result file."""
            name = f"{model}{f' lambda {lam:g}' if isinstance(lam, float) else ''} seed {seed}"
            if name in jobs:  # vanilla at a sweep seed is a row too
                return name
            value = lambda: self.lam if lam == "selected" else lam  # noqa: E731 - known once "select" ran
            jobs[name], needs[name], cost[name] = (lambda: self.train_and_attack(model, seed, value())), after, COST.get(model, 10)
            return name
        if not lambdas:  # no sweep: every row at its scripts' defaults (lambda included)
            for s in seeds:
                for model in self.rows:
                    add(model, s, None, {"sbg"} if "sbg" in self.models[model][1] else set())
            return run_jobs(jobs, needs, self.workers, cost)
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
        stat = lambda rs: {k: mean_interval([r[k] for r in rs]) for k in (*METRICS, "val_acc", "val_pgd_l2_acc")}  # noqa: E731
        rows = {m: stat(rs) for m, rs in results.items()}
        lambda_rows = {f"{lam:g}": stat(rs) for lam, rs in sweep.items()}
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
        seeds_out = {"config": config, "seeds": seeds, "rows": rows, "claims": found}
        files.write_json(seeds_out, os.path.join(self.results_dir, "fashion_mnist_seeds.json"))
        files.write_json({"config": config, "seeds": seeds, "rows": lambda_rows},
                     os.path.join(self.results_dir, "fashion_mnist_lambda.json"))
        md = markdown(rows, lambda_rows, found, config)
        files.atomic_write(os.path.join(self.results_dir, "fashion_mnist_seeds.md"), text=md)
        others = [r for m in self.rows if m not in PAG_ROWS or m == "pag-cm+pgd-at" for r in results[m]]
        figures(rows, lambda_rows, points, others, found["3"], config, self.results_dir)
        print(md)
        for f in ("fashion_mnist_seeds.json", "fashion_mnist_seeds.md", "fashion_mnist_lambda.json",
                  "fashion_mnist_tradeoff.png", "fashion_mnist_alignment.png"):
            print(f"wrote {os.path.relpath(os.path.join(self.results_dir, f))}")
        return seeds_out


# ----------------------------------------------------------------------------- reports
def fmt(st, pct=True):
    """mean [lo, hi] of a metric entry."""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(st['mean'])} [{f(st['ci95'][0])}, {f(st['ci95'][1])}]" if st["ci95"] else f(st["mean"])


def markdown(rows, lambda_rows, found, config):
    n = len(config["seeds"])
    sweep_seeds = ", ".join(map(str, config["sweep_seeds"]))
    lines = [f"Fashion-MNIST, cnn, {config['train_samples']} training images, {config['epochs']} epochs, {n} seeds "
             f"({', '.join(map(str, config['seeds']))}); "
             + ("no PAG row" if config["selected_lambda"] is None else f"lambda {config['selected_lambda']:g} chosen on the "
                                                                       f"validation split of seeds {sweep_seeds}")
             + f"; {config['test_samples']} test images. Mean [95% t interval over seeds], accuracies in %.", "",
             f"| model | clean | {config['attack']} L2 {config['eps_l2']:g} | L∞ {config['eps_linf']:g} | "
             "align NN (test) | align SBG (test) |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {fmt(r['clean'])} | {fmt(r['aa_l2'])} | {fmt(r['aa_linf'])} | "
                     f"{fmt(r['align_nn'], False)} | {fmt(r['align_sbg'], False)} |")
    lines += ["", f"λ sweep (PAG-CM, seeds {sweep_seeds}):", "", "| λ | validation clean | clean | AA L2 | AA L∞ | align SBG (test) |",
              "|---|---|---|---|---|---|"]
    for lam, r in lambda_rows.items():
        lines.append(f"| {lam} | {fmt(r['val_acc'])} | {fmt(r['clean'])} | {fmt(r['aa_l2'])} | {fmt(r['aa_linf'])} | "
                     f"{fmt(r['align_sbg'], False)} |")
    lines += ["", f"Claims ({config['claim_rule']}):", "", "| claim | verdict | headline | difference [95% interval] |",
              "|---|---|---|---|"]
    for k in ("1", "2", "3", "4"):
        c = found[k]
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else "n/a"
        value = f"{c['difference']:+.3f} {ci}" if c["difference"] is not None else "n/a"
        lines.append(f"| {k}: {c['claim']} | **{c['verdict']}** | {c.get('headline', 'Pearson r' if k == '3' else '')} | {value} |")
    lines += ["", "Every comparison (claims 1, 2, 4: a − b in points, paired by seed; claim 3: within-seed Pearson r, "
              "its interval on Fisher's z scale; *seeds to decide*: the fewest seeds at which this mean difference and "
              "spread would give an interval that excludes 0, a projection, not a promise):", "",
              "| claim | comparison | per seed | difference [95% interval] | verdict | seeds to decide |",
              "|---|---|---|---|---|---|"]

    def row(k, c, scale, f, n):
        num = lambda v: "n/a" if v is None else f"{scale * v:+.{f}f}"  # noqa: E731
        ci = f"[{num(c['ci95'][0])}, {num(c['ci95'][1])}]" if c["ci95"] else "n/a"
        return (f"| {k} | {c['comparison']} | {', '.join(num(v) for v in c['per_seed'])} | {num(c['difference'])} {ci} | "
                f"{c['verdict']} | {n} |")
    for k in ("1", "2", "3", "4"):
        for c in found[k].get("comparisons", []):
            if k == "3":
                lines.append(row(k, c, 1, 2, "—"))
                continue
            n = c["seeds_to_decide"]
            lines.append(row(k, c, 100, 1, n if n is not None else "> 1000" if c["difference"] else "never"))
    for c in found["3"].get("with_own_rows", {}).values():
        lines.append(row("3 (not in the verdict)", c, 1, 2, "—"))
    fuller = found["3"].get("with_lambda_sweep")  # the sweep seeds only, their sweep's models in
    for c in [*fuller.get("comparisons", []), *fuller.get("with_own_rows", {}).values()] if fuller else []:
        lines.append(row(f"3 (seeds {sweep_seeds} with the λ sweep, not in the verdict)", c, 1, 2, "—"))
    return "\n".join(lines) + "\n"


def figures(rows, lambda_rows, points, others, claim3, config, out_dir):
    """The trade-off (every row, mean and interval; the sweep as a line) and alignment vs robustness (claim 3's
    points, and the models outside it drawn hollow for comparison). One colour per model in both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(MODELS)}
    attack = f"{config['attack'].split(' (')[0]} L2 ε={config['eps_l2']:g}"
    lam_sel = config["selected_lambda"]

    def err(st):
        m = st["mean"] * 100
        return m, ([[m - st["ci95"][0] * 100], [st["ci95"][1] * 100 - m]] if st["ci95"] else None)
    fig, ax = plt.subplots(figsize=(8, 5.8))
    for m, r in rows.items():
        (x, xe), (y, ye) = err(r["clean"]), err(r["aa_l2"])
        label = f"{m} (λ={lam_sel:g}, from the PAG-CM sweep)" if m in PAG_ROWS else m
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, color=colour[m], label=label)
    sweep = [(float(lam), err(r["clean"])[0], err(r["aa_l2"])[0]) for lam, r in lambda_rows.items()]
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "k--", lw=1,
            label=f"PAG-CM λ sweep (means only, seeds {', '.join(map(str, config['sweep_seeds']))})")
    for lam, x, y in sweep:
        if lam != lam_sel:  # the selected point is the pag-cm row's marker
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set(xlabel=f"clean accuracy (%), {config['test_samples']} test images",
           ylabel=f"robust accuracy (%), {attack}",
           title=f"Fashion-MNIST cnn: clean vs robust, mean and 95% interval over {len(config['seeds'])} seeds\n"
                 "(unpaired bars: paired differences are in fashion_mnist_seeds.md)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, "fashion_mnist_tradeoff.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    lam_markers = iter("v^sPX")
    marker = {lam: "o" if lam == lam_sel else next(lam_markers) for lam in sorted({p["lambda"] for p in points})}
    for m, lam in sorted({(p["model"], p["lambda"]) for p in points}, key=str):
        pts = [p for p in points if p["model"] == m and p["lambda"] == lam]
        ax.scatter([p["align_sbg"] for p in pts], [100 * p["aa_l2"] for p in pts], color=colour[m], marker=marker[lam],
                   label=f"{m} λ={lam:g}" + (" (trained on these fields' denoiser)" if m == "pag-sbg" else ""))
    for j, m in enumerate(sorted({p["model"] for p in others})):  # outside the correlation
        pts = [p for p in others if p["model"] == m]
        ax.scatter([p["align_sbg"] for p in pts], [100 * p["aa_l2"] for p in pts], marker="os^Dv"[j % 5],
                   facecolors="none", edgecolors=colour[m], label=f"{m} (not in r)")
    without = next((c for c in claim3.get("comparisons", []) if c["measure"] == "align_sbg"), None)
    show = lambda c: "n/a" if c is None or c["difference"] is None else (  # noqa: E731
        f"{c['difference']:.2f}" + (f" [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if c["ci95"] else ""))
    ax.set(xlabel="held-out alignment: mean cos to SBG fields of the test images",
           ylabel=f"robust accuracy (%), {attack}",
           title="alignment vs robustness, one point per model and seed; within-seed r, mean [95% interval]:\n"
                 f"PAG models {show(claim3.get('with_own_rows', {}).get('align_sbg'))}, without pag-sbg {show(without)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files.save_figure(fig, os.path.join(out_dir, "fashion_mnist_alignment.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = D.Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()
                                                                                  if k != "sbg") + ", 1 denoiser epoch")
    p.add_argument("--seeds", type=D.seed, nargs="+", help=f"default: {CONFIG['seeds']} ({QUICK['seeds']} with --quick)")
    p.add_argument("--lambdas", type=D.loss_weight, nargs="+", help=f"the sweep (default: {CONFIG['lambdas']})")
    p.add_argument("--sweep-seeds", type=D.seed, nargs="+",
                   help=f"the seeds the sweep runs at and lambda is chosen on (default: {CONFIG['sweep_seeds']}; "
                        f"{QUICK['sweep_seeds']} with --quick; every seed of --seeds when --seeds is given alone): the other "
                        "seeds add models at the lambda chosen there, no re-selection")
    p.add_argument("--epochs", type=D.positive_int, help=f"default: {CONFIG['epochs']}")
    p.add_argument("--train-samples", type=D.positive_int, help=f"default: {CONFIG['train_samples']}")
    p.add_argument("--val-samples", type=D.positive_int, help=f"default: {CONFIG['val_samples']}")
    p.add_argument("--eval-samples", "--n-samples", dest="test_samples", type=D.positive_int,
                   help=f"test images of the final evaluation (default: {CONFIG['test_samples']})")
    p.add_argument("--rows", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="models to run (PAG rows bring vanilla and the lambda sweep: the selection needs them)")
    p.add_argument("--jobs", type=D.positive_int, default=2, help="processes at a time, one thread each")
    p.add_argument("--out-dir", help="checkpoints and logs (default: runs/fashion_mnist_bench[_quick])")
    p.add_argument("--results-dir", help="result files, tables and figures (default: bench/results; with --quick: "
                                         "the --out-dir)")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps({**CONFIG, **(QUICK if args.quick else {})}))
    for k in ("seeds", "sweep_seeds", "lambdas", "epochs", "train_samples", "val_samples", "test_samples"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if len(set(cfg["seeds"])) != len(cfg["seeds"]) or len(cfg["seeds"]) < 2:
        raise D.UserError(f"--seeds needs at least two distinct seeds (intervals are over seeds), got {cfg['seeds']}")
    if args.seeds is not None and args.sweep_seeds is None:  # seeds of one's own: the sweep runs at each
        cfg["sweep_seeds"] = cfg["seeds"]
    if len(set(cfg["sweep_seeds"])) != len(cfg["sweep_seeds"]) or len(cfg["sweep_seeds"]) < 2 \
            or not set(cfg["sweep_seeds"]) <= set(cfg["seeds"]):
        raise D.UserError(f"--sweep-seeds needs at least two distinct seeds among --seeds {cfg['seeds']}, got "
                          f"{cfg['sweep_seeds']}")
    if len(set(cfg["lambdas"])) != len(cfg["lambdas"]):
        raise D.UserError(f"--lambdas has a value twice: {cfg['lambdas']}")
    cfg["lambdas"] = sorted(cfg["lambdas"])
    out_dir = os.path.abspath(args.out_dir or os.path.join("runs", "fashion_mnist_bench" + ("_quick" if args.quick else "")))
    results_dir = os.path.abspath(args.results_dir or (out_dir if args.quick else RESULTS))
    rows = set(args.rows) | ({"vanilla", "pag-cm"} if set(args.rows) & set(PAG_ROWS) else set())
    bench = Bench(cfg, out_dir, results_dir, args.jobs, rows)
    return bench.assemble(bench.run())


if __name__ == "__main__":
    D.run_cli(main)
