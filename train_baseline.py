"""Vanilla and adversarial training: the flags, the losses, and the classifier training loop (train_pag.py adds
its term to it through a Method).

    python train_baseline.py --dataset cifar10                 # paper settings: ResNet-18, 100 epochs
    python train_baseline.py --dataset cifar10 --adv pgd       # Madry PGD-AT (L-inf 8/255, 10 steps)
    python train_baseline.py --dataset fashion-mnist --epochs 5 --train-samples 20000

Writes OUT_DIR/model.pt atomically after every epoch (weights, optimiser, scheduler, RNG state and everything
attack.py needs: checkpoint.py) and one JSON line per epoch to OUT_DIR/metrics.jsonl. `--resume` continues an
interrupted run and ends exactly where an uninterrupted one would. One run per OUT_DIR at a time. Training
stops, keeping the last good checkpoint, if a loss or a weight stops being finite.
"""
import argparse
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import data as D
import files
from checkpoint import (CLASSIFIER, read_metrics, resume_checkpoint, check_resume_fits, save_checkpoint,
                        write_metrics)
from files import UserError
from models import ARCHS, PIXEL_MEAN, build_model, weights_problem
from pgd import attack_batch_size, check_perturbation, pgd, predict, robust_accuracy
from ranks import (check_same_settings, gather_states, leave_process_group, random_streams, setup_distributed,
                   shard_batches, wrap_for_ranks)

# The flags' defaults per dataset, where the paper says (README, docs/choices.md): unset flags take these, once,
# in resolve_settings. Weight decay follows the optimiser (1e-4 with SGD, 0 with Adam); augmentation (random crop,
# padding 4, + flip, per sample) is on where the table says, and "folder" (None) turns it on for images of 32 px
# or more (a 4-pixel shift is half of an 8-pixel image). Fashion-MNIST uses the recipe its benchmark measured to
# learn in few epochs (bench/NOTES.md); the toy its public re-run's.
_PAPER = dict(arch="resnet18", batch_size=64, optimizer="sgd", lr=0.01, lr_drops=[0.5, 0.75], augment=True)
TRAINING_DEFAULTS = {
    "cifar10": _PAPER, "cifar100": _PAPER, "synthetic": _PAPER,
    "stl10": dict(_PAPER, batch_size=32),
    "folder": dict(_PAPER, augment=None),
    "fashion-mnist": dict(_PAPER, arch="cnn", optimizer="adam", lr=1e-3, lr_drops=[], augment=False),
    "toy": dict(_PAPER, arch="mlp", batch_size=128, optimizer="adam", lr_drops=[], augment=False),
}


