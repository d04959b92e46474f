"""Vanilla training: the project's one training loop (train_pag.py adds its term to it).

    python train_baseline.py --dataset cifar10                 # paper settings: ResNet-18, 100 epochs
    python train_baseline.py --dataset fashion-mnist --epochs 5 --train-samples 20000

Writes OUT_DIR/model.pt atomically after every epoch (weights, optimiser,
scheduler, RNG state and everything attack.py needs) and one JSON line per
epoch to OUT_DIR/metrics.jsonl. `--resume` continues an interrupted run and ends
exactly where an uninterrupted one would.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data as D
from attack import check_perturbation, pgd, pick_device, predict, robust_accuracy
from models import ARCHS, build_model

# Flags that may differ between a run and its --resume (everything else must match).
RESUME_MAY_CHANGE = {"resume", "stop_after_epoch", "device", "out_dir", "log_every", "data_dir", "download", "cache_dir"}


def add_common_args(p):
    """The flags of the training loop; unset ones take the dataset's paper defaults (data.DATASETS)."""
    p.add_argument("--dataset", default="cifar10", help=f"{', '.join(D.DATASETS)} (stl = stl10)")
    p.add_argument("--data-dir", default="data", help="where datasets live (folder: holds train/ and test/)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--arch", help=f"{', '.join(ARCHS)}; default resnet18 (images), cnn (fashion-mnist), mlp (toy)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, help="default 64 (CIFAR), 32 (STL), 128 (toy)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="default sgd (adam for the toy)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    p.add_argument("--weight-decay", type=float, help="default 1e-4 with SGD, 0 with Adam")
    p.add_argument("--lr-drops", help="fractions of training at which lr is divided by 10 (default 0.5,0.75; toy none)")
    p.add_argument("--seed", type=int, default=3407, help="the official configs' seed")
    p.add_argument("--data-seed", type=int, help="toy only: which draw of the data (default 0)")
    p.add_argument("--train-samples", type=int, help="train on the first N training images")
    p.add_argument("--eval-samples", type=int, default=1000, help="per-epoch evaluation on the first N test images")
    p.add_argument("--eval-eps", type=float, help="per-epoch PGD-L2 radius (default: the dataset's, 0.5 for CIFAR)")
    p.add_argument("--eval-steps", type=int, default=7, help="per-epoch PGD-L2 steps (step 1.5*eps/steps, as the official code)")
    p.add_argument("--adv", default="none", choices=("none", "pgd", "trades"),
                   help="adversarial training: Madry PGD-AT or TRADES (default none)")
    p.add_argument("--adv-norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--adv-eps", type=float, help="default: the dataset's eps (8/255 L-inf, 0.5 L2 for CIFAR; 0.1, 1.5 Fashion-MNIST)")
    p.add_argument("--adv-steps", type=int, default=10)
    p.add_argument("--adv-step-size", type=float, help="default 2.5*eps/steps (2/255 for 8/255 and 10 steps)")
    p.add_argument("--trades-beta", type=float, default=6.0)
    p.add_argument("--image-size", type=int, help="resize folder images / size of synthetic images")
    p.add_argument("--no-augment", action="store_true", help="turn off random crop + flip")
    p.add_argument("--out-dir", help="default runs/<script>_<dataset>_<arch>")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/model.pt")
    p.add_argument("--stop-after-epoch", type=int, help="exit after this epoch (time-limited jobs; continue with --resume)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--log-every", type=int, default=50, help="progress line every N batches")
    p.add_argument("--cache-dir", default="cache", help="where nearest-neighbour tables are cached")
    return p


def resolve_defaults(args, run_name):
    """Fill unset flags from the dataset's defaults, in place."""
    args.dataset = D.canonical_dataset(args.dataset)
    defaults = D.DATASETS[args.dataset]
    args.arch = args.arch or defaults["arch"]
    if args.arch not in ARCHS:
        raise D.UserError(f"unknown arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.optimizer = args.optimizer or defaults["optimizer"]
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if args.optimizer == "sgd" else 0.0
    if args.lr_drops is None:
        args.lr_drops = defaults["lr_drops"]
    if args.eval_eps is None:
        args.eval_eps = defaults["eps_l2"]
    if args.adv_eps is None:
        args.adv_eps = defaults[f"eps_{args.adv_norm}"]
    if args.adv != "none":
        run_name += f"_{args.adv}at" if args.adv == "pgd" else f"_{args.adv}"
    args.out_dir = args.out_dir or os.path.join("runs", f"{run_name}_{args.dataset}_{args.arch}")
    for flag in ("epochs", "batch_size", "eval_samples", "log_every"):
        if getattr(args, flag) < 1:
            raise D.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def setup_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process (LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(args.device)
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not use_cuda:
        raise D.UserError("--device cuda asked for, but no CUDA device is available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, device


def make_optimizer(model, args):
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    drops = [round(float(f) * args.epochs) for f in args.lr_drops.split(",") if f.strip()]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=drops, gamma=0.1)


def trades_kl(logits, p_clean):
    """Summed KL(p_clean || softmax(logits)): the TRADES regulariser and its attack's objective."""
    return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")


def adversarial_loss(model, x, y, logits, args, box, generator, forward=None):
    """The adversarial-training loss for a batch (x clean, logits = model(x) or None).

    pgd:    CE(f(x_adv), y), x_adv = PGD on the CE (Madry et al.).
    trades: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / B, x_adv = PGD on that KL (Zhang et al.).
    The attack runs with the model in eval mode (batch-norm statistics neither used
    from nor written by the attack's batches) and is checked to stay in its eps ball.
    `forward` (default model) runs the training forward of x_adv: the DDP wrapper under
    torchrun, so that only training passes, never the attack's, synchronise gradients.
    Returns (loss, adversarial logits).
    """
    kw = dict(norm=args.adv_norm, steps=args.adv_steps, step_size=args.adv_step_size, box=box, generator=generator)
    was_training = model.training
    model.eval()
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
        return F.cross_entropy(adv_logits, y), adv_logits
    kl = trades_kl(adv_logits, F.softmax(logits, dim=1)) / len(x)
    return F.cross_entropy(logits, y) + args.trades_beta * kl, adv_logits


def progress(epoch, epochs, done, total, seen, epoch_start, loss):
    """One line: where we are, images/s, and the ETA of the epoch and of the run (excluding evaluation)."""
    elapsed = time.time() - epoch_start
    rate = seen / max(elapsed, 1e-9)
    epoch_eta = elapsed * (total - done) / done
    run_eta = epoch_eta + elapsed * total / done * (epochs - epoch - 1)
    print(f"epoch {epoch + 1}/{epochs} batch {done}/{total} loss {loss:.4f} | {rate:.0f} img/s | "
          f"epoch ETA {epoch_eta:.0f}s, run ETA {run_eta / 60:.1f} min", flush=True)


def evaluate(model, data, args, epoch):
    """Clean accuracy and PGD-L2 accuracy (the official per-epoch check) on the eval subset."""
    model.eval()
    x, y = D.to_float(data.test_x[: args.eval_samples]), data.test_y[: args.eval_samples]
    clean = (predict(model, x) == y).float().mean().item()
    gen = torch.Generator().manual_seed(args.seed + epoch)  # same noise on every (re)run of this epoch
    robust = robust_accuracy(model, x, y, args.eval_eps, "l2", data.box, batch_size=250, steps=args.eval_steps,
                             step_size=1.5 * args.eval_eps / args.eval_steps, generator=gen)
    return clean, robust


def save_checkpoint(path, model, opt, sched, order_gen, sample_gen_states, args, data, epoch):
    D.atomic_save({
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "generator": order_gen.get_state(), "sample_generators": sample_gen_states,
        "torch_rng": torch.get_rng_state(), "epoch": epoch,
        "arch": args.arch, "dataset": args.dataset, "num_classes": data.num_classes,
        "input_shape": data.input_shape, "args": vars(args),
    }, path)


def resume_state(path, args):
    """Load OUT_DIR/model.pt for --resume, refusing one made with other settings."""
    if not os.path.isfile(path):
        raise D.UserError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    old, new = ckpt.get("args", {}), vars(args)
    changed = sorted(k for k in set(old) | set(new) if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        raise D.UserError(f"--resume: --{k.replace('_', '-')} was {old.get(k)!r} in {path}, now {new.get(k)!r}")
    return ckpt


def train(args, make_extra_loss=None, run_name="baseline"):
    """Train a classifier; make_extra_loss(args, data) may return a term added to the CE.

    The term is called per batch as term(model=, x=, logits=, y=, idx=, x_clean=,
    augment=, epoch=, generator=) -> (loss tensor, dict of floats to log), where
    x is the augmented batch (requires grad), logits = model(x), x_clean the
    un-augmented batch, idx its dataset indices and augment(t) applies this
    batch's crop/flip to any [B, ..., H, W] tensor. A term may back-propagate
    parts of itself (to bound memory) and return them detached.
    """
    args = resolve_defaults(args, run_name)
    rank, world, device = setup_distributed(args)
    if world > 1 and getattr(args, "pag_chunk", None):
        raise D.UserError("--pag-chunk back-propagates several times per step, which DDP does not allow; "
                          "use more processes or a smaller --batch-size instead")
    data = D.get_data(args.dataset, args.data_dir, args.download, args.train_samples, args.eval_samples,
                      args.image_size, args.data_seed).to(device)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, data.num_classes, data.input_shape[0], data.input_shape[-1]).to(device)
    opt, sched = make_optimizer(model, args)
    # Training forwards go through the DDP wrapper (gradient all-reduce in backward); attacks,
    # evaluation and checkpoints use the plain module.
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    # Two random streams, both resumable: the data order (identical on every rank, which then
    # takes its own shard) and per-sample draws (crops/flips, PAG targets; one per rank).
    order_gen = torch.Generator().manual_seed(args.seed)
    sample_gen = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)
    extra = make_extra_loss(args, data) if make_extra_loss else None
    augment = data.is_image and not args.no_augment
    log = print if rank == 0 else (lambda *a, **k: None)

    ckpt_path = os.path.join(args.out_dir, "model.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    start_epoch = 0
    if args.resume:
        ckpt = resume_state(ckpt_path, args)
        if len(ckpt["sample_generators"]) != world:
            raise D.UserError(f"--resume: {ckpt_path} was written by {len(ckpt['sample_generators'])} process(es), "
                              f"this run has {world}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        order_gen.set_state(ckpt["generator"])
        sample_gen.set_state(ckpt["sample_generators"][rank])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch = ckpt["epoch"]
        # Drop metric lines of epochs after the checkpoint (written before a crash).
        if rank == 0 and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["epoch"] <= start_epoch]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics_path + ".tmp", metrics_path)
        log(f"resuming {ckpt_path} after epoch {start_epoch}")
    elif os.path.exists(ckpt_path):
        raise D.UserError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out-dir")
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        if not args.resume and os.path.exists(metrics_path):
            os.remove(metrics_path)

    n = len(data.train_y)
    n_params = sum(p.numel() for p in model.parameters())
    adv = "" if args.adv == "none" else f", {args.adv} adversarial training ({args.adv_norm} eps {args.adv_eps:g})"
    procs = "" if world == 1 else f" x {world} processes (global batch {args.batch_size * world})"
    log(f"{run_name}: {args.arch} ({n_params / 1e6:.2f}M params) on {data.name}, {n} train images, "
        f"{args.epochs} epochs, batch {args.batch_size}{procs}, {args.optimizer} lr {args.lr}, device {device}{adv}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        epoch_start = time.time()
        sums, seen = {}, 0
        order = torch.randperm(n, generator=order_gen)
        shard = order[: n - n % world][rank::world]  # equal shards: every rank takes the same number of steps
        batches = [b for b in shard.split(args.batch_size) if len(b) > 1]  # batch-norm needs 2
        for i, idx in enumerate(batches):
            idx = idx.to(device)
            x_clean, y = D.to_float(data.train_x[idx]), data.train_y[idx]
            if augment:
                offsets, flips = D.draw_crop_flip(len(idx), 4, sample_gen)
                aug = lambda t, o=offsets, f=flips: D.crop_flip(t, o, f)  # noqa: E731
            else:
                aug = lambda t: t  # noqa: E731
            x = aug(x_clean)
            opt.zero_grad(set_to_none=True)
            if extra:
                x.requires_grad_(True)  # the extra term differentiates w.r.t. the input
            # Madry AT needs no clean forward unless an extra term (PAG, at the clean image) does.
            logits = train_model(x) if (args.adv != "pgd" or extra) else None
            if args.adv == "none":
                class_loss = F.cross_entropy(logits, y)
                logs = {}
            else:
                class_loss, adv_logits = adversarial_loss(model, x.detach(), y, logits, args, data.box, sample_gen,
                                                          forward=train_model)
                logs = {"adv_train_acc": (adv_logits.argmax(1) == y).float().mean().item()}
            loss = class_loss
            if extra:
                term, term_logs = extra(model=model, x=x, logits=logits, y=y, idx=idx, x_clean=x_clean, augment=aug,
                                        epoch=epoch, generator=sample_gen)
                loss, logs = class_loss + term, {**logs, **term_logs}
            loss.backward()
            opt.step()
            b = len(idx)
            seen += b
            if logits is not None:
                logs["train_acc"] = (logits.argmax(1) == y).float().mean().item()
            for k, v in {"loss": loss.item(), "class_loss": class_loss.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v * b
            if rank == 0 and ((i + 1) % args.log_every == 0 or i + 1 == len(batches)):
                progress(epoch, args.epochs, i + 1, len(batches), seen * world, epoch_start, sums["loss"] / seen)
        sched.step()
        train_seconds = time.time() - epoch_start
        sample_states = [sample_gen.get_state()]
        if world > 1:  # epoch means over all ranks' samples, and every rank's random state for --resume
            totals = torch.tensor([seen, *sums.values()], dtype=torch.float64)
            dist.all_reduce(totals)
            seen, sums = totals[0].item(), dict(zip(sums, totals[1:].tolist()))
            sample_states = [None] * world
            dist.all_gather_object(sample_states, sample_gen.get_state())
        if rank == 0:  # evaluation, metrics and checkpoint on rank 0 only; the others wait below
            clean, robust = evaluate(model, data, args, epoch)
            line = {"epoch": epoch + 1, **{k: v / seen for k, v in sums.items()}, "test_acc": clean,
                    f"pgd_l2_{args.eval_eps:g}_acc": robust, "lr": opt.param_groups[0]["lr"],
                    "train_seconds": train_seconds, "seconds": time.time() - epoch_start}
            print(f"epoch {epoch + 1}: loss {line['loss']:.4f} test acc {clean:.2%} PGD-L2({args.eval_eps:g}) acc {robust:.2%} "
                  f"[{line['seconds']:.0f}s]", flush=True)
            # Metrics line first, then the checkpoint: a crash in between leaves a line that --resume drops.
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            save_checkpoint(ckpt_path, model, opt, sched, order_gen, sample_states, args, data, epoch + 1)
        if world > 1:
            dist.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and epoch + 1 < args.epochs:
            log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            break
    if start_epoch >= args.epochs:
        log(f"{ckpt_path} already finished {args.epochs} epochs")
    if world > 1:
        dist.destroy_process_group()
    return model, data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    train(p.parse_args(argv))


if __name__ == "__main__":
    D.run_cli(main)
