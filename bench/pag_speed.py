"""Cost of one PAG training step against a plain CE step and the official code's step.

    python bench/pag_speed.py --device cuda     # the paper's settings on a GPU -> bench/results/speed_gpu.json
    python bench/pag_speed.py                   # batch-norm-free models on the CPU -> bench/results/speed.json
    python bench/pag_speed.py --memory          # peak memory of the paper's settings, measured on the CPU
                                                #   -> bench/results/memory_cpu.json (11 min on 2 cores)

Each step is forward + backward + SGD update on one batch of synthetic images (the
cost does not depend on the pixels), model in train mode:
  ce     train_baseline.py's step with the CE loss alone
  pag    train_pag.py's step exactly as training runs it (train_baseline.train_step with
         train_pag.make_pag_loss: one replicated forward for CE and PAG on a GPU or under
         batch-norm, per-column products on a CPU without it; --pag-chunk passes; --amp)
  naive  the official code's step: each image repeated k times, one forward of the B*k
         replicas for the gradients and a separate forward of the batch for the CE, fp32
         with PyTorch's default precision flags (TF32 for convolutions only)
Medians over --repeats timed steps (after --warmup), and the peak memory of each: on a GPU
torch.cuda.max_memory_allocated; on a CPU the profiler's allocation events over one more step
(`cpu_peak_gib`: the tensors allocated during the step, on top of the model, its optimizer state
and the data, which a GPU's number includes; no cuDNN workspace).

--memory runs train_pag.py's step (as training runs it on a GPU: fp32, the replicated forward) once
at each paper setting on the CPU and records only its peak memory: a GPU-free check of "fits a 16 GB
card" (the official-style STL step would need about 35 GiB of RAM, so only our step is measured).
"""
import ctypes
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import data as D  # noqa: E402
import files  # noqa: E402
import ranks  # noqa: E402
import train_baseline as T  # noqa: E402
import train_pag as P  # noqa: E402
from models import build_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (arch, image size, batch, k, amp, targets per pass): the paper's settings, and STL as
# `train_pag.py --dataset stl` runs it (4 targets per pass: train_pag.PAG_DATASET_DEFAULTS).
STL_CHUNK = P.PAG_DATASET_DEFAULTS["stl10"]["pag_chunk"]
GPU_SETTINGS = [("resnet18", 32, 64, 10, "fp32", None), ("resnet18", 32, 64, 10, "bf16", None),
                ("vit", 32, 64, 10, "fp32", None), ("vit", 32, 64, 10, "bf16", None),
                ("resnet18", 96, 32, 10, "fp32", STL_CHUNK), ("resnet18", 96, 32, 10, "bf16", STL_CHUNK),
                ("cnn", 28, 64, 10, "fp32", None)]
# A CPU cannot time ResNet-18 PAG steps in minutes; these are the batch-norm-free models.
# --memory: the paper's settings in fp32 (bf16 on a CPU is 7x slower and no guide to a GPU's).
MEMORY_SETTINGS = [s for s in GPU_SETTINGS if s[4] == "fp32" and s[0] != "cnn"]
CPU_SETTINGS = [("cnn", 28, 64, 10, "fp32", None), ("vit", 32, 8, 10, "fp32", None), ("mlp", None, 128, 2, "fp32", None)]