def add_common_args(p):
    """The flags of the training loop; unset ones take the dataset's defaults (TRAINING_DEFAULTS)."""
    p.add_argument("--dataset", default="cifar10", help=f"{', '.join(D.DATASETS)} (stl = stl10)")
    p.add_argument("--data-dir", default="data", help="where datasets live (folder: holds train/ and test/)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download a missing CIFAR-10/100, STL-10 or Fashion-MNIST, with progress (--no-download: "
                        "never, e.g. on an offline cluster: the error says what to fetch and where)")
    p.add_argument("--arch", choices=ARCHS, help="default: resnet18 (CIFAR, STL, folder), cnn (fashion-mnist), mlp (toy)")
    p.add_argument("--epochs", type=cli.positive_int, default=100, help="training epochs (the paper: 100)")
    p.add_argument("--batch-size", type=cli.positive_int, help="default: 64 (CIFAR, fashion-mnist, folder), 32 (STL), 128 (toy)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="default: sgd (paper), adam (fashion-mnist, toy)")
    p.add_argument("--lr", type=cli.learning_rate, help="default: 0.01 (paper, toy), 1e-3 (fashion-mnist)")
    p.add_argument("--momentum", type=cli.unit_interval, default=0.9, help="SGD only")
    p.add_argument("--weight-decay", type=cli.weight_decay, help="default: 1e-4 with SGD, 0 with Adam")
    p.add_argument("--lr-drops", type=cli.fractions, metavar="F1,F2",
                   help="lr is divided by 10 from the first epoch e >= F*epochs (counting from 1) of each fraction F, "
                        "and once more in the last epoch, as the official schedule (never in the first epoch); "
                        "default: 0.5,0.75 (paper), none (fashion-mnist, toy); '--lr-drops=' for none")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 4) + flip per sample; default: on for CIFAR, STL and folder images "
                        "of 32 px or more, off for fashion-mnist")
    p.add_argument("--seed", type=cli.seed, default=3407, help="the official configs' seed")
    p.add_argument("--data-seed", type=cli.seed, help="toy only: which draw of the data (default 0)")
    p.add_argument("--train-samples", type=cli.positive_int,
                   help="train on N training images: the first N of shuffled files, a fair sample of every class where "
                        "they are stored class by class (folder, toy); default: all")
    p.add_argument("--val-samples", type=cli.positive_int,
                   help="hold out N training images (a fixed random subset) as a validation split, never trained on; "
                        "the per-epoch evaluation then uses it instead of the test images (default: none)")
    p.add_argument("--eval-samples", type=cli.positive_int, default=1000,
                   help="per-epoch evaluation on N test images (validation images with --val-samples), taken as "
                        "--train-samples takes them")
    p.add_argument("--eval-eps", type=cli.radius, help="per-epoch PGD-L2 radius (default: the dataset's, 0.5 for CIFAR)")
    p.add_argument("--eval-steps", type=cli.positive_int, default=7, help="per-epoch PGD-L2 steps (step 1.5*eps/steps, as the official code)")
    p.add_argument("--adv", default="none", choices=("none", "pgd", "trades"), help="adversarial training: Madry PGD-AT or TRADES")
    p.add_argument("--adv-norm", default="linf", choices=("linf", "l2"), help="threat model of --adv")
    p.add_argument("--adv-eps", type=cli.radius, help="default: the dataset's eps (8/255 L-inf, 0.5 L2 for CIFAR; 0.1, 1.5 fashion-mnist)")
    p.add_argument("--adv-steps", type=cli.positive_int, default=10, help="PGD steps of --adv")
    p.add_argument("--adv-step-size", type=cli.step_size, help="default: 2.5*eps/steps (2/255 for 8/255 and 10 steps)")
    p.add_argument("--trades-beta", type=cli.loss_weight, default=6.0, help="weight of the TRADES KL term")
    p.add_argument("--amp", default="fp32", choices=("fp32", "bf16"),
                   help="training precision: fp32 (on a GPU, matmuls and convolutions use TF32 where it has it), "
                        "or bf16 autocast (losses and cosines stay in fp32)")
    p.add_argument("--image-size", type=cli.image_side, help="resize folder images / size of synthetic images")
    p.add_argument("--standardize", action="store_true",
                   help="toy only: standardise the points inside the model (mean 0, std 1 per coordinate of the "
                        "training points; attacks and radii stay in raw coordinates)")
    p.add_argument("--out-dir", help="default: runs/<baseline|pag_SOURCE>[_pgdat|_trades]_<dataset>_<arch>")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/model.pt")
    p.add_argument("--stop-after-epoch", type=cli.positive_int, help="exit after this epoch (time-limited jobs; continue with --resume)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if there is one")
    p.add_argument("--log-every", type=cli.positive_int, default=50, help="progress line every N batches (and at least every 10 s)")
    p.add_argument("--cache-dir", default="cache", help="where nearest-neighbour tables are cached")
    return p


class Settings(argparse.Namespace):
    """Every setting of a run, resolved once (resolve_settings) and read-only from then on: what the loop,
    the loss and the checkpoint read, what --resume compares, and what every rank must agree on."""

    def __init__(self, values):
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError(f"settings are resolved once (resolve_settings); {key} cannot change")




