"""The paper's Table 1 in one command: train its rows with the paper's defaults (or take the authors'
released checkpoints), evaluate each with standard AutoAttack, and put every number beside the paper's.

    python bench/paper_table.py --dataset cifar10 --sbg-file c10_sbg.pt          # train all six rows (GPU)
    python bench/paper_table.py --rows pag-cm pag-nn                              # some rows (one job each on a cluster)
    python bench/paper_table.py --official-checkpoints DIR                        # the five released files
    python bench/paper_table.py --official pag-sbg=rn18_sbg.pt pag-sbg-vit=vit_sbg.pt
    python bench/paper_table.py --quick                                           # CPU smoke run, synthetic data

Rows: vanilla, PAG-OI, -CM, -NN, -SBG (ResNet-18) and PAG-SBG with the ViT, each trained by the ordinary
scripts with nothing but --dataset, --source (and --arch vit, --sbg-file, --seed 3407, the official
configs' seed): 100 epochs, SGD 0.01, the official schedule and lambda. The SBG rows need --sbg-file:
the official release's fields (its README, "Preparing Perceptually Aligned Gradients Data") or
`sbg.py export`'s. Each model is evaluated on the first --eval-samples test images (default 1,000;
10,000 for the full set) with standard AutoAttack, L2 eps 0.5 and L-inf eps 8/255.

It runs on the claims runner (bench/fashion_mnist.py's Bench): one result file per row in
OUT_DIR/paper_table_<dataset>_runs/, so a killed run, or rows run as separate jobs, continue from what
has finished, and a later call assembles whatever is there into OUT_DIR/paper_table_<dataset>.json
and .md (every measured number beside the paper's, from PAPER_TABLE_1 below, and the difference).
"""
import glob
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import fashion_mnist as claims  # noqa: E402 - the claims runner: one runner that knows scales
from fashion_mnist import D, ROOT, files, run_jobs, sh  # noqa: E402

# The paper's Table 1 (CIFAR-10, ResNet-18; AutoAttack robust accuracy in %, L2 eps 0.5 / L-inf eps 8/255), as
# ../shared/PAPER.md section 4 recovers it from the paper's figures; clean accuracies and the ViT row were
# not recovered (None).
PAPER_TABLE_1 = {
    "source": "Ganz, Kawar & Elad, ICML 2023, Table 1 / figures (CIFAR-10, ResNet-18), via PAPER.md section 4",
    "cifar10": {"vanilla": (0.00, 0.00), "pag-oi": (46.63, 13.50), "pag-cm": (47.25, 11.24), "pag-nn": (42.12, 7.51),
                "pag-sbg": (55.39, 23.97), "pag-sbg-vit": (None, None)},
}
ROWS = {  # row -> (script, flags): the paper's defaults, nothing else
    "vanilla": ("train_baseline.py", []),
    "pag-oi": ("train_pag.py", ["--source", "oi"]),
    "pag-cm": ("train_pag.py", ["--source", "cm"]),
    "pag-nn": ("train_pag.py", ["--source", "nn"]),
    "pag-sbg": ("train_pag.py", ["--source", "sbg"]),
    "pag-sbg-vit": ("train_pag.py", ["--source", "sbg", "--arch", "vit"]),
}
# File names for --official-checkpoints DIR. The release's README links five Drive files without naming
# them; these follow the one name seen in public use (a fork loads "rn18-c10-SBG.pt"). Other names:
# --official ROW=PATH.
OFFICIAL_FILES = {"pag-oi": "rn18-c10-OI.pt", "pag-cm": "rn18-c10-CM.pt", "pag-nn": "rn18-c10-NN.pt",
                  "pag-sbg": "rn18-c10-SBG.pt", "pag-sbg-vit": "vit-c10-SBG.pt"}
CONFIG = dict(seeds=[3407], test_samples=1000, aa_version="standard", eps_l2=0.5, eps_linf=8 / 255, aa_iterations=None,
              data_flags=[], train_flags=[], sbg=None)
QUICK = dict(dataset="synthetic", test_samples=16, aa_iterations=3, data_flags=["--image-size", "32", "--train-samples", "48"],
             train_flags=["--batch-size", "16", "--epochs", "1", "--eval-steps", "1"],
             sbg=dict(epochs=1, seed=0, timestep=300, noise_draws=1))
QUICK_ARCH = "cnn"  # --quick trains the ResNet rows as the small cnn (the ViT row stays a ViT)


