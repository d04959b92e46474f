"""Score-based ground-truth PAG (SBG) from a class-conditional diffusion model we train ourselves.

    python sbg.py train  --dataset fashion-mnist --out-dir runs/sbg_fmnist            # denoiser
    torchrun --nproc_per_node 2 sbg.py train --dataset cifar10 --width 64            # several GPUs
    python sbg.py sweep  --checkpoint runs/sbg_fmnist/denoiser.pt                      # pick the noise level
    python sbg.py export --checkpoint runs/sbg_fmnist/denoiser.pt --out fmnist_sbg.pt  # fields for train_pag.py
    python train_pag.py --dataset fashion-mnist --source sbg --sbg-file fmnist_sbg.pt

The denoiser eps(x_t, c) is one network for every class c and for "no class" (index C):
the label is dropped with probability --p-uncond during training. With
x_t = sqrt(a) x + sqrt(1 - a) eps and the score s = -eps_hat / sqrt(1 - a), the field is

    g(x, t) = s(x_t, t) - s(x_t, null) = (eps_hat(x_t, null) - eps_hat(x_t, t)) / sqrt(1 - a),

the gradient of log p(t | x_t), averaged over --noise-draws draws of eps at timestep
--timestep. Pixels live in [-1, 1] inside the diffusion model, so g is a direction in
pixel space (cosines are unchanged by the factor 2 to [0, 1] pixels).
"""
import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import data as D
import files
from files import UserError
from checkpoint import DENOISER, check_data_fits, check_resume_fits, read_denoiser, resume_checkpoint, save_denoiser
from cli import Progress
from ranks import (gather_states, leave_process_group, pick_device, random_streams, setup_distributed, shard_batches,
                   wrap_for_ranks)

# Flags that may differ between `sbg.py train` and its --resume: more --epochs continue a finished run.
RESUME_MAY_CHANGE = {"job", "resume", "device", "out_dir", "data_dir", "download", "epochs", "checkpoint", "timestep",
                     "noise_draws", "out", "sweep_timesteps", "sweep_images", "png", "split", "eval_samples"}


# ----------------------------------------------------------------------------- the denoiser
class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Denoiser(nn.Module):
    """A small U-Net (two resolutions down) with timestep and class embeddings; class C = no class."""

    def __init__(self, in_channels, num_classes, width=32):
        super().__init__()
        w, e = width, 4 * width
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(w, e), nn.SiLU(), nn.Linear(e, e))
        self.class_emb = nn.Embedding(num_classes + 1, e)
        self.inp = nn.Conv2d(in_channels, w, 3, padding=1)
        self.down1, self.down2 = ResBlock(w, w, e), ResBlock(w, 2 * w, e)
        self.mid = ResBlock(2 * w, 2 * w, e)
        self.up2, self.up1 = ResBlock(4 * w, w, e), ResBlock(2 * w, w, e)
        self.out = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, in_channels, 3, padding=1))
        self.width = w

    def forward(self, x, t, c):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        temb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
        emb = self.time_mlp(temb) + self.class_emb(c)
        h0 = self.down1(self.inp(x), emb)                          # H
        h1 = self.down2(F.avg_pool2d(h0, 2), emb)                  # H/2
        h = self.mid(F.avg_pool2d(h1, 2), emb)                     # H/4
        h = self.up2(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, size=h0.shape[-2:]), h0], 1), emb)
        return self.out(h)


