"""The README's Quick start, run as a new user runs it, in a fresh folder: what each command takes and prints.

    python bench/quickstart.py        # about 5 minutes on 2 CPU cores -> bench/results/quickstart.json (+ .md)

Each command of COMMANDS (the README's Quick start block after the install and the tests; a test checks that the two agree)
runs in a new temporary folder holding a copy of the project's scripts, so nothing of an earlier run (runs/,
results/, cache/) is reused. The numbers the README quotes are read from the files the commands write.
"""
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [BENCH, ROOT]
import cli  # noqa: E402 - the project's parser
import files  # noqa: E402 - the one atomic writer
from runner import git_commit  # noqa: E402

RESULTS = os.path.join(BENCH, "results")
# The README's Quick start after the install and the tests: one command a line, as a user pastes them (a test checks
# that they are the README's).
COMMANDS = [
    "python bench/toy.py",
    "python train_baseline.py --dataset fashion-mnist --train-samples 6000 --epochs 3 --out-dir runs/fm_vanilla",
    "python train_pag.py      --dataset fashion-mnist --train-samples 6000 --epochs 3 --out-dir runs/fm_pag",
    "python attack.py --checkpoint runs/fm_vanilla --measures clean aa-l2 --aa-version apgd --eval-samples 200",
    "python attack.py --checkpoint runs/fm_pag     --measures clean aa-l2 --aa-version apgd --eval-samples 200",
    "python attack.py --checkpoint runs/fm_pag     --measures visualize --vis-images 4 --vis-compare runs/fm_vanilla",
]
COPIED = (".py", ".ini")  # the project's files a user has in a clone (bench/ and its code included, not results)


def fresh_clone(where):
    """The project's code (not its runs, caches or results) in a new folder, as a fresh clone holds it."""
    for folder, subfolders, names in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__")) and d not in ("runs", "results", "cache", "data")]
        for n in names:
            if n.endswith(COPIED) or n == "requirements.txt":
                os.makedirs(os.path.join(where, rel), exist_ok=True)
                shutil.copy(os.path.join(folder, n), os.path.join(where, rel, n))


def numbers(where):
    """What the README quotes, from the files the commands wrote."""
    toy = files.read_json_object(os.path.join(where, "results", "toy", "metrics.json"), "toy metrics")
    exact = files.read_json_object(os.path.join(where, "results", "toy", "exact.json"), "toy results")["exact_robust_acc"]
    out = {"toy_seed": 2, "toy_exact_at_15": {m: exact[m]["15"] for m in ("vanilla", "pag")},
           "toy_clean": {m: toy[m]["clean_acc"] for m in ("vanilla", "pag")}}
    for name in ("fm_vanilla", "fm_pag"):
        res = files.read_json_object(os.path.join(where, "runs", name, "attack.json"), "attack results")
        out[name] = {"clean": res["clean"]["acc"], "aa_l2_1.5": res["aa_l2"]["1.5"]["acc"],
                     "eval_samples": res["clean"]["eval_samples"], "checkpoint_sha256": res["checkpoint_sha256"]}
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--out", default=os.path.join(RESULTS, "quickstart.json"), help="where the record goes (+ .md beside it)")
    args = p.parse_args(argv)
    files.check_output(args.out, "--out", suffixes=(".json",))
    steps = []
    with tempfile.TemporaryDirectory() as where:
        fresh_clone(where)
        for command in COMMANDS:
            argv_ = shlex.split(command)
            start = time.time()
            proc = subprocess.run([sys.executable, *argv_[1:]], cwd=where, capture_output=True, text=True)
            seconds = time.time() - start
            print(f"{seconds:6.1f} s  {command}", flush=True)
            if proc.returncode:
                raise files.UserError(f"failed: {command}\n{proc.stderr[-1500:]}")
            steps.append({"command": command, "seconds": round(seconds, 1), "last_line": proc.stdout.strip().splitlines()[-1]})
        found = numbers(where)
    record = {"steps": steps, "total_seconds": round(sum(s["seconds"] for s in steps), 1), **found,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
              "commit": git_commit(), "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    files.write_json(record, args.out)
    md = ["| command | seconds |", "|---|---|", *(f"| `{s['command']}` | {s['seconds']:.0f} |" for s in steps),
          f"| all | {record['total_seconds']:.0f} |", "",
          f"Toy (seed 2), exact robust accuracy at ε = 15: vanilla {100 * found['toy_exact_at_15']['vanilla']:.1f}%, "
          f"PAG {100 * found['toy_exact_at_15']['pag']:.1f}% (clean {100 * found['toy_clean']['pag']:.1f}%).",
          f"Fashion-MNIST, 3 epochs on 6,000 images, first {found['fm_pag']['eval_samples']} test images, AutoAttack "
          f"APGD L2 ε = 1.5: vanilla {100 * found['fm_vanilla']['clean']:.1f}% clean / {100 * found['fm_vanilla']['aa_l2_1.5']:.1f}% "
          f"robust, PAG {100 * found['fm_pag']['clean']:.1f}% / {100 * found['fm_pag']['aa_l2_1.5']:.1f}%."]
    files.atomic_write(args.out.removesuffix(".json") + ".md", text="\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {os.path.relpath(args.out)} and {os.path.relpath(args.out.removesuffix('.json') + '.md')}")
    return record


if __name__ == "__main__":
    cli.run_cli(main)