class PaperTable(claims.Bench):
    """The claims runner at the paper's scale: no sweep, no validation split, no alignment."""
    models = ROWS
    align = False

    def __init__(self, cfg, out_dir, workers, rows, official):
        """Results (tables, one file per row) in out_dir; checkpoints and logs in out_dir/paper_table_<dataset>/."""
        self.name = f"paper_table_{cfg['dataset']}"
        if cfg["quick"]:
            self.models = {m: (s, f if "vit" in f else [*f, "--arch", QUICK_ARCH]) for m, (s, f) in ROWS.items()}
        super().__init__(cfg, os.path.join(out_dir, self.name), out_dir, workers, rows)
        self.official = official
        self.sbg_file_hash = None
        if cfg["sbg_file"]:
            self.fields["train"] = os.path.abspath(cfg["sbg_file"])

    def settings(self, model, seed, lam):
        """As the claims runner's, and for the SBG rows the given fields' content (its path is not a setting:
        other fields under the same name are other settings)."""
        out = super().settings(model, seed, lam)
        if self.cfg["sbg_file"] and "sbg" in self.models[model][1]:
            if self.sbg_file_hash is None:
                files.regular_file(self.fields["train"], "--sbg-file")
                self.sbg_file_hash = claims.file_sha256(self.fields["train"])
            out["sbg_file_sha256"] = self.sbg_file_hash
        return out

    def common_flags(self, cfg):
        data = ["--dataset", cfg["dataset"], *cfg["data_flags"]]
        return data, [*data, *cfg["train_flags"], "--eval-samples", cfg["test_samples"], "--log-every", 100]

    def attack_command(self, ckpt, seed, out, dataset=None):
        cmd = ["attack.py", "--checkpoint", ckpt, "--attacks", "clean", "aa-l2", "aa-linf", "--aa-version",
               self.cfg["aa_version"], "--eps-l2", self.cfg["eps_l2"], "--eps-linf", self.cfg["eps_linf"],
               "--eval-samples", self.cfg["test_samples"], "--seed", seed, "--out", out]
        if self.cfg["aa_iterations"]:
            cmd += ["--aa-iterations", self.cfg["aa_iterations"]]
        return cmd + (["--dataset", dataset] if dataset else [])

    def make_sbg(self):
        if self.cfg["sbg_file"]:  # given: the release's fields or sbg.py export's (checked by train_pag.py)
            files.regular_file(self.fields["train"], "--sbg-file")
        elif self.cfg["sbg"]:  # --quick: a tiny denoiser of its own
            super().make_sbg()

    def evaluate_official(self, row, path):
        """One released file, attacked as it is (no training): its result file."""
        key = f"{row}_official"
        want = {"official": os.path.abspath(path), "attack": self.settings(row, 0, None)["attack"]}
        old = self.read_result(key)
        if old is not None and old.get("settings") == want:
            return
        out = os.path.join(self.out_dir, key, "attack.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        sh(os.path.join(os.path.dirname(out), "run.log"),
           *self.attack_command(os.path.abspath(path), 0, out, dataset=self.cfg["dataset"]))
        files.write_json({"key": key, "model": row, "weights": "official", "file": os.path.abspath(path), "settings": want,
                          **self.measures(json.load(open(out)))}, self.result_path(key))

    def run(self):
        if not self.official:
            return super().run()
        return run_jobs({row: (lambda r=row, p=path: self.evaluate_official(r, p)) for row, path in self.official.items()},
                        {}, self.workers)

    def table(self, wall):
        """paper_table_<dataset>.json and .md from the result files that exist (a later call adds the rest)."""
        paper = PAPER_TABLE_1.get(self.cfg["dataset"], {})
        rows = {}
        for row in self.rows:
            key = f"{row}_official" if self.official else self.key(row, self.cfg["seeds"][0])
            r = self.read_result(key)
            if r is None:
                continue
            paper_l2, paper_linf = paper.get(row, (None, None))
            rows[row] = {"clean": r["clean"], "aa_l2": r["aa_l2"], "aa_linf": r["aa_linf"],
                         "paper_aa_l2": None if paper_l2 is None else paper_l2 / 100,
                         "paper_aa_linf": None if paper_linf is None else paper_linf / 100,
                         "weights": "official" if self.official else "trained",
                         "command": r["settings"].get("train") or r["settings"].get("official")}
        config = {k: v for k, v in self.cfg.items()}
        config.update(paper_source=PAPER_TABLE_1["source"], wall_minutes_this_call=round(wall / 60, 1),
                      attack=f"AutoAttack ({self.cfg['aa_version']}"
                             + (f", {self.cfg['aa_iterations']} iterations: a smoke run, not the standard attack)"
                                if self.cfg["aa_iterations"] else ")"))
        path = os.path.join(self.results_dir, self.name)
        files.write_json({"config": config, "rows": rows}, path + ".json")
        pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
        diff = lambda a, b: "–" if b is None else f"{100 * (a - b):+.2f}"  # noqa: E731
        lines = [f"{self.cfg['dataset']}, first {self.cfg['test_samples']} test images, {config['attack']}; "
                 f"L2 ε = {self.cfg['eps_l2']:g}, L∞ ε = {self.cfg['eps_linf']:.4g}. Paper: {PAPER_TABLE_1['source']}.", "",
                 "| row | weights | clean | AA L2 | paper | Δ | AA L∞ | paper | Δ |", "|---|---|---|---|---|---|---|---|---|"]
        for row, r in rows.items():
            lines.append(f"| {row} | {r['weights']} | {pct(r['clean'])} | {pct(r['aa_l2'])} | {pct(r['paper_aa_l2'])} | "
                         f"{diff(r['aa_l2'], r['paper_aa_l2'])} | {pct(r['aa_linf'])} | {pct(r['paper_aa_linf'])} | "
                         f"{diff(r['aa_linf'], r['paper_aa_linf'])} |")
        missing = [r for r in self.rows if r not in rows]
        if missing:
            lines += ["", f"Not finished yet: {', '.join(missing)}."]
        files.atomic_write(path + ".md", text="\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"wrote {os.path.relpath(path)}.json and {os.path.relpath(path)}.md")
        return {"config": config, "rows": rows}


def official_files(args):
    """{row: path} from --official-checkpoints DIR (the release's names) and --official ROW=PATH."""
    found = {}
    if args.official_checkpoints:
        if not os.path.isdir(args.official_checkpoints):
            raise D.UserError(f"--official-checkpoints {args.official_checkpoints} is not a folder")
        for row, name in OFFICIAL_FILES.items():
            hits = [p for p in glob.glob(os.path.join(args.official_checkpoints, "*")) if os.path.basename(p).lower() == name.lower()]
            if hits:
                found[row] = hits[0]
        if not found:
            raise D.UserError(f"no file of the release ({', '.join(OFFICIAL_FILES.values())}) in {args.official_checkpoints}; "
                              "name them with --official ROW=PATH")
    for item in args.official or []:
        row, _, path = item.partition("=")
        if row not in ROWS or not path:
            raise D.UserError(f"--official {item!r}: expected ROW=PATH with ROW one of {', '.join(ROWS)}")
        found[row] = path
    for row, path in found.items():
        files.regular_file(path, f"official checkpoint of {row}")
    return found


def main(argv=None):
    p = D.Parser(description=__doc__)
    p.add_argument("--dataset", default="cifar10", help="cifar10 (the paper's numbers), cifar100 or stl10")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to train (or evaluate)")
    p.add_argument("--sbg-file", help="score-based fields for the SBG rows (the official release's or sbg.py export's)")
    p.add_argument("--seed", type=D.seed, default=CONFIG["seeds"][0], help="the official configs' seed")
    p.add_argument("--eval-samples", "--n-samples", dest="test_samples", type=D.positive_int,
                   help=f"the first N test images (default: {CONFIG['test_samples']}; 10000 for the full set)")
    p.add_argument("--official-checkpoints", help="a folder with the released files (names: "
                                                  f"{', '.join(OFFICIAL_FILES.values())}): evaluate them, train nothing")
    p.add_argument("--official", nargs="+", metavar="ROW=PATH", help="released files by row, e.g. pag-sbg=rn18_sbg.pt")
    p.add_argument("--jobs", type=D.positive_int, default=1, help="rows at a time (one GPU: 1)")
    p.add_argument("--out-dir", help="results (default: bench/results; with --quick: runs/paper_table_quick); "
                                     "checkpoints go to OUT_DIR/paper_table_<dataset>/")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: synthetic data, cnn for the ResNet rows, 48 "
                                                        "images, 1 epoch, 16 test images, 3 AutoAttack iterations")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps({**CONFIG, **(QUICK if args.quick else {})}))
    cfg.update(quick=args.quick, seeds=[args.seed], sbg_file=args.sbg_file,
               dataset=cfg.get("dataset") if args.quick else D.canonical_dataset(args.dataset))
    if args.test_samples:
        cfg["test_samples"] = args.test_samples
    official = official_files(args)
    rows = list(official) if official else args.rows
    if not official and not args.quick and not args.sbg_file and any("sbg" in ROWS[r][1] for r in rows):
        raise D.UserError("the SBG rows need --sbg-file (the official release's fields or sbg.py export's); "
                          "or leave them out with --rows")
    out_dir = os.path.abspath(args.out_dir or (os.path.join(ROOT, "runs", "paper_table_quick") if args.quick
                                               else os.path.join(ROOT, "bench", "results")))
    bench = PaperTable(cfg, out_dir, args.jobs, rows, official)
    return bench.table(bench.run())


if __name__ == "__main__":
    D.run_cli(main)
