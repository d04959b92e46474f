"""This version on a GPU, in one command: step time, memory at every paper default, a real run, epoch times.

    python bench/gpu.py --stage                          # here: AutoAttack's modules + Fashion-MNIST -> gpu_carry/
    python bench/gpu.py                                  # on a GPU -> bench/results/gpu.json (+ speed_gpu.json)
    PYTHONPATH=gpu_carry python bench/gpu.py --data-dir gpu_carry/data --out-dir $OUT   # an offline GPU machine
    python bench/gpu.py --quick --out-dir /tmp/gpu_quick # tiny sizes on the CPU: every part runs

The GPU machine has torch and torchvision but neither pyautoattack nor any dataset, and installs nothing: --stage
copies pyautoattack's .py files and the four Fashion-MNIST files into gpu_carry/ (git-ignored; 29.6 MiB, within
what the device tool carries). Parts, in this order (--parts picks some); <out-dir>/gpu.json is rewritten after each:
  memory   train_pag.py's own loop (train_baseline.train with train_pag.PAG, every flag at its default) at each paper
           setting: CIFAR-10 ResNet-18 and ViT, CIFAR-100, STL-10; on random images of the dataset's shape (no CIFAR or
           STL files exist there; the cost does not depend on the pixels), MEMORY_STEPS batches and the per-epoch
           check; torch.cuda.max_memory_allocated, plus the images of the whole splits not loaded here and
           CONTEXT_GIB for the CUDA context, against a 16 GB V100 (V100_GIB). Where it does not fit: smaller
           --pag-chunk (aimed from the peak), until one fits.
  speed    bench/pag_speed.py --device cuda: every row, our step beside the official-style step and the CE step, in
           one run -> <out-dir>/speed_gpu.json.
  fashion  the claims bench's PAG-CM lambda 0.25 seed 0 (its committed command, bench/results/fashion_mnist_runs/)
           trained with train_pag.py and attacked with attack.py on the GPU, beside the committed CPU numbers and the
           same row retrained later on the CPU (fashion_mnist_standard_aa.json): the code changed in between.
  epochs   random 32-px images at the paper's settings (batch 64, SGD, augmentation, the per-epoch check on 1,000
           images): one epoch of 50,000 for vanilla and PAG-CM (ResNet-18), 10,000 for PAG-CM ViT. A Table 1 row's
           projected wall time: 100 x (the training scaled to 50,000 images + the check). PAG-OI and PAG-NN take
           PAG-CM's step (their targets are a lookup: NN's table is computed once, before the first epoch), PAG-SBG
           too plus reading its fields file.
A part that fails is recorded with its error and the others still run; the run then ends with one error line.
The fashion part's needs (AutoAttack, the four files) are checked before anything runs.
"""
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
from runner import ROOT, git_commit as repo_commit, sh  # noqa: E402 - scripts as one-thread processes, logged
import cli  # noqa: E402
import fashion_mnist as fm  # noqa: E402 - the claims bench's attack command
from checkpoint import read_metrics  # noqa: E402 - metrics.jsonl, read checked
import data as D  # noqa: E402
import files  # noqa: E402
import train_baseline as T  # noqa: E402
import train_pag as P  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
CARRY = os.path.join(ROOT, "gpu_carry")
PARTS = ("memory", "speed", "fashion", "epochs")
CONTEXT_GIB = 1.0  # the count for the CUDA context
V100_GIB = 16160 / 1024  # what nvidia-smi reports for a 16 GB V100 (PCIe): 16,160 MiB
FULL_SPLITS = {"cifar10": 60000, "cifar100": 60000, "stl10": 13000}  # images a real run holds on the GPU (train + test)
MEMORY_STEPS, EPOCH_IMAGES, EPOCHS_PER_ROW = 10, 50000, 100
SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "stl10": (3, 96, 96)}
# (label, dataset, extra flags): train_pag.py at each paper default (the flags are what differs from them)
MEMORY_SETTINGS = [("CIFAR-10 ResNet-18", "cifar10", []), ("CIFAR-10 ViT", "cifar10", ["--arch", "vit"]),
                   ("CIFAR-100 ResNet-18", "cifar100", []), ("STL-10 ResNet-18", "stl10", [])]