def official_step(model, opt, batch, num_classes, k, coeff):
    """The official training step, written out independently of train_pag."""
    opt.zero_grad(set_to_none=True)
    b = len(batch.y)
    target_classes = P.sample_targets(b, num_classes, k).to(batch.x.device)
    gt_grad = torch.randn(b, k, *batch.x.shape[1:], device=batch.x.device)
    replicas = batch.x.detach().repeat_interleave(k, 0).requires_grad_(True)
    loss_t = -F.cross_entropy(model(replicas), target_classes.reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(loss_t, replicas, create_graph=True)
    cos = F.cosine_similarity(g.flatten(1), gt_grad.reshape(b * k, -1), dim=1)
    loss = F.cross_entropy(model(batch.x), batch.y) + coeff * k * (1 - cos).mean()
    loss.backward()
    opt.step()


def time_it(step, warmup, repeats, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else cpu_peak_gib(step)
    return statistics.median(times), peak


def return_freed_memory_to_the_system():
    """glibc keeps freed blocks for reuse, so one process measuring several big steps in turn ran
    out of 24 GiB of RAM: from now on blocks of 128 KiB or more are mapped, and unmapped when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def cpu_peak_gib(step):
    """Peak GiB of CPU tensor memory allocated during step(): the profiler's allocation (+) and
    free (-) events in time order, summed (live bytes), maximum taken."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 30


def precision(device, ours):
    """Our fp32 (TF32 matmuls and convolutions on a GPU, as ranks.setup_distributed sets)
    or PyTorch's defaults (the official code's: TF32 for convolutions only)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = ours
        torch.backends.cudnn.allow_tf32 = True


def make_steps(setting, device, cache_dir, formulation="auto"):
    """(the row's settings, {"ce", "pag", "naive": a training step, called with no arguments})."""
    arch, size, batch_size, k, amp, chunk = setting
    dataset = ["--dataset", "toy"] if arch == "mlp" else ["--dataset", "synthetic", "--image-size", size]
    argv = [*dataset, "--arch", arch, "--batch-size", batch_size, "--targets-per-image", k, "--amp", amp,
            "--source", "nn" if arch == "mlp" else "cm", "--cache-dir", cache_dir,
            "--pag-formulation", formulation, *(["--pag-chunk", chunk] if chunk else [])]
    raw = P.add_pag_args(T.add_common_args(cli.Parser())).parse_args(list(map(str, argv)))
    data = D.get_data(raw.dataset, train_samples=None if arch == "mlp" else max(256, batch_size),  # toy: sorted by class
                      image_size=raw.image_size).to(device)
    args = T.resolve_settings(raw, data, dataclasses.replace(P.PAG, name="bench"))
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.input_shape[0], data.input_shape[-1]).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = T.make_batch(data, torch.arange(batch_size, device=device), data.is_image, 0, 0,
                         torch.Generator().manual_seed(0))
    pag_fn, ce_fn = P.make_pag_loss(args, data), T.make_classification_loss(args, data)
    row = {"arch": arch, "image_size": size, "batch_size": batch_size, "k": k, "amp": amp, "pag_chunk": chunk,
           "formulation": formulation if formulation != "auto" else
           "replicated" if device.type == "cuda" or P.couples_samples(model) else "per-column"}
    steps = {"ce": lambda: T.train_step(model, model, opt, ce_fn, batch, amp),
             "pag": lambda: T.train_step(model, model, opt, pag_fn, batch, amp),
             "naive": lambda: official_step(model, opt, batch, data.num_classes, k, args.pag_coeff)}
    return row, steps


def bench_row(setting, device, warmup, repeats, cache_dir):
    row, steps = make_steps(setting, device, cache_dir)
    for kind, step in steps.items():
        precision(device, ours=kind != "naive")
        try:
            row[f"{kind}_seconds"], row[f"{kind}_peak_gib"] = time_it(step, warmup, repeats, device)
        except torch.cuda.OutOfMemoryError:
            row[f"{kind}_seconds"], row[f"{kind}_peak_gib"] = None, "out of memory"
            torch.cuda.empty_cache()
    if row["pag_seconds"] and row["naive_seconds"]:
        row["pag_over_naive"] = row["pag_seconds"] / row["naive_seconds"]
    return row


def memory_row(setting, cache_dir):
    """--memory: one train_pag.py step at a paper setting on the CPU, taking the gradients as a GPU
    does (the replicated forward; "auto" would take per-column products for ViT on a CPU), its
    peak memory and wall time."""
    row, steps = make_steps(setting, torch.device("cpu"), cache_dir, formulation="replicated")
    start = time.perf_counter()
    row["pag_peak_gib"] = cpu_peak_gib(steps["pag"])
    row["pag_seconds"] = time.perf_counter() - start  # profiled: slower than a plain step
    return row


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the paper's settings on the GPU")
    p.add_argument("--memory", action="store_true", help="the paper's settings on the CPU, peak memory of train_pag.py's step only")
    p.add_argument("--repeats", type=cli.positive_int, help="timed steps (default: 10 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=cli.positive_int, help="untimed steps first (default: 3 on a GPU, 1 on a CPU)")
    p.add_argument("--only", nargs="+", help="settings whose arch is one of these")
    p.add_argument("--out", help="default: bench/results/speed_gpu.json (cuda), memory_cpu.json (--memory) or speed.json")
    args = p.parse_args(argv)
    device = ranks.pick_device(args.device)
    gpu = device.type == "cuda"
    if args.memory and gpu:
        raise files.UserError("--memory measures on the CPU; on a GPU every row has its peak memory already")
    repeats, warmup = args.repeats or (10 if gpu else 3), args.warmup or (3 if gpu else 1)
    settings = MEMORY_SETTINGS if args.memory else GPU_SETTINGS if gpu else CPU_SETTINGS
    settings = [s for s in settings if not args.only or s[0] in args.only]
    out = args.out or os.path.join(RESULTS, "speed_gpu.json" if gpu else "memory_cpu.json" if args.memory else "speed.json")
    results = {"config": {"gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                          "device": str(device), "threads": torch.get_num_threads(),
                          "machine": platform.processor() or platform.machine(),
                          **({} if args.memory else {"repeats": repeats, "warmup": warmup})},
               "rows": []}
    ms = lambda s: f"{s * 1e3:.1f}ms" if s else "OOM"  # noqa: E731
    gib = lambda g: f"{g:.2f}" if isinstance(g, float) else "-"  # noqa: E731
    print(f"{'arch':>8} {'px':>4} {'B':>3} {'k':>3} {'amp':>5} {'chunk':>5} | " +
          (f"{'PAG GiB':>7} {'profiled step':>13}" if args.memory else
           f"{'CE':>8} {'PAG':>9} {'official':>9} {'PAG/off':>7} | {'PAG GiB':>7} {'off GiB':>7}"), flush=True)
    if args.memory:
        return_freed_memory_to_the_system()
    with tempfile.TemporaryDirectory() as cache_dir:  # the toy's neighbour table, not worth keeping
        for setting in settings:
            row = memory_row(setting, cache_dir) if args.memory else bench_row(setting, device, warmup, repeats, cache_dir)
            results["rows"].append(row)
            print(f"{row['arch']:>8} {str(row['image_size']):>4} {row['batch_size']:>3} {row['k']:>3} {row['amp']:>5} "
                  f"{str(row['pag_chunk'] or 'all'):>5} | " +
                  (f"{gib(row['pag_peak_gib']):>7} {row['pag_seconds']:>12.0f}s" if args.memory else
                   f"{ms(row['ce_seconds']):>8} {ms(row['pag_seconds']):>9} {ms(row['naive_seconds']):>9} "
                   f"{row.get('pag_over_naive', float('nan')):>7.2f} | {gib(row['pag_peak_gib']):>7} {gib(row['naive_peak_gib']):>7}"),
                  flush=True)
            files.write_json(results, out)  # after every row: a killed run keeps what it measured
    print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
    cli.run_cli(main)