@dataclass(frozen=True)
class Method:
    """What a training script brings to the loop; the baseline's is BASELINE, train_pag.py's is PAG.
    name: the run's name, or a function of its settings; make_loss(settings, data) -> loss_fn(model, train_model,
    batch) -> (loss, logs); defaults(settings dict, data): fills the method's own unset flags; describe(settings,
    data): its part of the run's first line; check_epoch(metrics row, settings, data): a warning or None after each
    epoch; epochs_matter(recorded flags): whether its schedule depends on --epochs (then --resume cannot train longer).
    A loss_fn that reads files (train_pag.py's --sbg-file) names them by content in its attribute input_files_sha256
    ({flag: sha256 of the bytes it loaded}): the checkpoint records it and --resume refuses changed files."""
    name: object = "baseline"
    make_loss: Callable = None
    defaults: Callable = lambda s, data: None
    describe: Callable = lambda args, data: ""
    check_epoch: Callable = lambda row, args, data: None
    epochs_matter: Callable = lambda flags: False


def resolve_settings(args, data, method):
    """The one place where a training run's defaults are decided: every flag left unset (None) from the
    dataset's row of TRAINING_DEFAULTS, then the method's (train_pag.py's: source, lambda, k), then those that
    follow from other flags and from the loaded data (augmentation: a folder dataset knows its image size only
    once loaded), then the run's name and folder. Returns Settings."""
    s, row, facts = dict(vars(args), dataset=data.name), TRAINING_DEFAULTS[data.name], D.DATASETS[data.name]
    for key, value in row.items():
        if s.get(key, 0) is None:
            s[key] = list(value) if isinstance(value, list) else value
    for key, value in {"weight_decay": 1e-4 if s["optimizer"] == "sgd" else 0.0, "eval_eps": facts["eps_l2"],
                       "adv_eps": facts[f"eps_{s['adv_norm']}"]}.items():
        if s.get(key) is None:
            s[key] = value
    # --augment/--no-augment, else the table's: "folder" (None there) augments images of 32 px or more.
    augment = s["augment"] if s["augment"] is not None else data.input_shape[-1] >= 32
    s["augment"] = bool(augment and data.is_image)
    if s["standardize"] and data.is_image:
        raise UserError("--standardize is for the toy's points; image models normalise their pixels inside already")
    method.defaults(s, data)
    name = method.name(Settings(s)) if callable(method.name) else method.name
    if s["adv"] != "none":
        name += f"_{s['adv']}at" if s["adv"] == "pgd" else f"_{s['adv']}"
    s["run_name"] = name
    s["out_dir"] = s["out_dir"] or os.path.join("runs", f"{name}_{s['dataset']}_{s['arch']}")
    return Settings(s)


