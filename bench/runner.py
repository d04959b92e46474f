"""The benches' runner: jobs on a few one-thread processes (run_jobs, sh), and the result cache a bench
continues from (Bench: one checked result file per trained and attacked model, reused only if made with the
same settings). A bench subclasses Bench with what to run (its models, flags and plan of jobs) and what
to conclude: bench/fashion_mnist.py (the claims), bench/paper_table.py (the paper's Table 1).
"""
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import files  # noqa: E402 - the one atomic writer, the errors that are one line
import cli  # noqa: E402 - the number types of the flags
from checkpoint import read_classifier, read_denoiser, read_metrics  # noqa: E402 - the format, read checked


# ----------------------------------------------------------------------------- result files
_acc = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1  # noqa: E731
_cos = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and -1 <= v <= 1  # noqa: E731
_seconds = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0  # noqa: E731
RESULT_FIELDS = {"key": str, "model": str, "settings": dict, "clean": _acc, "aa_l2": _acc, "aa_linf": _acc}
RESULT_OPTIONAL = {"seed": lambda v: isinstance(v, int), "lambda": lambda v: v is None or isinstance(v, (int, float)),
                   "align_nn": _cos, "align_sbg": _cos, "val_acc": _acc, "val_pgd_l2_acc": _acc, "test_acc": _acc,
                   "test_pgd_l2_acc": _acc, "train_seconds": _seconds, "seconds": _seconds,
                   "data_sha256": lambda v: v is None or isinstance(v, dict) and all(isinstance(h, str) for h in v.values())}


