"""Cost of one PAG training step vs a plain CE step and the naive official-style PAG step.

    python bench/pag_speed.py                       # cnn (28 px) and resnet18 (32 px), batch 64, k = 10, CPU
    python bench/pag_speed.py --archs cnn --repeats 3 --device cuda

Each step is forward + backward + SGD update on the same model and batch:
  ce     cross-entropy only
  pag    train_pag.py's step: one forward shared by CE and PAG, one batched
         vector-Jacobian product for all k targets (double back-propagation)
  naive  the official code's shape: replicate every image k times, forward the
         B*k copies for the gradients, and a separate forward for the CE
Medians over --repeats timed steps (after --warmup) go to bench/results/speed.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import build_model  # noqa: E402
from train_pag import pag_loss, sample_targets  # noqa: E402

SHAPES = {"cnn": (1, 28), "resnet18": (3, 32), "vit": (3, 32)}


def naive_pag_loss(model, x, gt_grad, target_classes):
    """Official-code style: B*k replicated copies, gradient of -CE toward each target."""
    b, k = target_classes.shape
    xr = x.detach().repeat_interleave(k, 0).requires_grad_(True)
    loss_t = -F.cross_entropy(model(xr), target_classes.reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(loss_t, xr, create_graph=True)
    cos = F.cosine_similarity(g.flatten(1), gt_grad.reshape(b * k, -1), dim=1)
    return (1 - cos).mean()


def make_step(kind, model, opt, x, y, gt_grad, target_classes, coeff=1.5):
    def step():
        opt.zero_grad(set_to_none=True)
        if kind == "ce":
            loss = F.cross_entropy(model(x), y)
        elif kind == "pag":
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            loss = F.cross_entropy(logits, y) + coeff * 10 * pag_loss(model, xg, gt_grad, target_classes, logits)
        else:
            loss = F.cross_entropy(model(x), y) + coeff * 10 * naive_pag_loss(model, x, gt_grad, target_classes)
        loss.backward()
        opt.step()
    return step


def time_step(step, warmup, repeats, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["cnn", "resnet18"], choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speed.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    results = {"config": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "machine": platform.processor() or platform.machine(),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}, "rows": []}
    for arch in args.archs:
        channels, size = SHAPES[arch]
        torch.manual_seed(0)
        model = build_model(arch, 10, channels, size).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.rand(args.batch_size, channels, size, size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        target_classes = sample_targets(args.batch_size, 10, args.k, torch.Generator().manual_seed(0)).to(device)
        gt_grad = torch.randn(args.batch_size, args.k, channels, size, size, device=device)
        row = {"arch": arch, "batch_size": args.batch_size, "k": args.k}
        for kind in ("ce", "pag", "naive"):
            times = time_step(make_step(kind, model, opt, x, y, gt_grad, target_classes), args.warmup, args.repeats, device)
            row[f"{kind}_seconds"] = statistics.median(times)
            print(f"{arch} {kind}: median {row[f'{kind}_seconds'] * 1e3:.1f} ms over {args.repeats}", flush=True)
        row["pag_over_ce"] = row["pag_seconds"] / row["ce_seconds"]
        row["naive_over_ce"] = row["naive_seconds"] / row["ce_seconds"]
        row["naive_over_pag"] = row["naive_seconds"] / row["pag_seconds"]
        results["rows"].append(row)
        print(f"{arch}: PAG = {row['pag_over_ce']:.1f}x CE, naive = {row['naive_over_ce']:.1f}x CE, "
              f"PAG is {row['naive_over_pag']:.2f}x faster than naive", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
