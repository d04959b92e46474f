"""Vanilla training: the project's one training loop (train_pag.py adds its term to it).

    python train_baseline.py --dataset cifar10                 # paper settings: ResNet-18, 100 epochs
    python train_baseline.py --dataset cifar10 --adv pgd       # Madry PGD-AT (L-inf 8/255, 10 steps)
    python train_baseline.py --dataset fashion-mnist --epochs 5 --train-samples 20000

Writes OUT_DIR/model.pt atomically after every epoch (weights, optimiser,
scheduler, RNG state and everything attack.py needs) and one JSON line per
epoch to OUT_DIR/metrics.jsonl. `--resume` continues an interrupted run and ends
exactly where an uninterrupted one would. One run per OUT_DIR at a time.
Training stops, keeping the last good checkpoint, if a loss or a weight stops
being finite. This file also holds the project's one PGD (adversarial training
uses it, and attack.py evaluates with it).
"""
import argparse
import gc
import json
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
from torch.nn.parallel import DistributedDataParallel

import cli
import data as D
import files
from files import UserError
from models import ARCHS, PIXEL_MEAN, build_model, weights_problem

# Flags that may differ between a run and its --resume (everything else must match).
RESUME_MAY_CHANGE = {"resume", "stop_after_epoch", "device", "out_dir", "log_every", "data_dir", "download", "cache_dir"}
CHECKPOINT_FORMAT = 4  # bumped when the fields of model.pt change (3: official parameter names; 4: data_order_generator)


def add_common_args(p):
    """The flags of the training loop; unset ones take the dataset's defaults (data.DATASETS)."""
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
    p.add_argument("--train-samples", type=cli.positive_int, help="train on the first N training images (default: all)")
    p.add_argument("--val-samples", type=cli.positive_int,
                   help="hold out N training images (a fixed random subset) as a validation split, never trained on; "
                        "the per-epoch evaluation then uses it instead of the test images (default: none)")
    p.add_argument("--eval-samples", type=cli.positive_int, default=1000,
                   help="per-epoch evaluation on the first N test images (validation images with --val-samples)")
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


def resolve_settings(args, data, run_name):
    """The one place where a training run's defaults are decided: every flag left unset (None) from the
    dataset's row of data.DATASETS, then the architecture's row of data.ARCH_DEFAULTS, then those that follow
    from other flags and from the loaded data (augmentation, PAG's k and lambda: a folder dataset knows its
    classes and image size only once loaded), then the run's name and folder. run_name: a name, or a
    function of the resolved settings (train_pag.py's names its source). Returns Settings."""
    s, row = dict(vars(args), dataset=data.name), D.DATASETS[data.name]

    def fill(values):
        for key, value in values.items():
            if s.get(key, 0) is None:
                s[key] = list(value) if isinstance(value, list) else value
    pag = "pag_coeff" in s  # train_pag.py's flags
    if pag and s["source"] is None and s["sbg_file"]:
        s["source"] = "sbg"  # fields given: the paper's best source
    fill(row)
    fill({k: v for k, v in D.ARCH_DEFAULTS[s["arch"]].items() if k != "pag_coeff"})
    fill({"weight_decay": 1e-4 if s["optimizer"] == "sgd" else 0.0, "eval_eps": row["eps_l2"],
          "adv_eps": row[f"eps_{s['adv_norm']}"]})
    # --augment/--no-augment, else the table's: "folder" (None there) augments images of 32 px or more.
    augment = s["augment"] if s["augment"] is not None else row["augment"] if row["augment"] is not None \
        else data.input_shape[-1] >= 32
    s["augment"] = bool(augment and data.is_image)
    if s["standardize"] and data.is_image:
        raise UserError("--standardize is for the toy's points; image models normalise their pixels inside already")
    if pag:
        fill({"targets_per_image": min(data.num_classes, 10), "pag_coeff": D.pag_coeff_default(s["arch"], data.num_classes, data.name)})
        if not 1 <= s["targets_per_image"] <= data.num_classes:
            raise UserError(f"--targets-per-image must be in 1..{data.num_classes}, got {s['targets_per_image']}")
    name = run_name(Settings(s)) if callable(run_name) else run_name
    if s["adv"] != "none":
        name += f"_{s['adv']}at" if s["adv"] == "pgd" else f"_{s['adv']}"
    s["run_name"] = name
    s["out_dir"] = s["out_dir"] or os.path.join("runs", f"{name}_{s['dataset']}_{s['arch']}")
    return Settings(s)