def check_result(obj, path, required=RESULT_FIELDS):
    """One result file as the runner writes it: the `required` keys with their types, every other known
    key's type, accuracies in [0, 1], cosines in [-1, 1], and robust accuracy never above clean (a point
    is robust only if classified right clean, on the same images); else one UserError naming the file
    and the key. Returns obj."""
    files.require(obj, required, path, "bench result file")
    files.require(obj, {k: check for k, check in RESULT_OPTIONAL.items() if k in obj}, path, "bench result file")
    if not isinstance(obj["settings"].get("attack"), dict):
        raise files.UserError(f"{path}: its settings name no attack; it is not a bench result file")
    for m in ("aa_l2", "aa_linf"):
        if obj[m] > obj["clean"]:
            raise files.UserError(f"{path}: {m} {obj[m]} is above its clean accuracy {obj['clean']}, which no attack can "
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
PROCESSES = set()  # the scripts sh() is running now: an interrupted bench stops them (stop_processes)
STOPPING = threading.Event()  # set once the bench is interrupted: no job starts a script after it
_processes_lock = threading.Lock()


def sh(log, *cmd):
    """Run one of our scripts as a one-thread process, its output appended to `log`; fail loudly."""
    cmd = [sys.executable, *map(str, cmd)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        with _processes_lock:
            if STOPPING.is_set():
                raise files.Interrupted("the bench is stopping")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            PROCESSES.add(proc)
        try:
            code = proc.wait()
        finally:
            with _processes_lock:
                PROCESSES.discard(proc)
        if code:
            if STOPPING.is_set():
                raise files.Interrupted(f"stopped: {' '.join(cmd[1:])}")
            raise files.UserError(f"failed: {' '.join(cmd[1:])} (log: {log})")


def stop_processes():
    """SIGTERM to every script sh() runs, and none started after: each stops as on Ctrl-C (a training run
    keeps its last finished epoch, and the next bench call resumes it)."""
    with _processes_lock:
        STOPPING.set()
        for proc in PROCESSES:
            if proc.poll() is None:
                proc.terminate()


def run_jobs(jobs, needs, workers, cost=None):
    """Run the callables in `jobs` (name -> fn) on `workers` threads, each once every job it needs is
    done, the costliest ready job first. Ctrl-C, SIGTERM or a failed job stops the running jobs' scripts at once
    (they resume at the next call) and ends the bench with one line naming the jobs stopped and those that finished."""
    cost = cost or {}
    pending, running, done, start = list(jobs), {}, set(), time.time()
    stamp = lambda: f"[{(time.time() - start) / 60:5.1f} min]"  # noqa: E731
    STOPPING.clear()  # a new plan of jobs (an earlier one in this process may have been interrupted)
    pool = ThreadPoolExecutor(workers)
    try:
        while pending or running:
            ready = sorted((n for n in pending if needs.get(n, set()) <= done), key=lambda n: -cost.get(n, 0))
            for name in ready[: workers - len(running)]:
                pending.remove(name)
                print(f"{stamp()} start {name}", flush=True)
                running[pool.submit(jobs[name])] = name
            if not running:
                raise files.UserError(f"jobs wait on each other: {sorted(pending)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed job stops the bench (below: the running ones are stopped too)
                done.add(name)
                print(f"{stamp()} done  {name} ({len(done)}/{len(jobs)} jobs)", flush=True)
    except BaseException as e:  # an interrupt, or a failed job: the other running jobs are stopped, not waited for
        stop_processes()
        pool.shutdown(wait=True)  # each running job's script has stopped: its thread ends at once
        STOPPING.clear()  # every job has ended: a later sh() in this process (gpu.py's parts, a test) runs again
        finished = {running[f] for f in running if f.exception() is None}  # it had written its files already
        stopped = sorted(set(running.values()) - finished)
        done |= finished
        said = (f"stopped {', '.join(stopped)} (each continues from its last saved epoch when the bench runs again)"
                if stopped else "no job was running")
        wrote = f"this call finished {len(done)} job(s), each with its result file written" + \
            (f" ({', '.join(sorted(done))})" if done else "")
        if isinstance(e, (KeyboardInterrupt, files.Interrupted)):
            raise files.Interrupted(f"{said}; {wrote}") from None
        if isinstance(e, files.UserError):
            raise files.UserError(f"{e}; {said}; {wrote}") from None
        raise
    pool.shutdown(wait=True)
    return time.time() - start


def add_bench_flags(p, models=None, out_default="runs/<bench>"):
    """The flags the claims benches share: which rows (when `models` is given), how many jobs, and where runs
    and results go."""
    if models:
        p.add_argument("--rows", nargs="+", choices=list(models), default=list(models),
                       help="models to run (PAG rows bring vanilla and the lambda sweep: the selection needs them)")
    p.add_argument("--jobs", type=cli.positive_int, default=2, help="processes at a time, one thread each")
    p.add_argument("--out-dir", help=f"checkpoints, logs and fields (default: {out_default})")
    p.add_argument("--results-dir", help="result files, tables and figures (default: bench/results; with --quick: "
                                         "the --out-dir)")
    return p


def recorded_settings(path):
    """What a settings file beside a run folder, the denoiser or the fields records (None: no file)."""
    return files.read_json_object(path, "bench settings file") if os.path.exists(path) else None


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------- the result cache
class Bench:
    """One bench run: its settings, folders, and the jobs that fill RESULTS/<name>_runs/: train every
    (row, lambda, seed) with the ordinary scripts, attack it with attack.py, keep one result file each.
    A bench subclasses it with what to run: `name`, `models` (row -> (script, flags)), `common_flags` and
    `attack_command`; and where it wants them `align` (held-out SBG alignment in every job), `cost`,
    `measures`, `result_extras` and its own plan of jobs (`run`)."""
    align = False
    cost = {}  # row -> relative training time (a row not named: 10, a PAG row's): the longest ready jobs start first
    result_fields = RESULT_FIELDS  # what a result file must hold

    def __init__(self, cfg, out_dir, results_dir, workers, rows=None):
        self.cfg, self.out_dir, self.results_dir, self.workers = cfg, out_dir, results_dir, workers
        self.rows = [m for m in self.models if rows is None or m in rows]
        self.runs_dir = os.path.join(results_dir, f"{self.name}_runs")
        # The denoiser is a fixed source of ground truth like the data: it lives beside the result files
        # (committed, 3.5 MB), so a bench continued on a fresh machine exports the same fields from it.
        self.denoiser_dir = os.path.join(results_dir, f"{self.name}_sbg")
        self.sbg_dir = os.path.join(out_dir, "sbg")  # the fields (hundreds of MB), remade from the denoiser
        self.fields = {s: os.path.join(self.sbg_dir, f"fields_{s}.pt") for s in ("train", "test")}
        self.sbg_done = threading.Event()  # set when the "sbg" job has ended (made the fields, or failed)
        self.sbg_made = False
        self.sha256_of_fields = {}  # split -> content hash, read once (fields_sha256)
        self.data_flags, self.common = self.common_flags(cfg)

    def measures(self, res):
        """The numbers a result file keeps from attack.py's results."""
        eps_l2, eps_linf = f"{self.cfg['eps_l2']:g}", f"{self.cfg['eps_linf']:g}"
        return {"clean": res["clean"]["acc"], "aa_l2": res["aa_l2"][eps_l2]["acc"], "aa_linf": res["aa_linf"][eps_linf]["acc"]}

    # -- one result file per (model, lambda, seed)
    def key(self, model, seed, lam=None):
        return f"{model}_seed{seed}" if lam is None else f"{model}_lambda{lam:g}_seed{seed}"

    def result_path(self, key):
        return os.path.join(self.runs_dir, key + ".json")

    def read_result(self, key, fields=None):
        """A result file, checked (check_result against `fields`, default the bench's), or None where there is none yet."""
        path = self.result_path(key)
        if not os.path.lexists(path):
            return None
        return check_result(files.read_json_object(path, "result file"), path, fields or self.result_fields)

    def unusable(self, model, seed, lam=None):
        """Why the result file of (model, seed, lambda) cannot stand in a table: "not there", "made with other
        settings" (another command or attack than this bench's), or None where it can."""
        r = self.read_result(self.key(model, seed, lam))
        if r is None:
            return "not there"
        return "made with other settings" if r["settings"] != json.loads(json.dumps(self.settings(model, seed, lam))) else None

    def result_extras(self, model):
        """What a result file records besides its numbers (a bench adds its own): which SBG fields, by
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

    def train(self, model, seed, lam=None):
        """The model's run folder with its checkpoint trained to the bench's epochs (resumed where it stopped; trained
        again where it is gone); refused if the folder was made with other settings. Returns (run folder, checkpoint,
        log, the checkpoint as read after training)."""
        key, want = self.key(model, seed, lam), self.settings(model, seed, lam)
        run_dir = self.run_dir(key)
        ckpt, log = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "run.log")
        run_settings = os.path.join(run_dir, "bench_settings.json")
        # The run folder is named without its settings: it says what it was made with, or it is not reused.
        made_with = recorded_settings(run_settings)
        if made_with != json.loads(json.dumps(want)) and (made_with is not None or os.path.exists(ckpt)):
            raise files.UserError(f"{run_dir} was made with other settings{'' if made_with else ' (or by an older bench)'}; "
                                  "delete it or pass another --out-dir")
        if made_with is None:
            files.write_json(want, run_settings)
        saved = read_classifier(ckpt)["epoch"] if os.path.exists(ckpt) else 0  # the checkpoint's, not metrics.jsonl's
        if saved < self.cfg.get("epochs", math.inf):
            sh(log, *self.command(model, seed, lam), "--out-dir", run_dir, *(["--resume"] if saved else []))
        return run_dir, ckpt, log, read_classifier(ckpt)

    def standard_check(self, model, seed, lam, out):
        """Is AutoAttack's APGD-CE + APGD-T (what the benches run) enough here? Both it and standard AutoAttack
        (FAB-T and the gradient-free Square added) on one model's checkpoint, at the bench's radii and test images;
        the checkpoint trained again with the bench's command where it is gone. Writes `out`, naming the checkpoint by
        its sha256, beside the model's result file's numbers. Returns the record."""
        run_dir, ckpt, log, _ = self.train(model, seed, lam)
        measured = {}
        for version in ("apgd", "standard"):
            path = os.path.join(run_dir, f"attack_{version}.json")
            if os.path.exists(path):
                os.remove(path)  # this call's numbers only
            sh(log, "attack.py", "--checkpoint", ckpt, "--measures", "clean", "aa-l2", "aa-linf", "--aa-version", version,
               "--eps-l2", self.cfg["eps_l2"], "--eps-linf", self.cfg["eps_linf"], "--eval-samples", self.cfg["test_samples"],
               "--seed", seed, "--out", path,
               *(["--aa-iterations", self.cfg["standard_iterations"]] if self.cfg.get("standard_iterations") else []))
            res = files.read_json_object(path, "attack results")
            measured[version] = {**Bench.measures(self, res), "checkpoint_sha256": res["checkpoint_sha256"]}
        key = self.key(model, seed, lam)
        result = self.read_result(key)
        record = {"model": model, "seed": seed, "lambda": lam, "checkpoint_sha256": measured["standard"]["checkpoint_sha256"],
                  "apgd": {"key": key, **{m: measured["apgd"][m] for m in ("clean", "aa_l2", "aa_linf")}},
                  "standard": {m: measured["standard"][m] for m in ("clean", "aa_l2", "aa_linf")},
                  "result_file": result and {m: result[m] for m in ("clean", "aa_l2", "aa_linf")},
                  "test_samples": self.cfg["test_samples"], "commit": git_commit(), "made": time.strftime("%Y-%m-%d %H:%M:%S")}
        files.write_json(record, out)
        a, s = record["apgd"], record["standard"]
        print(f"  standard AutoAttack on {key}: L2 {s['aa_l2']:.1%} (APGD {a['aa_l2']:.1%}), L-inf {s['aa_linf']:.1%} "
              f"(APGD {a['aa_linf']:.1%}) -> {os.path.relpath(out)}", flush=True)
        return record

    def train_and_attack(self, model, seed, lam=None):
        """Train (or resume), attack, align, and write the result file with every number of the model;
        skipped if the file is there, refused if it (or the run folder) was made with other settings."""
        key, want = self.key(model, seed, lam), self.settings(model, seed, lam)
        # An earlier bench's file may lack its SBG alignment (null): read, then made again below.
        old = self.read_result(key, {**self.result_fields, **({"align_sbg": RESULT_OPTIONAL["align_sbg"]}
                                                              if "align_sbg" in self.result_fields else {})})
        if old is not None:
            if old.get("settings") != want:
                raise files.UserError(f"{self.result_path(key)} was made with other settings; delete it (and "
                                      f"{self.run_dir(key)}) or pass another --results-dir and --out-dir")
            if not self.align or old.get("align_sbg") is not None:
                return
            # else: an earlier bench's file without its SBG alignment: made again (resumed where it can be)
        run_dir, ckpt, log, saved = self.train(model, seed, lam)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        done, data_sha256 = saved["epoch"], saved.get("data_sha256")  # what it was trained on, by content
        by_epoch = {m["epoch"]: m for m in read_metrics(metrics_path, done)}
        last = by_epoch[done]
        train_seconds = sum(m["seconds"] for m in by_epoch.values())  # the run's own epochs, over every resume
        start = time.time()
        res_path = os.path.join(run_dir, "attack_test.json")
        sh(log, *self.attack_command(ckpt, seed, res_path))
        measured = self.measures(files.read_json_object(res_path, "attack results"))
        if self.align:  # the held-out SBG alignment, so that a result file is complete when it lands
            self.sbg_done.wait()
            if not self.sbg_made:
                raise files.UserError(f"the SBG fields were not made ({self.fields['test']}): the sbg job failed (its error "
                                      "is printed above this one)")
            align_path = os.path.join(run_dir, "align_sbg_test.json")
            sh(log, "attack.py", "--checkpoint", ckpt, "--measures", "align", "--align-source", "sbg", "--sbg-file",
               self.fields["test"], "--align-split", "test", "--eval-samples", self.cfg["test_samples"], "--seed", seed,
               "--out", align_path)
            measured["align_sbg"] = files.read_json_object(align_path, "attack results")["align"]["sbg test"]["cos"]
        split = last["eval_split"]  # the per-epoch check's images: "val" (choices look there) or "test"
        pgd = next(k for k in last if k.startswith(f"{split}_pgd_l2_"))
        result = {"key": key, "model": model, "seed": seed, "lambda": lam, **self.result_extras(model), "settings": want,
                  "data_sha256": data_sha256,
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
                raise files.UserError(f"{ckpt} was made with other settings ({made_with}); delete {self.denoiser_dir} "
                                      "or pass another --results-dir")
        else:
            files.write_json(want, denoiser_settings)
        if not os.path.exists(ckpt) or read_denoiser(ckpt)["epoch"] < s["epochs"]:
            sh(log, "sbg.py", "train", *self.data_flags, "--epochs", s["epochs"], "--seed", s["seed"],
               "--out-dir", self.denoiser_dir, *(["--resume"] if os.path.exists(ckpt) else []))
        want_fields = {**want, "test_samples": self.cfg["test_samples"], "denoiser_sha256": files.file_sha256(ckpt)}
        settings_file = os.path.join(self.sbg_dir, "settings.json")
        if all(os.path.exists(p) for p in self.fields.values()):
            made_with = recorded_settings(settings_file)
            if made_with != want_fields:
                raise files.UserError(f"{self.sbg_dir} holds fields made with other settings or another denoiser "
                                      f"({made_with}); delete it or pass another --out-dir")
            return
        timestep = self.sbg_timestep(ckpt, log)
        for split in ("test", "train"):
            sh(log, "sbg.py", "export", *self.data_flags, "--checkpoint", ckpt, "--timestep", timestep,
               "--noise-draws", s["noise_draws"], "--split", split, "--eval-samples", self.cfg["test_samples"],
               "--seed", s["seed"], "--out", self.fields[split])
        files.write_json(want_fields, settings_file)

    def sbg_timestep(self, ckpt, log):
        """The noise level the fields are exported at (a bench may choose it by sbg.py's sweep: cifar10.py)."""
        return self.cfg["sbg"]["timestep"]

    def sbg_job(self):
        try:
            self.make_sbg()
            self.sbg_made = True
        finally:  # jobs waiting for the fields go on (and fail in one line if they are missing)
            self.sbg_done.set()

    def run(self):
        """Every row at every seed at its scripts' defaults (lambda included), the SBG fields first where a
        row needs them; returns the wall seconds."""
        jobs, needs, cost = {"sbg": self.sbg_job}, {}, {"sbg": math.inf}
        for s in self.cfg["seeds"]:
            for model in self.rows:
                name = f"{model} seed {s}"
                jobs[name] = lambda model=model, s=s: self.train_and_attack(model, s)
                needs[name] = {"sbg"} if "sbg" in self.models[model][1] else set()
                cost[name] = self.cost.get(model, 10)
        return run_jobs(jobs, needs, self.workers, cost)