# ----------------------------------------------------------------------------- losses
def trades_kl(logits, p_clean):
    """Summed KL(p_clean || softmax(logits)): the TRADES regulariser and its attack's objective."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean.float(), reduction="sum")


def adversarial_loss(model, x, y, logits, args, box, generator, forward=None):
    """The adversarial-training loss for a batch (x clean, logits = model(x) or None).

    pgd:    CE(f(x_adv), y), x_adv = PGD on the CE (Madry et al.).
    trades: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / B, x_adv = PGD on that KL (Zhang et al.).
    The attack runs with the model in eval mode (batch-norm statistics neither used
    from nor written by the attack's batches), in fp32, and is checked to stay in its eps ball.
    `forward` (default model) runs the training forward of x_adv: the DDP wrapper under
    torchrun, so that only training passes, never the attack's, synchronise gradients.
    Returns (loss, adversarial logits).
    """
    kw = dict(norm=args.adv_norm, steps=args.adv_steps, step_size=args.adv_step_size, box=box, generator=generator)
    was_training = model.training
    model.eval()
    with torch.autocast(x.device.type, enabled=False):
        if args.adv == "pgd":
            x_adv = pgd(model, x, y, args.adv_eps, loss="ce", **kw)
        else:
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            x_adv = pgd(model, x, p_clean, args.adv_eps, loss=trades_kl, **kw)
    model.train(was_training)
    check_perturbation(x_adv, x, args.adv_eps, args.adv_norm, box, f"training attack ({args.adv})")
    adv_logits = (forward or model)(x_adv)
    if args.adv == "pgd":
        return F.cross_entropy(adv_logits.float(), y), adv_logits
    kl = trades_kl(adv_logits, F.softmax(logits.float(), dim=1)) / len(x)
    return F.cross_entropy(logits.float(), y) + args.trades_beta * kl, adv_logits


@dataclass
class Batch:
    """One training batch, as every loss function receives it."""
    x: torch.Tensor            # inputs after this batch's crop/flip, [B, ...]
    y: torch.Tensor            # labels [B]
    idx: torch.Tensor          # indices in the training set [B]
    x_clean: torch.Tensor      # inputs before crop/flip
    augment: Callable          # this batch's crop/flip for target fields [B, ..., H, W] (pads with 0)
    epoch: int                 # from 0
    step: int                  # batch number within the epoch, from 0
    generator: torch.Generator  # per-sample random draws (targets, attacks' starts)


def classification_loss(model, train_model, batch, logits, args, box):
    """The loss of a step without PAG: CE, or with --adv Madry's or TRADES' adversarial loss.

    logits: train_model(batch.x) if a caller already has them (PAG does), else None.
    Returns (loss, logs); logs (0-dim tensors) name each term, `ce` or `adv`, and the training accuracies.
    """
    if logits is None and args.adv != "pgd":  # Madry AT needs no clean forward
        logits = train_model(batch.x)
    if args.adv == "none":
        loss = F.cross_entropy(logits.float(), batch.y)
        logs = {"ce": loss.detach()}
    else:
        loss, adv_logits = adversarial_loss(model, batch.x.detach(), batch.y, logits, args, box, batch.generator,
                                            forward=train_model)
        logs = {"adv": loss.detach(), "adv_train_acc": (adv_logits.argmax(1) == batch.y).float().mean()}
    if logits is not None:
        logs["train_acc"] = (logits.argmax(1) == batch.y).float().mean()
    return loss, logs


def make_classification_loss(args, data):
    """train_baseline.py's loss: loss_fn(model, train_model, batch) -> (loss, logs)."""
    return lambda model, train_model, batch: classification_loss(model, train_model, batch, None, args, data.box)


BASELINE = Method(name="baseline", make_loss=make_classification_loss)
LOSS_TERMS = {"ce": "CE", "adv": "adversarial"}  # how a divergence names a logged term (others: upper case, "pag": PAG)


# ----------------------------------------------------------------------------- the loop
def train(args, method=BASELINE):
    """Train a classifier with the method's loss, called per batch as loss_fn(model, train_model, batch: Batch) ->
    (loss tensor, dict of numbers to log); model is the plain module, train_model the one to run training forwards
    through (the DDP wrapper under torchrun). Ctrl-C or SIGTERM (what clusters send before a kill) ends it with one
    line naming the last saved epoch and the command that continues it, exit status 130. Returns (model, data)."""
    rank, world, device = setup_distributed(args)
    if threading.current_thread() is threading.main_thread():  # as cli.run_cli does: train() is also called directly
        signal.signal(signal.SIGTERM, cli.raise_keyboard_interrupt)
    data = D.get_data(args.dataset, args.data_dir, args.download, args.train_samples, args.eval_samples,
                      args.image_size, args.data_seed, args.val_samples).to(device)
    args = resolve_settings(args, data, method)  # from here on, read-only
    if world > 1:
        check_same_settings(args, world)
    run = None
    try:
        with files.RunLock(args.out_dir) if rank == 0 else nullcontext():
            run = start(args, data, method, rank, world, device)  # model, optimiser, streams; --resume restores them
            for epoch in range(run.start_epoch, args.epochs):
                run.model.train()
                began, lr = time.time(), run.opt.param_groups[0]["lr"]
                # The last partial batch is dropped, as the official loader does; the toy keeps it (data.DATASETS).
                batches = shard_batches(run.order_gen, len(data.train_y), rank, world, args.batch_size,
                                        D.DATASETS[data.name]["drop_last"])
                progress = cli.Progress(f"epoch {epoch + 1}/{args.epochs}:", sum(map(len, batches)) * world, "img",
                                        args.log_every, print_fn=run.log)
                sums, seen = {}, 0
                for i, idx in enumerate(batches):
                    batch = make_batch(data, idx.to(data.train_x.device), args.augment, epoch, i, run.sample_gen)
                    loss, logs = train_step(run.model, run.train_model, run.opt, run.loss_fn, batch, args.amp)
                    seen += len(idx)
                    for k, v in {"loss": loss, **logs}.items():
                        sums[k] = sums.get(k, 0.0) + v * len(idx)
                    left = (time.time() - began) / (i + 1) * len(batches) * (args.epochs - epoch - 1)
                    progress(seen * world, f"loss {sums['loss'] / seen:.4f} ", later_seconds=left)
                run.sched.step()
                means = epoch_means(sums, seen, world)  # over every rank's images
                states = gather_states(run.sample_gen, world)  # every rank's random stream, for --resume
                if rank == 0:  # the others wait at the barrier
                    check_weights(run, epoch)
                    row = check_epoch(run, epoch, means, lr, time.time() - began)  # evaluated, printed, in metrics
                    warning = method.check_epoch(row, args, data)
                    if warning:
                        print(f"warning: {warning}", flush=True)
                    save_epoch(run, epoch, states)  # metrics.jsonl, then model.pt
                if world > 1:
                    dist.barrier()
                run.saved_epoch = epoch + 1  # every rank: the file holds it now
                if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and epoch + 1 < args.epochs:
                    run.log(f"stopping after epoch {epoch + 1} as asked; continue with: {resume_command()}")
                    break
            if run.start_epoch >= args.epochs:
                run.log(f"{run.ckpt_path} already finished {args.epochs} epochs")
    except KeyboardInterrupt:
        saved = run.saved_epoch if run is not None else 0
        where = f"{run.ckpt_path} holds epoch {saved} of {args.epochs}" if saved else "no epoch was saved"
        raise files.Interrupted(f"{where}; continue with: {resume_command()}" if saved else where) from None
    run.train_model = None  # the DDP wrapper holds the process group (and gloo's finished work)
    leave_process_group(world)
    run.log(f"done: {run.ckpt_path} holds epoch {run.saved_epoch} of {args.epochs}; evaluate it with: "
            f"{evaluate_command(run.ckpt_path, device)}")
    return run.model, run.data


@dataclass
class Run:
    """What a training run holds: made by start(), carried through the epochs."""
    args: argparse.Namespace
    data: D.Data
    model: torch.nn.Module        # the plain module: attacks, evaluation and checkpoints use it
    train_model: torch.nn.Module  # what training forwards go through: the DDP wrapper under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    order_gen: torch.Generator    # the data order: identical on every rank, which takes its own shard
    sample_gen: torch.Generator   # per-sample draws (crops/flips, PAG targets): one stream per rank
    loss_fn: Callable
    rank: int
    start_epoch: int = 0
    saved_epoch: int = 0          # the epoch OUT_DIR/model.pt holds
    input_files_sha256: dict = field(default_factory=dict)  # {flag: content hash} of files the loss reads
    metrics: list = field(default_factory=list)

    def log(self, *a, **k):
        if self.rank == 0:
            print(*a, **k)

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out_dir, "model.pt")

    @property
    def metrics_path(self):
        return os.path.join(self.args.out_dir, "metrics.jsonl")


