"""The paper's comparison at CPU scale on real data (Fashion-MNIST), end to end.

    python bench/fashion_mnist.py                  # about 80 minutes on 2 CPU cores (--jobs 2)
    python bench/fashion_mnist.py --quick          # smoke run: tiny subset, 1 epoch, 50 test images

Makes the SBG ground truth (sbg.py train + export on the same training subset), trains
every row with the same seed, architecture (cnn), data subset, epochs and lambda through
the ordinary scripts (adversarial training: L2 eps 1.5, 10 steps), evaluates each
checkpoint with attack.py (clean, AutoAttack L2 eps 1.5 and L-inf eps 0.1 on the same
first N test images, alignment to the NN ground truth on those test images and to the
SBG fields on the first N training images), and writes bench/results/fashion_mnist.json
plus a markdown table (bench/results/fashion_mnist.md) for the README.

Jobs run as separate one-thread processes, --jobs at a time (the SBG job first: the
pag-sbg row and the SBG alignment column wait for it); each writes its log next to its
checkpoint (OUT_DIR/<row>/*.log). Finished steps are reused (delete OUT_DIR/<row> to
redo one), so an interrupted run continues where it stopped.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402 - the project's one atomic writer and safe loader
RESULTS = os.path.join(ROOT, "bench", "results")

PAG_COEFF = D.ARCH_DEFAULTS["cnn"]["pag_coeff"]  # lambda of every PAG row: the cnn default (README: the sweep)
ROWS = {  # name -> (script, extra flags, relative training cost: the longest jobs are scheduled first)
    "vanilla": ("train_baseline.py", [], 1),
    "pag-cm": ("train_pag.py", ["--source", "cm"], 10),
    "pag-nn": ("train_pag.py", ["--source", "nn"], 11),
    "pag-oi": ("train_pag.py", ["--source", "oi"], 10),
    "pag-sbg": ("train_pag.py", ["--source", "sbg"], 10),  # + --sbg-file, made by sbg.py first
    "pgd-at": ("train_baseline.py", ["--adv", "pgd", "--adv-norm", "l2"], 11),
    "trades": ("train_baseline.py", ["--adv", "trades", "--adv-norm", "l2"], 12),
    "pag-cm+pgd-at": ("train_pag.py", ["--source", "cm", "--adv", "pgd", "--adv-norm", "l2"], 18),
}


def torch_load_epoch(path):
    return D.load_file(path, "denoiser checkpoint")["epoch"]


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


def run_jobs(jobs, needs, workers):
    """Run the callables in `jobs` (name -> fn) on `workers` threads, each once every job it needs is done."""
    pending, running, done, start = list(jobs), {}, set(), time.time()
    stamp = lambda: f"[{(time.time() - start) / 60:5.1f} min]"  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:
        while pending or running:
            for name in [n for n in pending if needs.get(n, set()) <= done][: workers - len(running)]:
                pending.remove(name)
                print(f"{stamp()} start {name}", flush=True)
                running[pool.submit(jobs[name])] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed job stops the benchmark (running jobs finish first)
                done.add(name)
                print(f"{stamp()} done  {name} ({len(done)}/{len(jobs)} jobs)", flush=True)
    return time.time() - start


def main():
    p = D.Parser(description=__doc__)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--n-samples", type=int, default=500, help="test images for every evaluation")
    p.add_argument("--pag-coeff", type=float, default=PAG_COEFF, help="lambda of every PAG row")
    p.add_argument("--aa-version", default="apgd", choices=("standard", "apgd"),
                   help="apgd = AutoAttack's APGD-CE + APGD-T subset (fits the CPU budget; see README)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time, one thread each")
    p.add_argument("--out-dir", help="default: runs/fashion_mnist_bench (runs/fashion_mnist_bench_quick with --quick)")
    p.add_argument("--sbg-epochs", type=int, default=15, help="denoiser epochs for the pag-sbg row")
    p.add_argument("--sbg-timestep", type=int, default=300, help="noise level of the SBG fields (see sbg.py sweep)")
    p.add_argument("--sbg-noise-draws", type=int, default=1, help="noise draws averaged per field")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 epoch, 50 test images")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.train_samples, args.n_samples, args.sbg_epochs = 1, 512, 50, 1
    out_dir = os.path.abspath(args.out_dir or os.path.join("runs", "fashion_mnist_bench" + ("_quick" if args.quick else "")))
    data_flags = ["--dataset", "fashion-mnist", "--train-samples", args.train_samples]
    sbg_dir = os.path.join(out_dir, "sbg")
    sbg_file = os.path.join(sbg_dir, "fields.pt")
    ROWS["pag-sbg"] = ("train_pag.py", ["--source", "sbg", "--sbg-file", sbg_file], ROWS["pag-sbg"][2])
    # Adam 1e-3 with a constant lr and no augmentation: in this few-step CPU budget SGD 0.01 (the CIFAR
    # setting) reached 77.2% clean, and crop + flip or the lr drops cost vanilla 4-9 points (README).
    common = ["--dataset", "fashion-mnist", "--arch", "cnn", "--optimizer", "adam", "--lr", "1e-3", "--lr-drops=",
              "--no-augment", "--seed", args.seed, "--epochs", args.epochs, "--train-samples", args.train_samples,
              "--eval-samples", args.n_samples, "--log-every", 100]

    sbg_settings = {"train_samples": args.train_samples, "epochs": args.sbg_epochs, "seed": args.seed,
                    "timestep": args.sbg_timestep, "noise_draws": args.sbg_noise_draws}

    def make_sbg():  # denoiser + fields, shared by the pag-sbg row and the align_sbg column
        settings_file = os.path.join(sbg_dir, "settings.json")
        if os.path.exists(sbg_file):  # reused only if made with these settings, like every row
            made_with = json.load(open(settings_file)) if os.path.exists(settings_file) else None
            if made_with != sbg_settings:
                raise D.UserError(f"{sbg_dir} was made with other settings ({made_with}); delete it or pass another --out-dir")
            return
        ckpt, log = os.path.join(sbg_dir, "denoiser.pt"), os.path.join(sbg_dir, "sbg.log")
        if not os.path.exists(ckpt) or torch_load_epoch(ckpt) < args.sbg_epochs:
            sh(log, "sbg.py", "train", *data_flags, "--epochs", args.sbg_epochs, "--seed", args.seed, "--out-dir", sbg_dir,
               *(["--resume"] if os.path.exists(ckpt) else []))
        sh(log, "sbg.py", "export", *data_flags, "--checkpoint", ckpt, "--timestep", args.sbg_timestep,
           "--noise-draws", args.sbg_noise_draws, "--out", sbg_file)
        D.atomic_write(settings_file, text=json.dumps(sbg_settings))

    def train_and_attack(name):
        script, extra, _ = ROWS[name]
        run_dir = os.path.join(out_dir, name)
        ckpt, log = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "run.log")
        pag = ["--pag-coeff", args.pag_coeff] if script == "train_pag.py" else []
        cmd = [script, *common, *extra, *pag]
        command = " ".join(map(str, cmd))
        done = os.path.join(run_dir, "done.json")
        if os.path.exists(done):  # reuse a finished row only if it was trained the same way
            with open(done) as f:
                if json.load(f).get("command") != command:
                    raise D.UserError(f"{run_dir} was trained with other settings; delete it or pass another --out-dir")
        else:
            start = time.time()
            sh(log, *cmd, "--out-dir", run_dir, *(["--resume"] if os.path.exists(ckpt) else []))
            D.atomic_write(done, text=json.dumps({"train_seconds": time.time() - start, "command": command}))
        if not os.path.exists(os.path.join(run_dir, "attack.json")):
            sh(log, "attack.py", "--checkpoint", ckpt, "--attacks", "clean", "aa-l2", "aa-linf", "align",
               "--aa-version", args.aa_version, "--n-samples", args.n_samples, "--align-source", "nn",
               "--out", os.path.join(run_dir, "attack.json"))

    def align_sbg(name):  # SBG fields exist for training images only
        run_dir = os.path.join(out_dir, name)
        if not os.path.exists(os.path.join(run_dir, "align_sbg.json")):
            sh(os.path.join(run_dir, "run.log"), "attack.py", "--checkpoint", os.path.join(run_dir, "model.pt"),
               "--attacks", "align", "--align-source", "sbg", "--sbg-file", sbg_file, "--align-split", "train",
               "--n-samples", args.n_samples, "--out", os.path.join(run_dir, "align_sbg.json"))

    # Longest jobs first, so the two workers finish close together.
    jobs, needs = {"sbg": make_sbg}, {}
    for name in sorted(args.rows, key=lambda n: -ROWS[n][2]):
        jobs[name] = lambda n=name: train_and_attack(n)
        jobs["align-sbg " + name] = lambda n=name: align_sbg(n)
        needs["align-sbg " + name] = {"sbg", name}
    needs["pag-sbg"] = {"sbg"}
    wall = run_jobs(jobs, needs, args.jobs)

    rows = []
    for name in args.rows:
        run_dir = os.path.join(out_dir, name)
        res, align, done = (json.load(open(os.path.join(run_dir, f))) for f in ("attack.json", "align_sbg.json", "done.json"))
        rows.append({"name": name, "clean": res["clean_acc"], "aa_l2": res["autoattack_l2"]["1.5"],
                     "aa_linf": res["autoattack_linf"]["0.1"], "align_nn": res["alignment"]["cos"],
                     "align_sbg": align["alignment"]["cos"], "train_seconds": round(done["train_seconds"], 1)})
    aa_name = "AutoAttack (standard)" if args.aa_version == "standard" else "AutoAttack APGD-CE + APGD-T"
    config = {**{k: v for k, v in vars(args).items() if k not in ("rows", "out_dir")}, "arch": "cnn",
              "optimizer": "adam", "lr": 1e-3, "lr_drops": None, "augment": False, "attack": aa_name,
              "eps_l2": 1.5, "eps_linf": 0.1, "wall_minutes": round(wall / 60, 1)}
    out = os.path.join(RESULTS, "fashion_mnist_quick" if args.quick else "fashion_mnist")
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"| model | clean | {aa_name} L2 1.5 | {aa_name} L∞ 0.1 | align NN (test) | align SBG (train) | train s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['clean']:.1%} | {r['aa_l2']:.1%} | {r['aa_linf']:.1%} | {r['align_nn']:.3f} | "
              f"{r['align_sbg']:.3f} | {r['train_seconds']:.0f} |" for r in rows]
    D.atomic_write(out + ".json", text=json.dumps({"rows": rows, "config": config}, indent=2) + "\n")
    D.atomic_write(out + ".md", text="\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time {wall / 60:.1f} min; wrote {os.path.relpath(out)}.json and {os.path.relpath(out)}.md")


if __name__ == "__main__":
    D.run_cli(main)
