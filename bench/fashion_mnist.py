"""The paper's comparison at CPU scale on real data (Fashion-MNIST), end to end.

    python bench/fashion_mnist.py                  # hours of CPU: see below
    python bench/fashion_mnist.py --quick          # smoke run: tiny subset, 1 epoch, 50 test images

First makes the SBG ground truth (sbg.py train + export, reused if present), then
trains every row with the same seed, architecture (cnn), data subset and epochs
through the ordinary scripts (adversarial training: L2 eps 1.5, 10 steps; PAG: lambda
0.5, the cnn default), evaluates each checkpoint with attack.py (clean,
AutoAttack L2 eps 1.5 and L-inf eps 0.1 on the same first N test images,
alignment to the NN ground truth on those test images and to the SBG fields on the
first N training images), and writes bench/results/fashion_mnist.json
plus a markdown table (bench/results/fashion_mnist.md) for the README.
Finished rows are reused (delete OUT_DIR/<row> to redo one), so independent rows can
run as separate processes (`--rows ...`) on separate cores. Measured on one core per
job, two to three jobs on a 2-core machine: vanilla 2 min; each PAG or adversarial-
training row 20-25 min (PAG + AT about twice that); the denoiser 35 min; the SBG
export (10k images, one noise draw) 17 min; each evaluation 1-4 min.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

ROWS = {  # name -> (script, extra flags)
    "vanilla": ("train_baseline.py", []),
    "pag-cm": ("train_pag.py", ["--source", "cm"]),
    "pag-nn": ("train_pag.py", ["--source", "nn"]),
    "pag-oi": ("train_pag.py", ["--source", "oi"]),
    "pag-sbg": ("train_pag.py", ["--source", "sbg"]),  # + --sbg-file, made by sbg.py first
    "pgd-at": ("train_baseline.py", ["--adv", "pgd", "--adv-norm", "l2"]),
    "trades": ("train_baseline.py", ["--adv", "trades", "--adv-norm", "l2"]),
    "pag-cm+pgd-at": ("train_pag.py", ["--source", "cm", "--adv", "pgd", "--adv-norm", "l2"]),
}


def torch_load_epoch(sbg_dir):
    import torch
    return torch.load(os.path.join(sbg_dir, "denoiser.pt"), map_location="cpu", weights_only=False)["epoch"]


def sh(*cmd):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--n-samples", type=int, default=500, help="test images for every evaluation")
    p.add_argument("--aa-version", default="apgd", choices=("standard", "apgd"),
                   help="apgd = AutoAttack's APGD-CE + APGD-T subset (fits the CPU budget; see README)")
    p.add_argument("--out-dir", default=os.path.join("runs", "fashion_mnist_bench"))
    p.add_argument("--sbg-epochs", type=int, default=15, help="denoiser epochs for the pag-sbg row")
    p.add_argument("--sbg-timestep", type=int, default=300, help="noise level of the SBG fields (see sbg.py sweep)")
    p.add_argument("--sbg-noise-draws", type=int, default=1,
                   help="noise draws averaged per field (4 takes ~45 min for 10k images on one core)")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 epoch, 50 test images")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.train_samples, args.n_samples, args.sbg_epochs = 1, 512, 50, 1
    data_flags = ["--dataset", "fashion-mnist", "--train-samples", args.train_samples]
    sbg_dir = os.path.join(args.out_dir, "sbg")
    sbg_file = os.path.join(sbg_dir, "fields.pt")
    if not os.path.exists(sbg_file):  # denoiser + fields, shared by the pag-sbg row and the align_sbg column
        if not os.path.exists(os.path.join(sbg_dir, "denoiser.pt")) or torch_load_epoch(sbg_dir) < args.sbg_epochs:
            sh("sbg.py", "train", *data_flags, "--epochs", args.sbg_epochs, "--seed", args.seed, "--out-dir", sbg_dir,
               *(["--resume"] if os.path.exists(os.path.join(sbg_dir, "denoiser.pt")) else []))
        sh("sbg.py", "export", *data_flags, "--checkpoint", os.path.join(sbg_dir, "denoiser.pt"),
           "--timestep", args.sbg_timestep, "--noise-draws", args.sbg_noise_draws, "--out", sbg_file)
    ROWS["pag-sbg"] = ("train_pag.py", ["--source", "sbg", "--sbg-file", sbg_file])
    # Adam 1e-3: SGD 0.01 (the CIFAR setting) reaches only ~75% in this few-step CPU budget.
    common = ["--dataset", "fashion-mnist", "--arch", "cnn", "--optimizer", "adam", "--lr", "1e-3", "--seed", args.seed, "--epochs", args.epochs,
              "--train-samples", args.train_samples, "--eval-samples", args.n_samples, "--log-every", 100]
    rows = []
    for name in args.rows:
        script, extra = ROWS[name]
        run_dir = os.path.join(args.out_dir, name)
        ckpt = os.path.join(run_dir, "model.pt")
        if not os.path.exists(os.path.join(run_dir, "done.json")):
            start = time.time()
            sh(script, *common, *extra, "--out-dir", run_dir, *(["--resume"] if os.path.exists(ckpt) else []))
            with open(os.path.join(run_dir, "done.json"), "w") as f:
                json.dump({"train_seconds": time.time() - start}, f)
        with open(os.path.join(run_dir, "done.json")) as f:
            train_seconds = json.load(f)["train_seconds"]
        res_path = os.path.join(run_dir, "attack.json")
        if not os.path.exists(res_path):
            sh("attack.py", "--checkpoint", ckpt, "--attacks", "clean", "aa-l2", "aa-linf", "align",
               "--aa-version", args.aa_version, "--n-samples", args.n_samples, "--align-source", "nn", "--out", res_path)
        sbg_align_path = os.path.join(run_dir, "align_sbg.json")
        if not os.path.exists(sbg_align_path):  # SBG fields exist for training images only
            sh("attack.py", "--checkpoint", ckpt, "--attacks", "align", "--align-source", "sbg", "--sbg-file", sbg_file,
               "--align-split", "train", "--n-samples", args.n_samples, "--out", sbg_align_path)
        with open(res_path) as f:
            res = json.load(f)
        with open(sbg_align_path) as f:
            align_sbg = json.load(f)["alignment"]["cos"]
        rows.append({"name": name, "clean": res["clean_acc"], "aa_l2": res["autoattack_l2"]["1.5"],
                     "aa_linf": res["autoattack_linf"]["0.1"], "align_nn": res["alignment"]["cos"],
                     "align_sbg": align_sbg, "train_seconds": round(train_seconds, 1)})
    aa_name = "AutoAttack (standard)" if args.aa_version == "standard" else "AutoAttack APGD-CE + APGD-T"
    config = {**{k: v for k, v in vars(args).items() if k != "rows"}, "arch": "cnn", "optimizer": "adam", "lr": 1e-3,
              "pag_coeff": 0.5, "attack": aa_name,
              "eps_l2": 1.5, "eps_linf": 0.1}
    out = os.path.join(RESULTS, "fashion_mnist_quick" if args.quick else "fashion_mnist")
    os.makedirs(RESULTS, exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"rows": rows, "config": config}, f, indent=2)
    lines = [f"| model | clean | {aa_name} L2 1.5 | {aa_name} L∞ 0.1 | align NN (test) | align SBG (train) | train s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['clean']:.1%} | {r['aa_l2']:.1%} | {r['aa_linf']:.1%} | {r['align_nn']:.3f} | "
              f"{r['align_sbg']:.3f} | {r['train_seconds']:.0f} |" for r in rows]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