def start(args, data, method, rank, world, device):
    """The run: model, optimiser, random streams and loss, restored from OUT_DIR/model.pt under --resume; prints
    its first line."""
    if len(data.train_y) // world < max(2, args.batch_size):
        raise UserError(f"{len(data.train_y)} training image(s) for {world} process(es) of batch {args.batch_size}: "
                        "each process needs one full batch (the last partial batch is dropped, as the official "
                        "loader does) of at least 2; lower --batch-size")
    D.use_dataset_precision(data.name)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.arch, data.num_classes, data.input_shape[0], data.input_shape[-1], args.standardize)
    except ValueError as e:  # e.g. vit on 28 px images
        raise UserError(f"--arch {args.arch} on {data.name} images of {data.input_shape[-1]} px: {e} (--image-size)") from None
    if args.standardize:  # from the training points, fixed from now on (saved with the weights)
        model[0].mean.copy_(data.train_x.mean(0))
        model[0].std.copy_(data.train_x.std(0))
    model = model.to(device, D.dataset_dtype(data.name))
    opt, sched = make_optimizer(model, args)
    loss_fn = method.make_loss(args, data)
    run = Run(args, data, model, wrap_for_ranks(model, world, device), opt, sched, *random_streams(args.seed, rank),
              loss_fn, rank, input_files_sha256=dict(getattr(loss_fn, "input_files_sha256", {})))
    if rank == 0:
        files.remove_stale_temporaries(args.out_dir, ("model.pt", "metrics.jsonl"))
    if args.resume:
        resume(run, method)
    elif os.path.exists(run.ckpt_path):
        raise UserError(f"{run.ckpt_path} exists; pass --resume to continue it or choose another --out-dir")
    run.log(first_line(args, data, method, model, world, device), flush=True)
    return run


