"""The checkpoint format, the project's one: model.pt (save_checkpoint writes it, read_classifier reads it back
checked, load_checkpoint rebuilds its model, resume_checkpoint takes it for --resume), sbg.py's denoiser.pt in the
same format (save_denoiser, read_denoiser), what --resume must find unchanged (check_resume_fits), whether data fits it
(check_data_fits: dataset, classes, shape, and content), and metrics.jsonl beside it. Every training script
writes through here; attack.py, sbg.py and the benches read through here.
"""
import json
import math
import os

import torch

import data as D
import sources as S
import files
from files import UserError
from models import ARCHS, build_model

# Flags that may differ between a run and its --resume (everything else must match).
RESUME_MAY_CHANGE = {"resume", "stop_after_epoch", "device", "out_dir", "log_every", "data_dir", "download", "cache_dir"}
CHECKPOINT_FORMAT = 5  # bumped when the fields of model.pt change (3: official parameter names; 4: data_order_generator;
# 5: the data by content, with the training subset (data_sha256), and the loss's input files by content)


def save_checkpoint(path, model, opt, sched, order_gen, sample_gen_states, args, data, epoch, input_files_sha256=None):
    """model.pt: the one schema, read back (and checked) by read_checkpoint and load_checkpoint. data_sha256: the
    content of the data it was trained on (data.Data.sha256); input_files_sha256: {flag: content hash} of the
    files the loss reads (train_pag.py's --sbg-file), which --resume must find unchanged."""
    _write(path, "classifier", model, opt, order_gen, sample_gen_states, args, data, epoch,
           scheduler=sched.state_dict(), torch_rng=torch.get_rng_state(), arch=args.arch, dataset=args.dataset,
           classes=list(data.classes) if data.classes else None, input_files_sha256=input_files_sha256 or {},
           pag_source=getattr(args, "source", None))  # None: no PAG term (baseline or adversarial training)


def save_denoiser(path, net, opt, order_gen, sample_gen_states, args, data, epoch):
    """sbg.py's denoiser.pt: the same format (and version) as model.pt, kind "sbg-denoiser", read by read_denoiser."""
    _write(path, "sbg-denoiser", net, opt, order_gen, sample_gen_states, args, data, epoch, dataset=data.name)


def _write(path, kind, net, opt, order_gen, sample_gen_states, args, data, epoch, **own):
    """The format's one writer: what every checkpoint holds (weights, optimiser, random streams, epoch, settings,
    the data's shape and content), then the kind's `own` fields."""
    files.atomic_write(path, {
        "format": CHECKPOINT_FORMAT, "kind": kind, "model": net.state_dict(), "optimizer": opt.state_dict(),
        "data_order_generator": order_gen.get_state(), "sample_generators": sample_gen_states, "epoch": epoch,
        "args": vars(args), "num_classes": data.num_classes, "input_shape": tuple(data.input_shape),
        "data_sha256": data.sha256, **own,
    })


def _optional(check):
    return lambda v: v is None or check(v)


_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
_hashes = lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) for k, h in v.items())  # noqa: E731
_rng_state = lambda v: torch.is_tensor(v) and v.dtype == torch.uint8 and v.dim() == 1  # noqa: E731
# What every classifier checkpoint holds (attack.py needs these), what --resume needs besides, and the
# training flags attack.py reads back to rebuild the data, each with its check.
CLASSIFIER_FIELDS = {
    "model": dict, "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "arch": lambda v: v in ARCHS, "dataset": lambda v: v in D.DATASETS,
    "num_classes": lambda v: _count(v) and v >= 2, "pag_source": _optional(lambda v: v in S.SOURCES),
    "input_shape": lambda v: isinstance(v, (tuple, list)) and len(v) in (1, 3) and all(_count(d) for d in v),
    "classes": _optional(lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v)),
    "args": dict,
}
RESUME_FIELDS = {"optimizer": dict, "scheduler": dict, "data_order_generator": _rng_state, "torch_rng": _rng_state,
                 "sample_generators": lambda v: isinstance(v, list) and len(v) >= 1 and all(map(_rng_state, v))}
DATA_ARGS = {"data_dir": str, "download": bool, "epochs": _count, "seed": int, "train_samples": _optional(_count),
             "val_samples": _optional(_count), "image_size": _optional(_count), "data_seed": _optional(lambda v: isinstance(v, int))}