def alpha_bars(timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """Cumulative products of (1 - beta) of the linear DDPM schedule (Ho et al. 2020)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64), 0).float()


# ----------------------------------------------------------------------------- the field (torch only)
def sbg_field(denoiser, x, target_classes, alpha_bar, noise, null_class, timestep):
    """g(x, t) = s(x_t, t) - s(x_t, null) for x [B, ...] in [-1, 1], target_classes [B, k] -> [B, k, ...].

    noise: [B, ...] standard normal draw; alpha_bar: float in (0, 1); the denoiser is
    called as denoiser(x_t, timestep [B], class [B]) and predicts the added noise.
    """
    b, k = target_classes.shape
    x_t = math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * noise
    ts = torch.full((b,), float(timestep), device=x.device)
    eps_null = denoiser(x_t, ts, torch.full((b,), null_class, device=x.device, dtype=torch.long))
    x_rep = x_t.repeat_interleave(k, 0)
    eps_cond = denoiser(x_rep, ts.repeat_interleave(k), target_classes.reshape(-1)).view(b, k, *x.shape[1:])
    return (eps_null[:, None] - eps_cond) / math.sqrt(1 - alpha_bar)


# ----------------------------------------------------------------------------- jobs
def load_denoiser(path, device):
    """A denoiser checkpoint, checked (fields, and weights against the network they describe: keys,
    shapes, dtypes, finite), so that an export never writes fields of a broken network."""
    ckpt = read_denoiser(path)
    net = Denoiser(ckpt["input_shape"][0], ckpt["num_classes"], ckpt["args"]["width"])
    files.check_state_dict(net, ckpt["model"], path, DENOISER)
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


def check_timesteps(steps, ckpt):
    if max(steps) >= ckpt["args"]["timesteps"]:
        raise UserError(f"timestep {max(steps)} is beyond the denoiser's schedule (0..{ckpt['args']['timesteps'] - 1})")


def get_images(args):
    data = D.get_data(args.dataset, args.data_dir, args.download, args.train_samples, args.eval_samples,
                      args.image_size, val_samples=args.val_samples)
    if not data.is_image:
        raise UserError("sbg works on image datasets")
    return data


def train(args):
    """Fit the denoiser; under torchrun every process takes a shard of each epoch (DDP)."""
    rank, world, device = setup_distributed(args)
    with files.RunLock(args.out_dir) if rank == 0 else nullcontext():
        _train(args, rank, world, device)


def _train(args, rank, world, device):
    data = get_images(args)
    x_all = data.train_x.to(device)
    y_all = data.train_y.to(device)
    torch.manual_seed(args.seed)
    net = Denoiser(data.input_shape[0], data.num_classes, args.width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    train_net = wrap_for_ranks(net, world, device)
    abar = alpha_bars(args.timesteps).to(device)
    order_gen, sample_gen = random_streams(args.seed, rank)  # sample_gen: noise, timesteps, label drops
    path = os.path.join(args.out_dir, "denoiser.pt")
    start = 0
    if rank == 0:
        files.remove_stale_temporaries(args.out_dir, ("denoiser.pt",))
    if args.resume:
        ckpt = resume_checkpoint(path, args, "sbg-denoiser", RESUME_MAY_CHANGE)
        check_resume_fits(ckpt, data, args, path, "denoiser")
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        order_gen.set_state(ckpt["data_order_generator"])
        sample_gen.set_state(ckpt["sample_generators"][rank])
        start = ckpt["epoch"]
    elif os.path.exists(path):
        raise UserError(f"{path} exists; pass --resume to continue it or choose another --out-dir")
    n = len(y_all)
    if rank == 0:
        print(f"denoiser: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, {n} images of {data.name}, "
              f"{args.epochs} epoch{'s' * (args.epochs != 1)}, batch {args.batch_size} x {world} process(es), device {device}", flush=True)
    for epoch in range(start, args.epochs):
        t0, total, batches = time.time(), 0.0, 0
        batches_of_epoch = shard_batches(order_gen, n, rank, world, args.batch_size, drop_last=False)
        shard = sum(map(len, batches_of_epoch))
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}:", shard * world, "img",
                            print_fn=print if rank == 0 else (lambda *a, **k: None))
        for idx in batches_of_epoch:
            x0 = D.to_float(x_all[idx.to(device)]) * 2 - 1
            c = y_all[idx.to(device)].clone()
            drop = torch.rand(len(idx), generator=sample_gen).to(device) < args.p_uncond
            c[drop] = data.num_classes  # the "no class" token: the same net learns the unconditional score
            t = torch.randint(0, args.timesteps, (len(idx),), generator=sample_gen).to(device)
            eps = torch.randn(x0.shape, generator=sample_gen).to(device)
            a = abar[t].view(-1, *[1] * (x0.dim() - 1))
            loss = F.mse_loss(train_net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), c), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
            epoch_seconds = (time.time() - t0) / (batches * args.batch_size) * shard
            progress(min(batches * args.batch_size, shard) * world, f"loss {total / batches:.4f} ",
                     later_seconds=epoch_seconds * (args.epochs - epoch - 1))
        states = gather_states(sample_gen, world)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total / batches:.4f} (rank 0) [{time.time() - t0:.0f}s]", flush=True)
            if not math.isfinite(total):
                raise UserError(f"denoiser training diverged in epoch {epoch + 1} (loss {total}); "
                                f"{path} keeps the last good epoch")
            save_denoiser(path, net, opt, order_gen, states, args, data, epoch + 1)
            if epoch == start:
                print(f"wrote {path} (updated every epoch)", flush=True)
        if world > 1:
            dist.barrier()
    train_net = None  # the DDP wrapper holds the process group
    leave_process_group(world)


@torch.no_grad()
def export(args):
    device = pick_device(args.device)
    net, ckpt = load_denoiser(args.checkpoint, device)
    data = get_images(args)
    check_data_fits(ckpt, data, args.checkpoint, "denoiser")
    images, labels = data.split(args.split)
    x_all, c = D.to_float(images) * 2 - 1, data.num_classes
    check_timesteps([args.timestep], ckpt)
    abar = alpha_bars(ckpt["args"]["timesteps"])[args.timestep].item()
    gen = torch.Generator().manual_seed(args.seed)
    fields = torch.empty(len(x_all), c, *data.input_shape, dtype=torch.float16)
    all_classes = torch.arange(c).expand(args.batch_size, c)
    progress = Progress("export:", len(x_all), "img")
    for s in range(0, len(x_all), args.batch_size):
        xb = x_all[s: s + args.batch_size].to(device)
        acc = torch.zeros(len(xb), c, *data.input_shape, device=device)
        for _ in range(args.noise_draws):
            noise = torch.randn(xb.shape, generator=gen).to(device)
            acc += sbg_field(net, xb, all_classes[: len(xb)].to(device), abar, noise, c, args.timestep)
        fields[s: s + len(xb)] = (acc / args.noise_draws).half().cpu()
        progress(s + len(xb))
    if not bool(torch.isfinite(fields).all()):  # e.g. values beyond float16's range
        raise UserError(f"the fields of {args.checkpoint} are not finite at timestep {args.timestep}; nothing written")
    files.atomic_write(args.out, {"kind": "sbg-fields", "fields": fields, "dataset": data.name, "n": len(x_all),
                   "split": args.split, "train_samples": args.train_samples, "val_samples": args.val_samples,
                   "labels": labels.cpu().clone(), "classes": list(data.classes) if data.classes else None,
                   "timestep": args.timestep,
                   "alpha_bar": abar, "noise_draws": args.noise_draws, "denoiser": os.path.abspath(args.checkpoint),
                   "denoiser_sha256": files.file_sha256(args.checkpoint), "seed": args.seed})
    print(f"wrote {args.out}: fields of {len(x_all)} {args.split} images {tuple(fields.shape)} float16")


@torch.no_grad()
def sweep(args):
    """Measure, per timestep, how much the field depends on the image and how stable it is.

    consistency: mean cos between fields from two independent noise draws (same x, t);
    cross-image: mean cos between fields of different images for the same class t;
    cross-class: mean cos between one image's fields for different classes t != t'.
    Too much noise: fields stop depending on x (cross-image approaches consistency).
    Too little: conditional ~ unconditional, and what is left is the same for every
    class (high cross-class). We pick the timestep with the largest
    consistency - max(cross-image, cross-class). --png draws the fields.
    """
    device = pick_device(args.device)
    net, ckpt = load_denoiser(args.checkpoint, device)
    check_timesteps(args.sweep_timesteps, ckpt)
    if args.sweep_images < 4:
        raise UserError(f"--sweep-images must be at least 4 (its picture shows 4 images), got {args.sweep_images}")
    if args.out:
        files.check_output(args.out, "--out", [args.checkpoint], (".json",))
    if args.png:
        files.check_output(args.png, "--vis-out", [args.checkpoint, args.out], files.FIGURE_SUFFIXES)
    args.train_samples = args.sweep_images
    data = get_images(args)
    check_data_fits(ckpt, data, args.checkpoint, "denoiser")
    x = (D.to_float(data.train_x) * 2 - 1).to(device)
    c = data.num_classes
    classes = torch.arange(c).expand(len(x), c).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    table, pictures = [], []
    for step in args.sweep_timesteps:
        abar = alpha_bars(ckpt["args"]["timesteps"])[step].item()
        f1, f2 = (sbg_field(net, x, classes, abar, torch.randn(x.shape, generator=gen).to(device), c, step).flatten(2)
                  for _ in range(2))
        consistency = F.cosine_similarity(f1, f2, dim=2).mean().item()
        unit = F.normalize(f1, dim=2)  # [B, C, D]
        gram = torch.einsum("icd,jcd->cij", unit, unit)  # per class, image x image cosines
        n = len(x)
        cross = ((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))).mean().item()
        by_class = torch.einsum("icd,ied->ice", unit, unit)  # per image, class x class cosines
        cross_class = ((by_class.sum((1, 2)) - c) / (c * (c - 1))).mean().item()
        gap = consistency - max(cross, cross_class)
        table.append({"timestep": step, "alpha_bar": abar, "consistency": consistency, "cross_image": cross,
                      "cross_class": cross_class, "gap": gap})
        print(f"t={step:4d} alpha_bar={abar:.3f} consistency={consistency:.3f} cross-image={cross:.3f} "
              f"cross-class={cross_class:.3f} gap={gap:.3f}", flush=True)
        pictures.append(torch.cat([x[:4, None], f1[:4].view(4, c, *x.shape[1:])], 1))
    best = max(table, key=lambda r: r["gap"])
    print(f"largest gap at timestep {best['timestep']}")
    if args.png:  # rows: 4 images per timestep; columns: the image, then its field toward each class
        from torchvision.utils import save_image
        grid = torch.cat(pictures).flatten(0, 1)
        scale = grid.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (grid.dim() - 1))
        files.atomic_write(args.png, write=lambda tmp: save_image(grid / scale * 0.5 + 0.5, tmp, nrow=c + 1, padding=1,
                                                                  pad_value=1.0, format=os.path.splitext(args.png)[1][1:] or "png"))
        print(f"wrote {args.png} (rows: 4 images x timesteps {args.sweep_timesteps})")
    if args.out:
        files.write_json({"rows": table, "best_timestep": best["timestep"], "images": len(x)}, args.out)
        print(f"wrote {args.out}")
    return table


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("job", choices=("train", "export", "sweep"),
                   help="train the denoiser, export fields for train_pag.py, or sweep noise levels")
    p.add_argument("--dataset", default="fashion-mnist", help="an image dataset of train_pag.py")
    p.add_argument("--data-dir", default="data", help="where datasets live")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download a missing CIFAR-10/100, STL-10 or Fashion-MNIST, with progress (--no-download: "
                        "never, e.g. on an offline cluster: the error says what to fetch and where)")
    p.add_argument("--train-samples", type=cli.positive_int, help="N training images, chosen as train_pag.py chooses them (must match its flag)")
    p.add_argument("--val-samples", type=cli.positive_int, help="training images held out for validation (must match train_pag.py's)")
    p.add_argument("--image-size", type=cli.image_side, help="resize folder images / size of synthetic images")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if there is one")
    p.add_argument("--seed", type=cli.seed, default=0, help="initialisation, data order and noise draws")
    p.add_argument("--batch-size", type=cli.positive_int, default=128, help="images per step (train) or per pass (export)")
    # train
    p.add_argument("--out-dir", default=os.path.join("runs", "sbg"), help="train: where denoiser.pt goes")
    p.add_argument("--epochs", type=cli.positive_int, default=20, help="train: epochs")
    p.add_argument("--lr", type=cli.learning_rate, default=1e-3, help="train: Adam learning rate")
    p.add_argument("--width", type=cli.positive_int, default=32, help="train: U-Net base channels (64 or more for CIFAR on a GPU)")
    p.add_argument("--timesteps", type=cli.positive_int, default=1000, help="train: diffusion steps of the schedule")
    p.add_argument("--p-uncond", type=cli.unit_interval, default=0.1, help="train: probability of dropping the class label")
    p.add_argument("--resume", action="store_true", help="train: continue OUT_DIR/denoiser.pt (more --epochs allowed)")
    # export / sweep
    p.add_argument("--checkpoint", help="export, sweep: denoiser.pt from `sbg.py train`")
    p.add_argument("--timestep", type=cli.nonneg_int, default=300, help="export: noise level of the fields (see `sweep`)")
    p.add_argument("--noise-draws", type=cli.positive_int, default=4, help="export: noise draws averaged per field")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="export: fields for the training images (train_pag.py) or the first --eval-samples test "
                        "images (held-out alignment: attack.py --align-split test)")
    p.add_argument("--eval-samples", "--n-samples", type=cli.positive_int, help="export --split test: N test images, chosen as attack.py chooses them (default: all)")
    p.add_argument("--out", help="export: the fields file; sweep: a JSON of the measurements")
    p.add_argument("--sweep-timesteps", type=cli.nonneg_int, nargs="+", default=[50, 100, 200, 300, 400, 600, 800],
                   help="sweep: noise levels to measure")
    p.add_argument("--sweep-images", type=cli.positive_int, default=64, help="sweep: training images to measure on")
    p.add_argument("--vis-out", "--png", dest="png", help="sweep: draw the fields of 4 images at every timestep (a PNG)")
    args = p.parse_args(argv)
    if args.width % 8 or args.width > 1024:  # group norm in 8 groups; load_denoiser reads back no other width
        p.error(f"--width must be a multiple of 8 up to 1024, got {args.width}")
    if args.timesteps > 100_000:  # what load_denoiser (export, sweep) reads back: refused now, not after training
        p.error(f"--timesteps must be at most 100000, got {args.timesteps}")
    if args.job == "train":
        train(args)
        return
    if not args.checkpoint:
        raise UserError(f"sbg.py {args.job} needs --checkpoint (a denoiser.pt from `sbg.py train`)")
    if args.job == "export":
        if not args.out:
            raise UserError("sbg.py export needs --out FILE")
        files.check_output(args.out, "--out", [args.checkpoint])
        if os.path.lexists(args.out):  # only an earlier export is replaced (never a classifier or the release's fields)
            try:
                old = files.load_file(args.out, "file", mmap=True)
            except UserError:
                old = None
            if not (isinstance(old, dict) and old.get("kind") == "sbg-fields"):
                raise UserError(f"--out {args.out} exists and is not a fields file of sbg.py export; it is not "
                                "replaced: choose another path (or move it)")
        export(args)
    else:
        sweep(args)


if __name__ == "__main__":
    cli.run_cli(main)