def first_line(args, data, method, model, world, device):
    """What a run is, said once: model, data (with its per-class counts), schedule, precision, method, folder."""
    counts = lambda y: D.class_counts_text(y, data.num_classes, data.classes)  # noqa: E731
    _, eval_y = eval_images(data, args.eval_samples)
    adv = "" if args.adv == "none" else f", {args.adv} adversarial training ({args.adv_norm} eps {args.adv_eps:g})"
    procs = "" if world == 1 else f" x {world} processes (global batch {args.batch_size * world})"
    held_out = f", {len(data.val_y)} held out for validation" if data.val_y is not None else ""
    return (f"{args.run_name}: {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
            f"{data.name}, {len(data.train_y)} train images ({counts(data.train_y)}){held_out}, checked each epoch on "
            f"{len(eval_y)} {eval_split(data)} images ({counts(eval_y)}), {args.epochs} epoch{'s' * (args.epochs != 1)}, "
            f"batch {args.batch_size}{procs}, {args.optimizer} lr {args.lr:g}, {precision_text(data.name, args.amp)}, "
            f"augment {'on' if args.augment else 'off'}, device {device}{method.describe(args, data)}{adv}; "
            f"writing {args.out_dir}/")


def resume(run, method):
    """--resume: every state of the run as OUT_DIR/model.pt left it, and the metrics lines up to it."""
    path = run.ckpt_path
    ckpt = resume_checkpoint(path, run.args, "classifier",
                             epochs_matter=lambda flags: bool(flags.get("lr_drops")) or method.epochs_matter(flags))
    check_resume_fits(ckpt, run.data, run.args, path, "run", run.input_files_sha256)
    files.check_state_dict(run.model, ckpt["model"], path, CLASSIFIER)
    run.model.load_state_dict(ckpt["model"])
    try:  # the training state, already checked for its types: what is left is whether it fits this run
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        run.order_gen.set_state(ckpt["data_order_generator"])
        run.sample_gen.set_state(ckpt["sample_generators"][run.rank])
        torch.set_rng_state(ckpt["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: its optimiser or random state does not fit this run ({str(e).splitlines()[0][:120]})") from None
    run.start_epoch = run.saved_epoch = ckpt["epoch"]
    run.metrics = read_metrics(run.metrics_path, run.start_epoch) if run.rank == 0 else []
    run.log(f"resuming {run.ckpt_path} after epoch {run.start_epoch}")


# ----------------------------------------------------------------------------- one step, one epoch's end
def make_batch(data, idx, augment, epoch, step, generator):
    """The batch of training images idx, with one crop/flip drawn per sample when augmenting."""
    x_clean, y = D.to_float(data.train_x[idx]), data.train_y[idx]
    if not augment:
        return Batch(x_clean, y, idx, x_clean, lambda t: t, epoch, step, generator)
    offsets, flips = D.draw_crop_flip(len(idx), 4, generator)
    # The image pads with the model's 0 (mid-grey, as the official code's crop in [-1, 1]); fields with 0.
    return Batch(D.crop_flip(x_clean, offsets, flips, fill=PIXEL_MEAN), y, idx, x_clean,
                 lambda t: D.crop_flip(t, offsets, flips), epoch, step, generator)


def train_step(model, train_model, opt, loss_fn, batch, amp):
    """One optimisation step; returns (loss, logs) as floats. The loss function may back-propagate
    parts of itself (PAG does, to bound memory) and returns the rest with its graph."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss, logs = loss_fn(model, train_model, batch)
    # Every logged number in one transfer: the step's one wait for the GPU.
    numbers = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(())
                           for v in (loss.detach(), *logs.values())]).tolist()
    value, logs = numbers[0], dict(zip(logs, numbers[1:]))
    check_finite(value, logs, batch.epoch, batch.step)
    loss.backward()
    opt.step()
    return value, logs


def check_finite(loss, logs, epoch, batch):
    """Stop a diverged run before anything non-finite is stepped into the weights or saved."""
    if not math.isfinite(loss):
        bad = [LOSS_TERMS.get(k, k.upper()) for k, v in logs.items() if not k.endswith("_acc") and not math.isfinite(v)]
        raise UserError(f"training diverged at epoch {epoch + 1}, batch {batch + 1}: the {' and '.join(bad) or 'total'} "
                        f"loss is {loss}; nothing of this epoch was saved (lower --lr or the loss weights)")


def epoch_means(sums, seen, world):
    """The epoch's mean of every logged number, over all ranks' images."""
    if world > 1:
        totals = torch.tensor([seen, *sums.values()], dtype=torch.float64)
        dist.all_reduce(totals)
        seen, sums = totals[0].item(), dict(zip(sums, totals[1:].tolist()))
    return {k: v / seen for k, v in sums.items()}


def check_weights(run, epoch):
    if weights_problem(run.model, run.model.state_dict()):
        raise UserError(f"training diverged in epoch {epoch + 1}: weights are not finite; "
                        f"{run.ckpt_path} keeps the last good epoch ({epoch})")


def check_epoch(run, epoch, means, lr, train_seconds):
    """The per-epoch check (clean and PGD-L2 accuracy), printed and added to the metrics; returns its row."""
    args, start = run.args, time.time()
    clean, robust = evaluate(run.model, run.data, args, epoch)
    split = eval_split(run.data)
    run.metrics.append({"epoch": epoch + 1, **means, "eval_split": split, f"{split}_acc": clean,
                        f"{split}_pgd_l2_{args.eval_eps:g}_acc": robust, "lr": lr, "train_seconds": train_seconds,
                        "seconds": train_seconds + time.time() - start})
    print(f"epoch {epoch + 1}: loss {means['loss']:.4f} {split} acc {clean:.2%} pgd-l2({args.eval_eps:g}) "
          f"acc {robust:.2%} [{run.metrics[-1]['seconds']:.0f}s]", flush=True)
    return run.metrics[-1]


def save_epoch(run, epoch, sample_states):
    """Metrics first, then the checkpoint: a crash in between leaves a line that --resume drops."""
    write_metrics(run.metrics_path, run.metrics)
    save_checkpoint(run.ckpt_path, run.model, run.opt, run.sched, run.order_gen, sample_states, run.args, run.data,
                    epoch + 1, run.input_files_sha256)
    run.saved_epoch = epoch + 1  # at once: an interrupt during the print below must name this epoch
    if epoch == run.start_epoch:
        print(f"wrote {run.ckpt_path} and {run.metrics_path} (updated every epoch)", flush=True)


def eval_split(data):
    """Where the per-epoch check looks: the validation split if one is held out, else the test images."""
    return "val" if data.val_x is not None else "test"


def eval_images(data, n):
    """The per-epoch check's images: n of eval_split(data), as a subset takes them (a fair sample of every class where
    the data are stored class by class; the whole split in its order when n covers it)."""
    x, y = data.split(eval_split(data))
    keep = D.subset_indices(data.name, y, n).to(y.device)
    return x[keep], y[keep]


def evaluate(model, data, args, epoch):
    """Clean accuracy and PGD-L2 accuracy (the official per-epoch check) on --eval-samples images of
    eval_split(data) (eval_images)."""
    model.eval()
    x, y = eval_images(data, args.eval_samples)
    x = D.to_float(x)
    clean = (predict(model, x) == y).float().mean().item()
    gen = torch.Generator().manual_seed(args.seed + epoch)  # same noise on every (re)run of this epoch
    robust = robust_accuracy(model, x, y, args.eval_eps, "l2", data.box, batch_size=attack_batch_size(data),
                             steps=args.eval_steps,
                             step_size=1.5 * args.eval_eps / max(args.eval_steps, 1), generator=gen)
    return clean, robust


# ----------------------------------------------------------------------------- the schedule, and what a run says
def lr_milestones(epochs, drops):
    """0-based epochs from which the lr is divided by 10 once more, as the official adjust_learning_rate:
    1-based epoch e runs at lr * 0.1 ** #{f in drops: e >= f * epochs}, and the last epoch once more
    (100 epochs, drops 0.5, 0.75: lr for epochs 1-49, lr/10 for 50-74, lr/100 for 75-99, lr/1000 in
    epoch 100). Never before the first epoch ends, so that a 1-epoch run trains at lr."""
    if not drops:
        return []
    starts = [math.ceil(f * epochs - 1e-9) - 1 for f in drops] + [epochs - 1]
    return sorted(max(1, s) for s in starts if epochs > 1)


def make_optimizer(model, args):
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # MultiStepLR counts repeated milestones: [1, 1, 1] divides by 1000 from epoch index 1.
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(args.epochs, args.lr_drops), gamma=0.1)


def precision_text(name, amp):
    """How a run computes, for its first line: the toy's float64 on one thread, else --amp."""
    row = D.DATASETS[name]
    if row["dtype"] != "float32":
        return f"{row['dtype']}" + (f" on {row['threads']} thread{'s' * (row['threads'] != 1)}" if row["threads"] else "")
    return amp