def read_checkpoint(path, kind, what, fields=None, loaded=None):
    """A checkpoint of `kind`, loaded without running code (or `loaded` already), checked for its
    format and for `fields` (files.require: each key's presence and type or value)."""
    ckpt = files.load_file(path, what) if loaded is None else loaded
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise UserError(f"{path} is not a {what}")
    if ckpt.get("format") not in (3, 4, CHECKPOINT_FORMAT):
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}, this code reads 3 to {CHECKPOINT_FORMAT}")
    if ckpt["format"] == 3 and "generator" in ckpt:  # format 3 called the data-order generator "generator"
        ckpt["data_order_generator"] = ckpt.pop("generator")
    return files.require(ckpt, fields or {}, path, what)


CLASSIFIER = "checkpoint of train_baseline.py / train_pag.py"
DENOISER = "denoiser checkpoint of sbg.py train"
_small = lambda v: _count(v) and v <= 100_000  # noqa: E731
DENOISER_FIELDS = {"model": dict, "epoch": lambda v: isinstance(v, int) and v >= 0, "dataset": lambda v: v in D.DATASETS,
                   "num_classes": _small, "args": dict,
                   "input_shape": lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(map(_small, v))}


def read_denoiser(path, resume=False):
    """A denoiser checkpoint with every field its readers use checked (its width and schedule included)."""
    ckpt = read_checkpoint(path, "sbg-denoiser", DENOISER, {**DENOISER_FIELDS, **({k: RESUME_FIELDS[k] for k in (
        "optimizer", "data_order_generator", "sample_generators")} if resume else {})})
    files.require(ckpt["args"], {"width": lambda v: _small(v) and v % 8 == 0, "timesteps": _small}, path, DENOISER)
    return files.require(ckpt, {k: _optional(_hashes) for k in ("data_sha256",) if k in ckpt}, path, DENOISER)



def read_classifier(path, resume=False, loaded=None):
    """A classifier checkpoint with every field its readers use checked, its training flags included,
    and its epoch within its run's epochs."""
    ckpt = read_checkpoint(path, "classifier", CLASSIFIER, {**CLASSIFIER_FIELDS, **(RESUME_FIELDS if resume else {})}, loaded)
    files.require(ckpt, {k: _optional(_hashes) for k in ("data_sha256", "input_files_sha256") if k in ckpt}, path, CLASSIFIER)
    files.require(ckpt["args"], DATA_ARGS, path, "checkpoint's training flags")
    if ckpt["epoch"] > ckpt["args"]["epochs"]:
        raise UserError(f"{path}: epoch {ckpt['epoch']} of a {ckpt['args']['epochs']}-epoch run is not valid")
    return ckpt


def build_for(ckpt, path):
    """The model a checkpoint's fields describe (not yet loaded), in its dataset's precision."""
    shape = ckpt["input_shape"]
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], shape[0], shape[-1] if len(shape) == 3 else None,
                            ckpt["args"].get("standardize", False))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return model.to(D.dataset_dtype(ckpt["dataset"]))