# (row, method, flags, images timed): PAG-CM stands for PAG-OI/NN/SBG (the same step); ViT on a fifth of an epoch
EPOCH_ROWS = [("vanilla", T.BASELINE, [], 50000), ("pag-cm", P.PAG, ["--source", "cm"], 50000),
              ("pag-cm-vit", P.PAG, ["--source", "cm", "--arch", "vit"], 10000)]
FASHION_RESULT = os.path.join(RESULTS, "fashion_mnist_runs", "pag-cm_lambda0.25_seed0.json")
FASHION_REMADE = os.path.join(RESULTS, "fashion_mnist_standard_aa.json")  # the same row retrained on the CPU later
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
# --quick: the same code paths at sizes a CPU runs in seconds (never compared with anything)
QUICK = dict(memory_steps=1, epoch_images=16, flags=["--arch", "cnn", "--batch-size", "4", "--eval-samples", "4"],
             pag_flags=["--targets-per-image", "2"],
             fashion=["--train-samples", "64", "--val-samples", "16", "--epochs", "1", "--eval-samples", "16"],
             fashion_attack=["--eval-samples", "8"], speed=["--only", "cnn", "--repeats", "1", "--warmup", "1"])


def random_images(name, n_train, n_test):
    """Random uint8 images of a dataset's shape and class count: what a step costs does not depend on the pixels."""
    gen, c = torch.Generator().manual_seed(0), D.DATASETS[name]["num_classes"]
    x = torch.randint(0, 256, (n_train + n_test, *SHAPES[name]), dtype=torch.uint8, generator=gen)
    y = torch.arange(n_train + n_test) % c
    return D.Data(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], c,
                  sha256={k: "random images" for k in ("train", "test", "train_used")})


def parser_for(method):
    parser = T.add_common_args(cli.Parser())
    return P.add_pag_args(parser) if method is P.PAG else parser


def train_on(images, method, flags):
    """The training scripts' loop (train_baseline.train) with `flags` on `images` instead of the dataset's files:
    (peak GiB of torch.cuda.max_memory_allocated over the run, None on a CPU; the epoch's metrics row)."""
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out, mock.patch.object(D, "get_data", lambda *a, **k: images):
        args = parser_for(method).parse_args([*map(str, flags), "--epochs", "1", "--out-dir", out])
        if cuda:
            gc.collect()  # an earlier try's tensors (a failed one's too) are not counted in this one's peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        T.train(args, method)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None  # + the allocator's cached blocks
        metrics = read_metrics(os.path.join(out, "metrics.jsonl"), math.inf)
    return peak, reserved, metrics[-1]