# ----------------------------------------------------------------------------- devices
def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def check_amp(amp, device):
    """Refuse bf16 on a GPU without bf16 arithmetic (compute capability < 8.0: V100, T4), where
    autocast would emulate it slowly or fail deep inside a kernel."""
    if amp == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--amp bf16 needs a GPU with bf16 arithmetic (compute capability >= 8.0, e.g. A100, H100); "
                        f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --amp fp32")


def setup_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process (LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = pick_device(args.device)
    else:
        use_cuda = args.device != "cpu" and torch.cuda.is_available()
        if args.device == "cuda" and not use_cuda:
            raise UserError("--device cuda asked for, but no CUDA device is available")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    check_amp(getattr(args, "amp", "fp32"), device)
    if device.type == "cuda":  # fp32 on tensor cores (TF32) for matmuls too; PyTorch does it for convolutions already
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return (dist.get_rank() if world > 1 else 0), world, device


def check_same_settings(args, world):
    """Under torchrun: every rank resolved the same settings, or every rank stops with the same one line
    naming the first flag that differs (ranks with another --lr would train a silent mixture, another
    --epochs would hang in a collective)."""
    mine = {k: json.dumps(v, sort_keys=True, default=str) for k, v in vars(args).items()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in set(mine) | set(theirs) if everyone[0].get(k) != theirs.get(k))
        if differ:
            k = differ[0]
            dist.destroy_process_group()
            raise UserError(f"the processes were started with different settings: --{k.replace('_', '-')} is "
                            f"{everyone[0].get(k)} on rank 0 but {theirs.get(k)} on rank {rank}; start every "
                            "process with the same flags")


def random_streams(seed, rank):
    """(the data order: the same permutation on every rank, which takes its own shard; per-sample draws:
    one stream per rank). Both trainers' two generators, saved in their checkpoints for --resume."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed * 1000 + 1 + rank)


def wrap_for_ranks(model, world, device):
    """What training forwards go through: the DDP wrapper under torchrun, else the model itself."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model


def shard_batches(order_gen, n, rank, world, batch_size, drop_last):
    """This rank's batches of an epoch: one permutation of n, cut into equal shards (every rank takes as many
    steps), then into batches; drop_last drops a last partial batch."""
    order = torch.randperm(n, generator=order_gen)
    shard = order[: n - n % world][rank::world]
    return [b for b in shard.split(batch_size) if len(b) == batch_size or not drop_last]


def gather_states(generator, world):
    """Every rank's generator state (for the checkpoint: --resume restores each rank's own stream)."""
    states = [generator.get_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, generator.get_state())
    return states


def leave_process_group(world):
    """Under torchrun, once the DDP wrapper is dropped: free it, so that the group is really gone before the
    interpreter shuts down (else gloo's threads can abort the process at exit), then leave the group."""
    if world > 1:
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- PGD, the project's one
def per_sample_norm(t):
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def project(delta, eps, norm):
    """Project perturbations onto the eps ball of `norm` ("l2" or "linf")."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def random_in_ball(shape, eps, norm, generator=None):
    """Uniform sample from the eps ball (L-inf: a cube; L2: direction x eps*u^(1/d))."""
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator)
    direction = direction / per_sample_norm(direction).clamp_min(1e-12)
    d = math.prod(shape[1:])
    radius = eps * torch.rand(shape[0], generator=generator) ** (1.0 / d)
    return direction * radius.view(-1, *[1] * (len(shape) - 1))


def attack_loss(logits, y, loss="ce"):
    """Summed per-sample loss that an untargeted attack ascends: "ce", "margin"
    (max_{j != y} z_j - z_y, Carlini-Wagner), whose gradient never saturates, or
    a function loss(logits, y) -> scalar (TRADES passes its KL to the clean prediction)."""
    if callable(loss):
        return loss(logits, y)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return (logits.scatter(1, y[:, None], float("-inf")).amax(1) - z_y).sum()


def pgd(model, x, y, eps, norm="l2", steps=10, step_size=None, targeted=False, random_start=True,
        box=(0.0, 1.0), generator=None, loss="ce"):
    """Projected gradient descent; returns x_adv (detached).

    Untargeted: ascend the loss (CE or margin, see attack_loss) at label y.
    Targeted: y holds the target classes and PGD descends it toward them. On a
    very confident model CE saturates (softmax == 1 in float32) and its
    gradient is rounding noise: measured on a tiny synthetic model, CE-PGD left
    33% robust at L2 eps 8 where margin-PGD left 0%. L2 steps follow the per-sample normalised
    gradient, L-inf steps its sign; every iterate is projected onto the eps
    ball around x and clipped to `box` (None: unbounded, e.g. the 2-D toy).
    step_size defaults to 2.5 * eps / steps (Madry et al.). The caller chooses
    the model's mode (eval for evaluation and for crafting training attacks).
    Needs per_sample_norm, project, random_in_ball and attack_loss (above); torch only.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    clip = (lambda t: t.clamp(*box)) if box is not None else (lambda t: t)
    delta = torch.zeros_like(x)
    if random_start and eps > 0:
        delta = random_in_ball(x.shape, eps, norm, generator).to(x)
    x_adv = clip(x + delta)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Summed per-sample losses: each sample's gradient is its own (model in eval mode).
        (grad,) = torch.autograd.grad(attack_loss(model(x_adv), y, loss), x_adv)
        if targeted:
            grad = -grad
        if norm == "linf":
            step = step_size * grad.sign()
        else:
            step = step_size * grad / per_sample_norm(grad).clamp_min(1e-12)
        x_adv = clip(x + project(x_adv.detach() + step - x, eps, norm))
    return x_adv.detach()


def check_perturbation(x_adv, x, eps, norm, box, name):
    """Refuse to count adversarial examples outside their eps ball or the input box, or not finite
    (a point the model cannot classify would silently count as robust or not)."""
    if not bool(torch.isfinite(x_adv).all()):
        raise UserError(f"{name}: the attack produced non-finite inputs at eps {eps:g}; a radius or step this "
                        "large overflows float32 here")
    dist_ = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    if (dist_ > eps * (1 + 1e-4) + 1e-6).any():
        raise RuntimeError(f"{name}: perturbation of {dist_.max().item():.6g} exceeds eps {eps:g} ({norm})")
    if box is not None and ((x_adv < box[0] - 1e-6).any() or (x_adv > box[1] + 1e-6).any()):
        raise RuntimeError(f"{name}: adversarial example leaves the input box {box}")


@torch.no_grad()
def predict(model, x, batch_size=500):
    return torch.cat([model(x[i: i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def runner_up(model, x, y):
    """The most likely wrong class for each point (the target of a 'runner-up' attack)."""
    with torch.no_grad():
        logits = model(x)
    return logits.scatter(1, y[:, None], float("-inf")).argmax(1)


def robust_mask(model, x, y, eps, norm, box, batch_size=250, target="none", progress=None, **pgd_kwargs):
    """Per point: classified right both clean and under PGD (adversarial examples checked in the eps ball).

    target: "none" (untargeted PGD), "runner-up" (targeted toward each point's
    most likely wrong class) or a class index. Either way a point counts as
    robust only if the attacked input still gets its true label.
    """
    masks = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], y[i: i + batch_size]
        if target == "none":
            x_adv = pgd(model, xb, yb, eps, norm, box=box, **pgd_kwargs)
        else:
            tb = runner_up(model, xb, yb) if target == "runner-up" else torch.full_like(yb, int(target))
            x_adv = pgd(model, xb, tb, eps, norm, targeted=True, box=box, **pgd_kwargs)
        check_perturbation(x_adv, xb, eps, norm, box, f"pgd-{norm}")
        with torch.no_grad():
            masks.append((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb))
        if progress:
            progress(min(i + batch_size, len(x)))
    return torch.cat(masks)


def robust_accuracy(*args, **kwargs):
    """Fraction of points that robust_mask counts as robust."""
    return robust_mask(*args, **kwargs).float().mean().item()


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


LOSS_TERMS = {"ce": "CE", "adv": "adversarial", "pag": "PAG"}  # the logged terms a divergence can name


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, opt, sched, order_gen, sample_gen_states, args, data, epoch, input_files_sha256=None):
    """model.pt: the one schema, read back (and checked) by read_checkpoint and load_checkpoint. data_sha256: the
    content of the data it was trained on (data.Data.sha256); input_files_sha256: {flag: content hash} of the
    files the loss reads (train_pag.py's --sbg-file), which --resume must find unchanged."""
    files.atomic_write(path, {
        "format": CHECKPOINT_FORMAT, "kind": "classifier",
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "data_order_generator": order_gen.get_state(), "sample_generators": sample_gen_states,
        "torch_rng": torch.get_rng_state(), "epoch": epoch,
        "arch": args.arch, "dataset": args.dataset, "num_classes": data.num_classes,
        "input_shape": tuple(data.input_shape), "classes": list(data.classes) if data.classes else None,
        "args": vars(args), "data_sha256": data.sha256, "input_files_sha256": input_files_sha256 or {},
        "pag_source": getattr(args, "source", None),  # None: no PAG term (baseline or adversarial training)
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
    "num_classes": lambda v: _count(v) and v >= 2, "pag_source": _optional(lambda v: v in D.SOURCES),
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
    if ckpt.get("format") not in (3, CHECKPOINT_FORMAT):
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}, this code reads 3 and {CHECKPOINT_FORMAT}")
    if ckpt["format"] == 3 and "generator" in ckpt:  # format 3 called the data-order generator "generator"
        ckpt["data_order_generator"] = ckpt.pop("generator")
    return files.require(ckpt, fields or {}, path, what)


CLASSIFIER = "checkpoint of train_baseline.py / train_pag.py"


def read_classifier(path, resume=False, loaded=None):
    """A classifier checkpoint with every field its readers use checked, its training flags included,
    and its epoch within its run's epochs."""
    ckpt = read_checkpoint(path, "classifier", CLASSIFIER, {**CLASSIFIER_FIELDS, **(RESUME_FIELDS if resume else {})}, loaded)
    files.require(ckpt, {k: _optional(_hashes) for k in ("data_sha256", "input_files_sha256") if k in ckpt}, path, CLASSIFIER)
    files.require(ckpt["args"], DATA_ARGS, path, "checkpoint's training flags")
    if ckpt["epoch"] > ckpt["args"]["epochs"]:
        raise UserError(f"{path}: epoch {ckpt['epoch']} of a {ckpt['args']['epochs']}-epoch run is not valid")
    return ckpt


def dataset_dtype(name):
    """The precision a dataset's models train and are evaluated in (data.DATASETS: float64 for the toy)."""
    return getattr(torch, D.DATASETS[name]["dtype"])


def use_dataset_precision(name):
    """The toy's one thread (data.DATASETS "threads"): the same numbers whatever OMP_NUM_THREADS says."""
    if D.DATASETS[name]["threads"]:
        torch.set_num_threads(D.DATASETS[name]["threads"])


def precision_text(name, amp):
    """How a run computes, for its first line: the toy's float64 on one thread, else --amp."""
    row = D.DATASETS[name]
    if row["dtype"] != "float32":
        return f"{row['dtype']}" + (f" on {row['threads']} thread{'s' * (row['threads'] != 1)}" if row["threads"] else "")
    return amp


def build_for(ckpt, path):
    """The model a checkpoint's fields describe (not yet loaded), in its dataset's precision."""
    shape = ckpt["input_shape"]
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], shape[0], shape[-1] if len(shape) == 3 else None,
                            ckpt["args"].get("standardize", False))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return model.to(dataset_dtype(ckpt["dataset"]))


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
    for split in ("train", "test"):
        if recorded.get(split) and data.sha256 and recorded[split] != data.sha256[split]:
            where = f" under {os.path.join(ckpt['args'].get('data_dir', ''), split)}" if data.name == "folder" else ""
            raise UserError(f"{path}: this {what} was made with other {split} data than these{where}: their images or "
                            f"labels changed since (content sha256 {recorded[split][:12]}... then, "
                            f"{data.sha256[split][:12]}... now); use the data it was made with")


def resume_checkpoint(path, args, kind, what, may_change=RESUME_MAY_CHANGE, fields=None):
    """For --resume: the checkpoint at path, refusing one made with other settings (both trainers)."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    ckpt = read_classifier(path, resume=True) if kind == "classifier" else read_checkpoint(path, kind, what, fields)
    old, new = ckpt.get("args", {}), vars(args)
    if kind == "classifier" and not old.get("lr_drops") and old.get("pag_first_half_scale", 1.0) in (1.0, None) \
            and new.get("epochs", 0) >= ckpt["epoch"]:
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


# ----------------------------------------------------------------------------- progress
class Progress:
    """The project's one progress printer: `what done/total unit [extra] | rate unit/s | ETA`, on
    every `every`-th call, at the end, and whenever `seconds` have passed (so the first line
    comes within ~10 s of the start however slow the job)."""

    def __init__(self, what, total, unit="img", every=None, seconds=10.0, print_fn=print):
        self.what, self.total, self.unit, self.every, self.seconds, self.print = what, total, unit, every, seconds, print_fn
        self.start = self.last = time.time()
        self.calls = 0

    def __call__(self, done, extra="", later_seconds=0.0):
        """done: items finished so far; extra: text to show; later_seconds: time of the work after this job."""
        self.calls += 1
        now = time.time()
        if not (done >= self.total or now - self.last >= self.seconds or (self.every and self.calls % self.every == 0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        later = f" (then {later_seconds / 60:.1f} min more)" if later_seconds > 0 else ""
        self.print(f"{self.what} {done}/{self.total} {self.unit} {extra}| {rate:.{0 if rate >= 10 else 2}f} {self.unit}/s | "
                   f"ETA {eta:.0f}s{later}", flush=True)


# ----------------------------------------------------------------------------- the loop
def attack_batch_size(data):
    """Images per attack batch: CIFAR's 250, and as many pixels for bigger images (27 at 96 px), so that
    evaluating an STL model takes about the memory of a CIFAR one."""
    pixels = math.prod(data.input_shape[1:]) if data.is_image else 1
    return max(1, min(250, 250 * 32 * 32 // pixels))


def eval_split(data):
    """Where the per-epoch check looks: the validation split if one is held out, else the test images."""
    return "val" if data.val_x is not None else "test"


def evaluate(model, data, args, epoch):
    """Clean accuracy and PGD-L2 accuracy (the official per-epoch check) on the first --eval-samples
    images of eval_split(data)."""
    model.eval()
    x, y = data.split(eval_split(data))
    x, y = D.to_float(x[: args.eval_samples]), y[: args.eval_samples]
    clean = (predict(model, x) == y).float().mean().item()
    gen = torch.Generator().manual_seed(args.seed + epoch)  # same noise on every (re)run of this epoch
    robust = robust_accuracy(model, x, y, args.eval_eps, "l2", data.box, batch_size=attack_batch_size(data),
                             steps=args.eval_steps,
                             step_size=1.5 * args.eval_eps / max(args.eval_steps, 1), generator=gen)
    return clean, robust


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


def check_finite(loss, logs, epoch, batch):
    """Stop a diverged run before anything non-finite is stepped into the weights or saved."""
    if not math.isfinite(loss):
        bad = [LOSS_TERMS.get(k, k) for k, v in logs.items() if k in LOSS_TERMS and not math.isfinite(v)]
        raise UserError(f"training diverged at epoch {epoch + 1}, batch {batch + 1}: the {' and '.join(bad) or 'total'} "
                        f"loss is {loss}; nothing of this epoch was saved (lower --lr or the loss weights)")


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


@dataclass
class Run:
    """What a training run holds: made by setup(), restored by resume(), carried through the epochs."""
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
    world: int
    start_epoch: int = 0
    saved_epoch: int = 0          # the epoch OUT_DIR/model.pt holds
    input_files_sha256: dict = field(default_factory=dict)  # {flag: content hash} of files the loss reads
    check_epoch: Callable = None  # (metrics row, settings, data) -> a warning or None, after each epoch
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


def evaluate_command(ckpt_path, device):
    """The attack.py command a finished run suggests, shell-quoted, with what it costs where there is no GPU."""
    script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack.py"))  # from where we run
    cmd = shlex.join(["python", script, f"--checkpoint={ckpt_path}", "--measures", "clean", "aa-l2", "aa-linf", "align"])
    if device.type == "cuda":
        return cmd
    return (f"{cmd}   (standard AutoAttack on 1,000 test images: slow on a CPU, about 3-8 min per norm for the small cnn "
            "on 2 cores and far longer for a resnet18; add --aa-version apgd --eval-samples 200 for a quick look)")


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


def train(args, make_loss=make_classification_loss, run_name="baseline", check_epoch=None):
    """Train a classifier with loss_fn = make_loss(args, data), called per batch as
    loss_fn(model, train_model, batch: Batch) -> (loss tensor, dict of floats to log);
    model is the plain module, train_model the one to run training forwards through
    (the DDP wrapper under torchrun). run_name: a name, or a function of the resolved args.
    check_epoch(metrics row, settings, data) -> a warning or None, printed after each epoch's line
    (train_pag.py's: a run whose PAG term keeps it from learning its classes).
    Ctrl-C or SIGTERM (what clusters send before a kill) ends it with one line naming the last
    saved epoch and the command that continues it, exit status 130."""
    rank, world, device = setup_distributed(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, cli.raise_keyboard_interrupt)
    data = D.get_data(args.dataset, args.data_dir, args.download, args.train_samples, args.eval_samples,
                      args.image_size, args.data_seed, args.val_samples).to(device)
    args = resolve_settings(args, data, run_name)  # from here on, read-only
    if world > 1:
        check_same_settings(args, world)
    run = None
    try:
        with files.RunLock(args.out_dir) if rank == 0 else nullcontext():
            run = setup(args, data, make_loss, rank, world, device)
            run.check_epoch = check_epoch
            for epoch in range(run.start_epoch, args.epochs):
                sums, seen, lr, seconds = train_epoch(run, epoch)
                end_epoch(run, epoch, sums, seen, lr, seconds)
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
            f"{evaluate_command(run.ckpt_path, next(run.model.parameters()).device)}")
    return run.model, run.data


def setup(args, data, make_loss, rank, world, device):
    """Model, optimiser, random streams and loss, restored from OUT_DIR/model.pt under --resume."""
    if len(data.train_y) // world < max(2, args.batch_size):
        raise UserError(f"{len(data.train_y)} training image(s) for {world} process(es) of batch {args.batch_size}: "
                        "each process needs one full batch (the last partial batch is dropped, as the official "
                        "loader does) of at least 2; lower --batch-size")
    use_dataset_precision(data.name)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.arch, data.num_classes, data.input_shape[0], data.input_shape[-1], args.standardize)
    except ValueError as e:  # e.g. vit on 28 px images
        raise UserError(f"--arch {args.arch} on {data.name} images of {data.input_shape[-1]} px: {e} (--image-size)") from None
    if args.standardize:  # from the training points, fixed from now on (saved with the weights)
        model[0].mean.copy_(data.train_x.mean(0))
        model[0].std.copy_(data.train_x.std(0))
    model = model.to(device, dataset_dtype(data.name))
    opt, sched = make_optimizer(model, args)
    loss_fn = make_loss(args, data)
    run = Run(args, data, model, wrap_for_ranks(model, world, device), opt, sched, *random_streams(args.seed, rank),
              loss_fn, rank, world, input_files_sha256=dict(getattr(loss_fn, "input_files_sha256", {})))
    if rank == 0:
        files.remove_stale_temporaries(args.out_dir, ("model.pt", "metrics.jsonl"))
    if args.resume:
        resume(run)
    elif os.path.exists(run.ckpt_path):
        raise UserError(f"{run.ckpt_path} exists; pass --resume to continue it or choose another --out-dir")
    adv = "" if args.adv == "none" else f", {args.adv} adversarial training ({args.adv_norm} eps {args.adv_eps:g})"
    if getattr(args, "source", None):  # train_pag.py's
        adv = (f", PAG source {args.source} lambda {args.pag_coeff:g} (x C = {args.pag_coeff * data.num_classes:g}), "
               f"{args.targets_per_image} targets per image") + adv
    procs = "" if world == 1 else f" x {world} processes (global batch {args.batch_size * world})"
    _, eval_y = data.split(eval_split(data))
    run.log(f"{args.run_name}: {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
            f"{data.name}, {len(data.train_y)} train images ({D.class_counts_text(data.train_y, data.num_classes, data.classes)})"
            f"{f', {len(data.val_y)} held out for validation' if data.val_y is not None else ''}, "
            f"checked each epoch on {min(args.eval_samples, len(eval_y))} {eval_split(data)} images "
            f"({D.class_counts_text(eval_y[: args.eval_samples], data.num_classes, data.classes)}), "
            f"{args.epochs} epoch{'s' * (args.epochs != 1)}, batch {args.batch_size}{procs}, "
            f"{args.optimizer} lr {args.lr:g}, {precision_text(data.name, args.amp)}, augment {'on' if args.augment else 'off'}, "
            f"device {device}"
            f"{adv}; writing {args.out_dir}/", flush=True)
    return run


def resume(run):
    """--resume: every state of the run as OUT_DIR/model.pt left it, and the metrics lines up to it."""
    path = run.ckpt_path
    ckpt = resume_checkpoint(path, run.args, "classifier", CLASSIFIER)
    check_data_fits(ckpt, run.data, path, "run")
    for flag, sha in (ckpt.get("input_files_sha256") or {}).items():
        now = run.input_files_sha256.get(flag)
        if now != sha:
            raise UserError(f"--resume: the file of --{flag.replace('_', '-')} is not the one {path} was trained with "
                            f"(content sha256 {sha[:12]}... then, {(now or 'none')[:12]}... now): its contents changed "
                            "(exported again?); start a new run, or restore that file")
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


def train_epoch(run, epoch):
    """One epoch of train_step over this rank's shard; returns (sums of the logs, images, lr used, seconds)."""
    args, n = run.args, len(run.data.train_y)
    run.model.train()
    start, lr = time.time(), run.opt.param_groups[0]["lr"]
    # The last partial batch is dropped, as the official loader does (drop_last=True); the toy keeps it, as its
    # public re-run does (data.DATASETS "drop_last").
    batches = shard_batches(run.order_gen, n, run.rank, run.world, args.batch_size, D.DATASETS[run.data.name]["drop_last"])
    progress = Progress(f"epoch {epoch + 1}/{args.epochs}:", sum(map(len, batches)) * run.world, "img", args.log_every,
                        print_fn=run.log)
    sums, seen = {}, 0
    for i, idx in enumerate(batches):
        batch = make_batch(run.data, idx.to(run.data.train_x.device), args.augment, epoch, i, run.sample_gen)
        loss, logs = train_step(run.model, run.train_model, run.opt, run.loss_fn, batch, args.amp)
        seen += len(idx)
        for k, v in {"loss": loss, **logs}.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx)
        epoch_seconds = (time.time() - start) / (i + 1) * len(batches)
        progress(seen * run.world, f"loss {sums['loss'] / seen:.4f} ", later_seconds=epoch_seconds * (args.epochs - epoch - 1))
    run.sched.step()
    return sums, seen, lr, time.time() - start


def end_epoch(run, epoch, sums, seen, lr, train_seconds):
    """Epoch means over all ranks; on rank 0: the finiteness check, evaluation, metrics, then the checkpoint."""
    args, start = run.args, time.time() - train_seconds
    sample_states = gather_states(run.sample_gen, run.world)  # every rank's random state, for --resume
    if run.world > 1:  # epoch means over all ranks' samples
        totals = torch.tensor([seen, *sums.values()], dtype=torch.float64)
        dist.all_reduce(totals)
        seen, sums = totals[0].item(), dict(zip(sums, totals[1:].tolist()))
    if run.rank == 0:  # the others wait below
        if weights_problem(run.model, run.model.state_dict()):
            raise UserError(f"training diverged in epoch {epoch + 1}: weights are not finite; "
                            f"{run.ckpt_path} keeps the last good epoch ({epoch})")
        clean, robust = evaluate(run.model, run.data, args, epoch)
        split = eval_split(run.data)
        run.metrics.append({"epoch": epoch + 1, **{k: v / seen for k, v in sums.items()}, "eval_split": split,
                            f"{split}_acc": clean, f"{split}_pgd_l2_{args.eval_eps:g}_acc": robust, "lr": lr,
                            "train_seconds": train_seconds, "seconds": time.time() - start})
        print(f"epoch {epoch + 1}: loss {run.metrics[-1]['loss']:.4f} {split} acc {clean:.2%} pgd-l2({args.eval_eps:g}) "
              f"acc {robust:.2%} [{run.metrics[-1]['seconds']:.0f}s]", flush=True)
        warning = run.check_epoch and run.check_epoch(run.metrics[-1], args, run.data)
        if warning:
            print(f"warning: {warning}", flush=True)
        # Metrics first, then the checkpoint: a crash in between leaves a line that --resume drops.
        write_metrics(run.metrics_path, run.metrics)
        save_checkpoint(run.ckpt_path, run.model, run.opt, run.sched, run.order_gen, sample_states, args, run.data,
                        epoch + 1, run.input_files_sha256)
        run.saved_epoch = epoch + 1  # at once: an interrupt during the print below must name this epoch
        if epoch == run.start_epoch:
            print(f"wrote {run.ckpt_path} and {run.metrics_path} (updated every epoch)", flush=True)
    if run.world > 1:
        dist.barrier()
    run.saved_epoch = epoch + 1  # every rank: the file holds it now


def make_batch(data, idx, augment, epoch, step, generator):
    """The batch of training images idx, with one crop/flip drawn per sample when augmenting."""
    x_clean, y = D.to_float(data.train_x[idx]), data.train_y[idx]
    if not augment:
        return Batch(x_clean, y, idx, x_clean, lambda t: t, epoch, step, generator)
    offsets, flips = D.draw_crop_flip(len(idx), 4, generator)
    # The image pads with the model's 0 (mid-grey, as the official code's crop in [-1, 1]); fields with 0.
    return Batch(D.crop_flip(x_clean, offsets, flips, fill=PIXEL_MEAN), y, idx, x_clean,
                 lambda t: D.crop_flip(t, offsets, flips), epoch, step, generator)


def main(argv=None):
    p = add_common_args(cli.Parser(description=__doc__))
    train(p.parse_args(argv))


if __name__ == "__main__":
    cli.run_cli(main)