def load_checkpoint(path, device="cpu", loaded=None):
    """Rebuild the model of a model.pt: (model in eval mode, checkpoint dict). Refuses, in one line,
    files that are not our checkpoints, fields that are missing or wrong, and weights that do not
    fit the model exactly (keys, shapes, dtypes) or are not finite."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")  # a run folder
    ckpt = read_classifier(path, loaded=loaded)
    model = build_for(ckpt, path)
    files.check_state_dict(model, ckpt["model"], path, CLASSIFIER)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def check_data_fits(ckpt, data, path, what="model"):
    """Refuse data that is not what a checkpoint's network (a classifier, or sbg.py's denoiser) was trained
    on: its dataset, its classes (count, and names where both know them), its input shape, and (for files
    that record it) the content of each split, images and labels. A class folder added since, another
    dataset, a forgotten --dataset / --image-size, or a folder whose files or labels changed (two classes
    swapped) would be scored, trained or turned into fields with labels or pixels that mean something else."""
    names, known = (list(data.classes) if data.classes else None), ckpt.get("classes")
    if data.name != ckpt["dataset"] or data.num_classes != ckpt["num_classes"] or \
            (known is not None and names != list(known)) or tuple(data.input_shape) != tuple(ckpt["input_shape"]):
        raise UserError(f"{path}: this {what} was trained on {ckpt['dataset']} {tuple(ckpt['input_shape'])} with "
                        f"{ckpt['num_classes']} classes{f' {list(known)}' if known else ''}, not {data.name} "
                        f"{tuple(data.input_shape)} with {data.num_classes}{f' {names}' if names else ''}: pass its "
                        "--dataset (and --image-size)")
    files.require(ckpt, {"data_sha256": _optional(_hashes)} if "data_sha256" in ckpt else {}, path, what)
    recorded = ckpt.get("data_sha256") or {}
    for split in ("train", "test", *(("train_used",) if what == "run" else ())):
        if recorded.get(split) and data.sha256 and recorded[split] != data.sha256[split]:
            if split == "train_used":  # the whole split is the same: the flags now select other images of it
                raise UserError(f"{path}: this run trained on other training images than --train-samples and "
                                "--val-samples select now (a subset chosen by another version of the code); start a "
                                "new run")
            where = f" under {os.path.join(data.origin, split)}" if data.origin else ""  # the folder read now
            raise UserError(f"{path}: this {what} was made with other {split} data than these{where}: their images or "
                            f"labels changed since (content sha256 {recorded[split][:12]}... then, "
                            f"{data.sha256[split][:12]}... now); use the data it was made with")


def resume_checkpoint(path, args, kind, may_change=RESUME_MAY_CHANGE, epochs_matter=None):
    """For --resume: the checkpoint at path, refusing one made with other settings (both trainers). epochs_matter
    (recorded flags) -> whether a schedule depends on --epochs (lr drops, PAG's lambda step); where none does, a
    run may be continued for longer (a larger --epochs)."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    ckpt = read_classifier(path, resume=True) if kind == "classifier" else read_denoiser(path, resume=True)
    old, new = ckpt.get("args", {}), vars(args)
    may_change = may_change | set(ckpt.get("input_files_sha256") or {})  # files compared by content may move
    if epochs_matter is not None and not epochs_matter(old) and new.get("epochs", 0) >= ckpt["epoch"]:
        may_change = may_change | {"epochs"}  # no schedule depends on them: a run may be continued for longer
    changed = sorted(k for k in set(old) | set(new) if k not in may_change and old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        hint = "; the lr schedule (or lambda's) depends on them: start a new run to train longer" if k == "epochs" else ""
        raise UserError(f"--resume: --{k.replace('_', '-')} was {old.get(k)!r} in {path}, now {new.get(k)!r}{hint}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(ckpt["sample_generators"]) != world:
        raise UserError(f"--resume: {path} was written by {len(ckpt['sample_generators'])} process(es), this run has {world}")
    return ckpt


def check_resume_fits(ckpt, data, args, path, what, input_files_sha256=None):
    """For --resume (both trainers): the data is the checkpoint's (check_data_fits), the subset --train-samples takes
    is the one it trained on, and every file the loss read (input_files_sha256, {flag: content hash}) is unchanged."""
    check_data_fits(ckpt, data, path, what)
    cut = getattr(args, "train_samples", None)
    if ckpt["format"] < 5 and D.DATASETS[data.name]["order"] == "by class" and cut is not None \
            and cut <= len(data.train_y):  # the flag cut the set, and format 5 chose that cut otherwise (fairly)
        raise UserError(f"--resume: {path} was made before subsets of data stored class by class were fair samples of "
                        "every class: --train-samples now selects other images; start a new run")
    for flag, sha in (ckpt.get("input_files_sha256") or {}).items():
        now = (input_files_sha256 or {}).get(flag)
        if now != sha:
            raise UserError(f"--resume: the file of --{flag.replace('_', '-')} is not the one {path} was trained with "
                            f"(content sha256 {sha[:12]}... then, {(now or 'none')[:12]}... now): its contents changed "
                            "(exported again?); start a new run, or restore that file")


def read_metrics(path, last_epoch):
    """metrics.jsonl's lines up to last_epoch (later ones were written before a crash), each checked:
    a JSON object with an integer epoch, in order, and only finite numbers (they are written again)."""
    if not os.path.lexists(path):
        return []
    files.regular_file(path, "metrics file")
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        numbers_ok = isinstance(row, dict) and all(math.isfinite(v) for v in row.values()
                                                   if isinstance(v, float))
        if not numbers_ok or not isinstance(row.get("epoch"), int) or row["epoch"] != n:
            raise UserError(f"{path} line {n} is not a valid metrics line (epoch {n}, finite numbers); "
                            "repair or delete the file")
        rows.append(row)
    return [r for r in rows if r["epoch"] <= last_epoch]


def write_metrics(path, rows):
    """The whole file, atomically (it is small): never a torn line."""
    files.atomic_write(path, text="".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