def out_of_memory(e):
    """CUDA's out-of-memory error, or cuDNN's / cuBLAS's allocation failure (a RuntimeError)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def memory_part(quick):
    """train_pag.py at each paper default: its peak memory, and where it does not fit a V100, smaller chunks."""
    rows = []
    for label, dataset, extra in MEMORY_SETTINGS:
        flags = ["--dataset", dataset, *extra, *(QUICK["flags"] + QUICK["pag_flags"] if quick else [])]
        s = T.resolve_settings(parser_for(P.PAG).parse_args(flags), random_images(dataset, 2, 2), P.PAG)
        steps = max(QUICK["memory_steps"] if quick else MEMORY_STEPS, -(-D.DATASETS[dataset]["num_classes"] // s.batch_size))
        images = random_images(dataset, s.batch_size * steps, s.eval_samples)  # every class in it: the cm source needs it
        row = {"setting": label, "command": "train_pag.py " + shlex.join(flags),
               "settings": {k: getattr(s, k) for k in ("arch", "batch_size", "targets_per_image", "pag_chunk",
                                                       "pag_formulation", "amp", "augment", "eval_samples")}, "tries": []}
        # Images a real run also holds on the GPU (the whole splits), beyond the ones loaded here.
        unloaded_gib = (FULL_SPLITS[dataset] - len(images.train_y) - len(images.test_y)) * images.train_x[0].numel() / 2**30
        row["unloaded_images_gib"] = unloaded_gib
        chunk = s.pag_chunk  # None: all k targets in one pass
        while True:
            try:
                peak, reserved, m = train_on(images, P.PAG, flags + ([] if chunk == s.pag_chunk else ["--pag-chunk", chunk]))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                peak, reserved, m = "out of memory", None, None
            need = peak + unloaded_gib + CONTEXT_GIB if isinstance(peak, float) else None
            row["tries"].append({"pag_chunk": chunk, "peak_gib": peak, "reserved_gib": reserved, "needed_gib": need,
                                 "steps": steps, "step_seconds": m and m["train_seconds"] / steps})  # first steps included
            fits = need is not None and need <= V100_GIB
            current = chunk or s.targets_per_image
            if fits or peak is None or current <= 1:  # a CPU has no peak: one try
                row["fits_v100_16gib"] = None if peak is None else fits
                row["fitting_chunk"] = chunk if fits and chunk != s.pag_chunk else None
                break
            # A pass's memory grows with its targets: aim at the chunk that would fit, one less if that is no step down.
            guess = int(current * (V100_GIB - CONTEXT_GIB - unloaded_gib) / (peak + 0.0)) if need else current // 2
            chunk = max(1, min(current - 1, guess))
        gib = lambda t: f"{t['peak_gib']:.2f} GiB" if isinstance(t["peak_gib"], float) else t["peak_gib"] or "(no GPU: no peak)"  # noqa: E731
        fits = {True: "fits", False: "does not fit", None: "(no GPU)"}[row["fits_v100_16gib"]]
        print(f"  {label}: " + ", ".join(f"chunk {t['pag_chunk'] or 'all'} {gib(t)}" for t in row["tries"])
              + f"; with the whole splits and {CONTEXT_GIB:g} GiB of context it {fits} a {V100_GIB:.2f} GiB V100", flush=True)
        rows.append(row)
    return rows


def speed_part(out_dir, quick):
    """bench/pag_speed.py on this device, every row in one run: its file, and its rows."""
    out = os.path.join(out_dir, "speed_gpu.json" if torch.cuda.is_available() else "speed_cpu.json")
    device = ["--device", "cuda"] if torch.cuda.is_available() else []
    sh(os.path.join(out_dir, "gpu_runs", "speed.log"), "bench/pag_speed.py", *device, *(QUICK["speed"] if quick else []),
       "--out", out)
    rows = json.load(open(out))["rows"]
    ms = lambda v: f"{v * 1e3:.1f} ms" if v else "out of memory"  # noqa: E731
    for r in rows:
        print(f"  {r['arch']} {r['image_size']} px batch {r['batch_size']} {r['amp']}: CE {ms(r['ce_seconds'])}, PAG "
              f"{ms(r['pag_seconds'])}, official-style {ms(r['naive_seconds'])}", flush=True)
    return {"file": os.path.basename(out), "rows": rows}


def fashion_part(out_dir, quick, data_dir):
    """The committed claims-bench run, trained and attacked again here with its own command, beside its numbers."""
    cpu = files.read_json_object(FASHION_RESULT, "bench result file")
    train, attack = shlex.split(cpu["settings"]["train"]), cpu["settings"]["attack"]
    run_dir = os.path.join(out_dir, "gpu_runs", "fashion")
    log = os.path.join(run_dir + ".log")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    sh(log, *train, *(QUICK["fashion"] if quick else []), "--data-dir", data_dir, "--no-download", "--out-dir", run_dir)
    train_seconds = time.time() - start
    res = os.path.join(run_dir, "attack_test.json")
    sh(log, *fm.attack_command(attack, os.path.join(run_dir, "model.pt"), cpu["seed"], res),
       *(QUICK["fashion_attack"] if quick else []))
    r = json.load(open(res))
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"), math.inf)
    here = {"clean": r["clean"]["acc"], "aa_l2": r["aa_l2"][f"{attack['eps_l2']:g}"]["acc"],
            "aa_linf": r["aa_linf"][f"{attack['eps_linf']:g}"]["acc"],
            "align_nn": r["align"]["nn test"]["cos"], "val_acc": metrics[-1]["val_acc"],
            # as the bench's result files count it: every epoch with its per-epoch check
            "train_seconds": round(sum(m["seconds"] for m in metrics), 1), "wall_seconds": round(train_seconds, 1)}
    cpu_numbers = {k: cpu[k] for k in ("clean", "aa_l2", "aa_linf", "align_nn", "val_acc", "train_seconds")}
    remade = files.read_json_object(FASHION_REMADE, "standard AutoAttack check")  # the row retrained later, same command
    cpu_remade = {"commit": remade["commit"], **{k: remade["apgd"][k] for k in ("clean", "aa_l2", "aa_linf")}}
    for where, nums in (("here", here), ("committed CPU run", cpu_numbers)):
        print(f"  {where}: clean {nums['clean']:.1%}, AA L2 {nums['aa_l2']:.1%}, L-inf {nums['aa_linf']:.1%}, align NN "
              f"{nums['align_nn']:.3f}, training {nums['train_seconds']:.0f}s", flush=True)
    print(f"  CPU retrain at {cpu_remade['commit'][:7]}: clean {cpu_remade['clean']:.1%}, AA L2 {cpu_remade['aa_l2']:.1%}, "
          f"L-inf {cpu_remade['aa_linf']:.1%}", flush=True)
    return {"command": " ".join(train), "attack": attack, "cpu_result": os.path.relpath(FASHION_RESULT, ROOT),
            "cpu_commit": cpu.get("commit"), "here": here,
            "cpu": cpu_numbers, "cpu_remade": cpu_remade, "commit": git_commit(),
            "quick": quick}


def epochs_part(quick):
    """Per row, one epoch (or part of one) of random CIFAR-10-shaped images at the paper's settings, and its per-epoch
    check: seconds, and 100 epochs of 50,000 images projected (training scaled by the images; the check is per epoch)."""
    rows = []
    for name, method, extra, n in EPOCH_ROWS:
        n = QUICK["epoch_images"] if quick else n
        flags = ["--dataset", "cifar10", *extra, *(QUICK["flags"] + QUICK["pag_flags"] * (method is P.PAG) if quick else [])]
        peak, _, m = train_on(random_images("cifar10", n, 1000), method, flags)
        check = m["seconds"] - m["train_seconds"]
        rows.append({"row": name, "command": f"{'train_pag.py' if method is P.PAG else 'train_baseline.py'} {shlex.join(flags)}",
                     "images": n, "train_seconds": m["train_seconds"], "check_seconds": check,
                     "images_per_second": n / m["train_seconds"], "peak_gib": peak,
                     "projected_hours": EPOCHS_PER_ROW * (m["train_seconds"] * EPOCH_IMAGES / n + check) / 3600})
        print(f"  {name}: {m['train_seconds']:.0f}s training ({n / m['train_seconds']:.0f} img/s) + {check:.0f}s check "
              f"-> {rows[-1]['projected_hours']:.1f} h for {EPOCHS_PER_ROW} epochs of {EPOCH_IMAGES} images", flush=True)
    return rows


def git_commit():
    """This code's commit: git's, else the one --stage wrote into gpu_carry/ (a device's copy may have no .git)."""
    path = os.path.join(CARRY, "COMMIT")
    return repo_commit() or (open(path).read().strip() if os.path.exists(path) else None)


def preflight(args):
    """What the fashion part needs, checked before any GPU time is spent: AutoAttack importable, the four files."""
    import attack
    attack.import_autoattack()  # one error line naming what to install (or carry) when it is missing
    folders = [os.path.join(ROOT, args.data_dir, "FashionMNIST", "raw"), D.DEBIAN_FASHION_MNIST]
    if not any(all(os.path.exists(os.path.join(f, n)) or os.path.exists(os.path.join(f, n[:-3])) for n in FASHION_FILES)
               for f in folders):
        raise files.UserError(f"Fashion-MNIST is in neither {folders[0]} nor {folders[1]}: pass --data-dir (on an offline "
                              "machine: python bench/gpu.py --stage here, then --data-dir gpu_carry/data there)")


def stage():
    """pyautoattack's modules and Fashion-MNIST's files into gpu_carry/ (git-ignored), for the device tool to carry."""
    import pyautoattack
    src = os.path.dirname(pyautoattack.__file__)
    dst = os.path.join(CARRY, "pyautoattack")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if not n.endswith(".py")
                                                       and not os.path.isdir(os.path.join(d, n))])
    raw = os.path.join(CARRY, "data", "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in FASHION_FILES:
        path = os.path.join(D.DEBIAN_FASHION_MNIST, name)
        if not os.path.exists(path):
            raise files.UserError(f"{path} is missing: apt-get install dataset-fashion-mnist")
        shutil.copy(path, raw)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    files.atomic_write(os.path.join(CARRY, "COMMIT"), text=f"{repo_commit()}{' with uncommitted changes' if status else ''}\n")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CARRY) for f in fs)
    print(f"wrote {os.path.relpath(CARRY)}/ ({size / 2**20:.1f} MiB): carry it, and run with PYTHONPATH=gpu_carry "
          "and --data-dir gpu_carry/data")


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--stage", action="store_true", help="copy what the GPU machine lacks into gpu_carry/ and stop")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure, in this order")
    p.add_argument("--quick", action="store_true", help="tiny sizes (on a CPU): that every part runs")
    p.add_argument("--out-dir", help="gpu.json, speed_gpu.json, and gpu_runs/ (the Fashion-MNIST run and the logs; "
                                     "git-ignored) (default: bench/results; with --quick: required)")
    p.add_argument("--data-dir", default="data", help="where Fashion-MNIST is or goes (as the scripts' --data-dir; "
                                                       "--stage puts it in gpu_carry/data), relative to the project root")
    args = p.parse_args(argv)
    if args.stage:
        return stage()
    if args.quick and not args.out_dir:
        raise files.UserError("--quick needs --out-dir (it never writes into bench/results)")
    if not args.quick and not torch.cuda.is_available():
        raise files.UserError("no GPU here: bench/gpu.py measures a GPU (--quick checks the parts on a CPU)")
    if "fashion" in args.parts:
        preflight(args)
    out_dir = os.path.abspath(args.out_dir or RESULTS)
    out = os.path.join(out_dir, "gpu.json")
    result = {"config": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                         "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                         "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "quick": args.quick, "context_gib": CONTEXT_GIB,
                         "v100_gib": V100_GIB, "memory_steps": MEMORY_STEPS, "epoch_images": EPOCH_IMAGES}}
    failed = []
    for part in [q for q in PARTS if q in args.parts]:
        print(f"{part}:", flush=True)
        start = time.time()
        try:  # one part failing keeps the others: a GPU session is rare
            result[part] = (memory_part(args.quick) if part == "memory" else speed_part(out_dir, args.quick)
                            if part == "speed" else fashion_part(out_dir, args.quick, args.data_dir) if part == "fashion"
                            else epochs_part(args.quick))
        except Exception as e:  # noqa: BLE001 - recorded, and the run ends with an error line naming it
            result[part] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(part)
            print(f"  {part} failed: {result[part]['error']}", flush=True)
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()  # the next part's processes get the memory this one cached
        result.setdefault("seconds", {})[part] = round(time.time() - start, 1)
        files.write_json(result, out)  # after every part: a run cut short keeps what it measured
    print(f"wrote {os.path.relpath(out)}")
    if failed:
        raise files.UserError(f"{', '.join(failed)} failed (each error is above and in {os.path.relpath(out)}); run "
                              f"them again with --parts {' '.join(failed)} --out-dir elsewhere")
    return result


if __name__ == "__main__":
    cli.run_cli(main)