def evaluate_command(ckpt_path, device):
    """The attack.py command a finished run suggests, shell-quoted, with what it costs where there is no GPU."""
    script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack.py"))  # from where we run
    cmd = shlex.join(["python", script, f"--checkpoint={ckpt_path}", "--measures", "clean", "aa-l2", "aa-linf", "align"])
    if device.type == "cuda":
        return cmd
    return (f"{cmd}   (standard AutoAttack on 1,000 test images is slow on a CPU, minutes per norm for the small cnn "
            "and far longer for a resnet18, bench/README.md; add --aa-version apgd --eval-samples 200 for a quick look)")


def resume_command():
    """This run's command line with --resume: what continues it after an interruption. Under torchrun, the
    launcher too (a run of N processes resumes only with N: resume_checkpoint refuses another count)."""
    argv = list(sys.argv)
    cmd = [*argv, *([] if "--resume" in argv else ["--resume"])]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if world == 1:
        return shlex.join(["python", *cmd])
    nodes = world // local if local and world % local == 0 else None
    if nodes == 1:
        return shlex.join(["torchrun", "--nproc_per_node", str(world), *cmd])
    return (shlex.join(["torchrun", "--nnodes", str(nodes or "N"), "--nproc_per_node", str(local or "N"), *cmd])
            + f"   (with your launch's rendezvous flags: {world} processes in all)")


def main(argv=None):
    p = add_common_args(cli.Parser(description=__doc__))
    train(p.parse_args(argv))


if __name__ == "__main__":
    cli.run_cli(main)
