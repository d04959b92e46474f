"""CPU tests for the whole project: python -m pytest -q test_all.py (`-m smoke`: the fast end-to-end ones).

Each test checks a value against an independent computation or an invariant; the command-line tests
run the real scripts on tiny `synthetic` / `toy` data. In the card's order, one class per part:

Contents (run one part with `python -m pytest -q test_all.py::TestPagLoss`; test functions per class):

  TestModels        the architectures: the official functions and parameter names, official checkpoints (7)
  TestPagLoss       the method: the PAG loss against an analytic gradient and the official replicated computation (10)
  TestSources       the ground truth (OI, CM, NN sources), datasets, the validation split and augmentation (13)
  TestTraining      the loop: settings, schedule, resume, divergence, adversarial training, torchrun (21)
  TestAttack        evaluation: PGD, AutoAttack, exact 2-D distance, alignment, results that belong to one model, pictures (14)
  TestSBG           score-based ground truth: the field against a Gaussian posterior, the denoiser, its exported fields (9)
  TestToy           the paper's 2-D toy: the draw, its ground truth, float64 training, the toy bench (10)
  TestFiles         every file read or written: no code run, schemas, atomic writes, locks, faults (14)
  TestCommandLines  every script's flags: one-line errors, numbers checked where parsed, help, pasted commands, signals (10)
  TestHouse         the code's shape: imports one way, copy-paste pieces that run alone (2)
  TestBench         bench/: statistics, the runner, the claims bench (and each source at its own λ), CIFAR-10, Table 1, speed, the GPU run (31)

Above the classes: the shared helpers and fixtures (tiny runs, one-line-error checks, reference
computations such as the official forwards and the analytic PAG loss).
"""
import argparse
import ast
import contextlib
import copy
import dataclasses
import errno
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import matplotlib.figure
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import attack
import checkpoint as C
import cli
import data as D
import sources as S
import files
import pgd as PGD
import ranks
import sbg
import toy_data
import train_baseline as T
import train_pag
from files import UserError
from models import ARCHS, build_model, Normalize
from train_baseline import add_common_args, adversarial_loss
from train_pag import chunked_pag_loss, input_gradients, pag_loss, sample_targets


# ============================================================================= helpers and fixtures


ROOT = os.path.dirname(os.path.abspath(__file__))


TINY = ["--dataset", "synthetic", "--arch", "cnn", "--image-size", "16", "--train-samples", "96",
        "--eval-samples", "48", "--batch-size", "32", "--eval-steps", "2", "--log-every", "1"]


def run(script, *args, check=True):
    """Run one of our scripts as a user would; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dead_pid():
    """The pid of a process that has ended (a killed writer's temporaries carry such a pid)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


SMOKE = ["--dataset", "synthetic", "--arch", "cnn", "--image-size", "8", "--train-samples", "32", "--eval-samples", "16",
         "--batch-size", "16", "--eval-steps", "1", "--epochs", "1"]


def analytic_pag_loss(weight, bias, x, gt_grad, target_classes):
    """For f(x) = Wx + b: grad_x log softmax_t = W_t - sum_j p_j W_j, written out by hand."""
    p = torch.softmax(x @ weight.T + bias, dim=1)  # [B, C]
    grads = weight[target_classes] - (p @ weight)[:, None, :]  # [B, k, D]
    cos = (grads * gt_grad).sum(-1) / (grads.norm(dim=-1) * gt_grad.norm(dim=-1))
    return (1 - cos).mean()


def official_replicated_pag_loss(model, x, gt_grad, target_classes):
    """Independent of train_pag: the official code's computation, written out. Every image
    repeated k times (one replica per target), ONE forward of the B*k replicas in whatever
    mode the model is in, d/d(replica) of log softmax at the replica's target, 1 - cos."""
    b, k = target_classes.shape
    replicas = torch.stack([x[i] for i in range(b) for _ in range(k)]).requires_grad_(True)
    targets = torch.tensor([int(target_classes[i, j]) for i in range(b) for j in range(k)])
    log_p = torch.log_softmax(model(replicas), dim=1)
    (g,) = torch.autograd.grad(log_p[torch.arange(b * k), targets].sum(), replicas, create_graph=True)
    gt = torch.stack([gt_grad[i, j] for i in range(b) for j in range(k)])
    cos = (g * gt).flatten(1).sum(1) / (g.flatten(1).norm(dim=1) * gt.flatten(1).norm(dim=1))
    return (1 - cos).mean()


def loss_and_weight_grads(model, fn):
    """(loss, flat gradient w.r.t. the weights) of fn(model) on a fresh copy (running statistics untouched)."""
    m = copy.deepcopy(model)
    loss = fn(m)
    grads = torch.autograd.grad(loss, [p for p in m.parameters()])
    return loss.detach(), torch.cat([g.flatten() for g in grads])


def small_batch(arch, b=3, k=4, size=8, channels=3, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, 10, channels, size).double().train()
    x = torch.rand(b, channels, size, size, dtype=torch.float64)
    t = sample_targets(b, 10, k, torch.Generator().manual_seed(seed))
    return model, x, torch.randn(b, k, channels, size, size, dtype=torch.float64), t


def tiny_data(n=60, size=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 2, size, size), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % classes
    return D.Data("synthetic", x, y, x[:10], y[:10], classes)


def brute_force_nearest_of_class(points, train_x, train_y, exclude_self=False):
    """The reference: exact float64 distances to every training point (no |a|^2 - 2ab + |b|^2 shortcut)."""
    dist = torch.cdist(points.double(), train_x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    return torch.stack([(train_y == t).nonzero().squeeze(1)[dist[:, train_y == t].argmin(1)] for t in (0, 1)], 1)


def trained_tiny_model():
    """A cnn that fits 16 px synthetic data (seconds on CPU)."""
    d = D.get_data("synthetic", train_samples=256, test_samples=64, image_size=16)
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = D.to_float(d.train_x), d.train_y
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), D.to_float(d.test_x), d.test_y


@pytest.fixture(scope="module")
def tiny_model():
    return trained_tiny_model()


class CodeInPickle:
    """Unpickling this creates `marker`: any load that runs code from a file would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_main(main, argv):
    """Run a script's main(argv) in this process as its command line would: (exit status, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.run_cli(lambda: main([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):  # sys.exit("error: ..."): Python prints it and exits 1
                err.write(code + "\n")
                code = 1
            return code, err.getvalue()
    return 0, err.getvalue()


def assert_cli_error(main, argv, *fragments):
    code, err = run_main(main, argv)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One TINY run, trained once: a folder with model.pt and metrics.jsonl that tests copy."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", out])))
    return out


@pytest.fixture(scope="module")
def toy_bench_two_seeds(tmp_path_factory):
    """bench/toy.py run once for seeds 3 and 1 (1 epoch each): the folder that the toy bench tests read."""
    out = tmp_path_factory.mktemp("toy_bench")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "toy.py"), "--out-dir", str(out), "--epochs", "1",
                           "--seed", "3", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(tiny_run, dest):
    shutil.copytree(tiny_run, dest)
    return dest


def class_coloured_folder(root, classes, n, step=40):
    """train/ and test/ with n images per class whose red channel tells the class (step * k) and green the image."""
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.new("RGB", (8, 8), (step * k, (80 // n) * i, 0)).save(root / split / c / f"{i}.png")
    return root


def make_folder(root, classes, size=8, mode="RGB", value=None, n=3):
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.new(mode, (size, size), value if value is not None else (i * 40, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def official_resnet18_forward(sd, x):
    """The official models/resnet.py ResNet-18, restated from its file in functional form (eval mode):
    inputs in [-1, 1]."""
    bn = lambda t, p: F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],  # noqa: E731
                                   False, 0.0, 1e-5)
    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for layer, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        for block in (0, 1):
            p, s = f"layer{layer}.{block}", stride if block == 0 else 1
            h = F.relu(bn(F.conv2d(out, sd[p + ".conv1.weight"], stride=s, padding=1), p + ".bn1"))
            h = bn(F.conv2d(h, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            short = bn(F.conv2d(out, sd[p + ".shortcut.0.weight"], stride=s), p + ".shortcut.1") \
                if p + ".shortcut.0.weight" in sd else out
            out = F.relu(h + short)
    return F.linear(F.adaptive_avg_pool2d(out, 1).flatten(1), sd["linear.weight"], sd["linear.bias"])


def official_vit_forward(sd, x, heads=12, layers=7):
    """The official models/ViT.py + vit_layers.py, restated in functional form: patches flattened as
    (row, column, channel), attention scaled by sqrt(width), GELU after both MLP linears."""
    b, p = x.shape[0], x.shape[-1] // 8
    words = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(b, 64, -1)
    lin = lambda t, k: F.linear(t, sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    out = torch.cat([sd["cls_token"].repeat(b, 1, 1), lin(words, "emb")], dim=1) + sd["pos_emb"]
    for i in range(layers):
        e = f"enc.{i}"
        h = ln(out, e + ".la1")
        f = h.shape[-1]
        q, k, v = (lin(h, f"{e}.msa.{n}").view(b, -1, heads, f // heads).transpose(1, 2) for n in "qkv")
        score = torch.softmax(torch.einsum("bhif,bhjf->bhij", q, k) / f ** 0.5, dim=-1)
        out = lin(torch.einsum("bhij,bhjf->bihf", score, v).flatten(2), e + ".msa.o") + out
        out = F.gelu(lin(F.gelu(lin(ln(out, e + ".la2"), e + ".mlp.0")), e + ".mlp.3")) + out
    return lin(ln(out[:, 0], "fc.0"), "fc.1")


def random_official_state(arch, seed):
    """Random weights in the official layout: every parameter and batch-norm statistic random, so that a
    key read under the wrong name changes the predictions."""
    gen = torch.Generator().manual_seed(seed)
    sd = build_model(arch, 10, 3, 32).state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith(".weight") and v.dim() == 1:  # batch-norm and layer-norm scales near 1
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=gen)
        elif v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=gen) * (0.02 if "emb" in k or "msa" in k or "mlp" in k or "fc.1" in k else 0.1)
        else:
            out[k] = v
    return out


def bench_result(row, clean, l2, linf, n=10000, **extra):
    """A result file as the bench runner writes one (the fields check_result requires)."""
    return {"key": f"{row}_seed3407", "model": row, "seed": 3407, "clean": clean, "aa_l2": l2, "aa_linf": linf,
            "settings": {"train": f"train {row}", "attack": {"test_samples": n}}, **extra}


def other_model(tiny_run, dest):
    """A copy of tiny_run whose weights differ (another model under the same kind of folder)."""
    run_dir = copy_run(tiny_run, dest)
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = ckpt["model"][key] + 0.01
    torch.save(ckpt, run_dir / "model.pt")
    return run_dir


def launch_ranks(tmp_path, per_rank_args):
    """Start one process per rank by hand (as torchrun does), each with its own flags; [(code, stderr)]."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(len(per_rank_args))}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train_baseline.py"), *map(str, args)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, args in enumerate(per_rank_args)]
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def class_mean_fields(data, noise=0.05, seed=0):
    """Fields that point from each image to each class's mean (plus noise): a strong, correctly ordered source."""
    gen = torch.Generator().manual_seed(seed)
    means = S.class_means(data.train_x, data.train_y, data.num_classes)
    x = D.to_float(data.train_x)
    g = means[None] - x[:, None]
    return g + noise * torch.randn(g.shape, generator=gen)


def save_sbg_fields(path, gt_grad, data, **extra):
    """An sbg.py export of the fields `gt_grad` for data's training images (any key replaced by `extra`); returns
    its path."""
    torch.save({"kind": "sbg-fields", "fields": gt_grad.half(), "dataset": data.name, "n": len(gt_grad), "labels": data.train_y,
                "split": "train", "train_samples": len(gt_grad), "val_samples": None, **extra}, path)
    return str(path)


def official_adjust_learning_rate(lr, epoch, epochs):
    """The official TRAIN_CIFAR10.py schedule, restated: epoch counts from 1."""
    return lr * (0.001 if epoch >= epochs else 0.01 if epoch >= 0.75 * epochs else 0.1 if epoch >= 0.5 * epochs else 1)


def blank_images(name, size=32, classes=10):
    """Two blank images of a dataset: what resolve_settings reads of loaded data (its name, classes, size)."""
    return D.Data(name, torch.zeros(2, 3, size, size, dtype=torch.uint8), torch.zeros(2), None, None, classes)


def parser_pag():
    return train_pag.add_pag_args(T.add_common_args(argparse.ArgumentParser()))


# Each piece the README offers for copy-paste, with the same-file helpers it needs (README "Copy-paste pieces").
COPY_PASTE = {
    "train_pag.pag_loss": ("train_pag", ["FORMULATIONS", "sample_targets", "couples_samples", "at_least_fp32", "input_gradients",
                                         "pag_loss"]),
    "train_pag.chunked_pag_loss": ("train_pag", ["FORMULATIONS", "couples_samples", "at_least_fp32", "input_gradients", "pag_loss",
                                                 "isolated_pass", "chunked_pag_loss"]),
    "models.from_official": ("models", ["PIXEL_MEAN", "PIXEL_STD", "ARCHS", "Normalize", "BasicBlock", "ResNet18",
                                        "Attention", "EncoderLayer", "ViT", "SmallCNN", "mlp", "build_model",
                                        "official_state_dict", "from_official", "weights_problem"]),
    "pgd.pgd": ("pgd", ["per_sample_norm", "project", "random_in_ball", "attack_loss", "pgd"]),
    "sources": ("sources", ["to_float", "class_means", "one_image_per_class", "nearest_of_class"]),
    "data.crop_flip": ("data", ["draw_crop_flip", "crop_flip"]),
}


EPS_TOY = ("1", "2", "5", "10", "15", "20", "30")


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEED_ROW_KEYS = {"arch", "image_size", "batch_size", "k", "amp", "pag_chunk", "ce_seconds", "pag_seconds",
                  "naive_seconds", "pag_peak_gib", "naive_peak_gib"}


def adv_args(**kw):
    args = add_common_args(argparse.ArgumentParser()).parse_args(["--dataset", "synthetic"])
    for k, v in {"adv_eps": 0.1, "adv_steps": 3, "adv_step_size": None, **kw}.items():
        setattr(args, k, v)
    return args


def torchrun(*args, nproc=2, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ============================================================================= TestModels
class TestModels:
    """The architectures: the official functions and parameter names, official checkpoints."""

    @pytest.mark.parametrize("arch,channels,size,count", [("resnet18", 3, 32, 11_173_962), ("vit", 3, 32, 6_268_810)])
    def test_parameter_counts_match_the_official_models(self, arch, channels, size, count):
        model = build_model(arch, 10, channels, size)
        assert sum(p.numel() for p in model.parameters()) == count

    @pytest.mark.parametrize("arch,channels,size", [("resnet18", 3, 96), ("resnet18", 1, 28), ("vit", 3, 96), ("cnn", 1, 28), ("cnn", 3, 64)])
    def test_models_run_on_other_sizes(self, arch, channels, size):
        assert build_model(arch, 7, channels, size)(torch.rand(2, channels, size, size)).shape == (2, 7)

    def test_vit_patch_follows_image_size(self):
        assert build_model("vit", 10, 3, 96).patch == 12 and build_model("vit", 10, 3, 32).patch == 4

    def test_every_vit_attention_layer_is_the_official_formula_scaled_by_the_width(self):
        """softmax(Q K^T / sqrt(384)) V per head (official vit_layers.py: sqrt_d = feats ** 0.5), written
        here head by head with explicit loops, against every layer of the model as it runs."""
        torch.manual_seed(0)
        model = build_model("vit", 10, 3, 32).double().eval()
        seen = []
        hooks = [layer.msa.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0], out))) for layer in model.enc]
        model(torch.rand(2, 3, 32, 32, dtype=torch.float64))
        for h in hooks:
            h.remove()
        assert len(seen) == 7
        for msa, x, out in seen:
            heads, width = 12, 384
            q, k, v = msa.q(x), msa.k(x), msa.v(x)
            ref = torch.empty_like(x)
            for b in range(x.shape[0]):
                for h in range(heads):
                    cols = slice(h * width // heads, (h + 1) * width // heads)
                    scores = q[b, :, cols] @ k[b, :, cols].T / width ** 0.5
                    ref[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
            assert torch.allclose(out, msa.o(ref), atol=1e-12)
            textbook = torch.softmax(q[0, :, :32] @ k[0, :, :32].T / 32 ** 0.5, dim=-1) @ v[0, :, :32]
            assert not torch.allclose(textbook, ref[0, :, :32], atol=1e-6)  # the per-head scale is another model

    def test_model_parameter_names_are_the_official_ones(self):
        vit = set(build_model("vit", 10, 3, 32).state_dict())
        assert {"emb.weight", "cls_token", "pos_emb", "enc.6.la1.weight", "enc.0.msa.q.weight", "enc.0.msa.o.bias",
                "enc.3.la2.bias", "enc.0.mlp.0.weight", "enc.0.mlp.3.weight", "fc.0.weight", "fc.1.bias"} <= vit
        assert len(vit) == 4 + 7 * 16 + 4
        rn = set(build_model("resnet18", 10, 3, 32).state_dict())
        assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
                "layer4.1.bn2.num_batches_tracked", "linear.weight"} <= rn

    @pytest.mark.parametrize("arch,wrap", [("resnet18", "module"), ("resnet18", "plain"), ("vit", "module"), ("vit", "state_dict")])
    def test_official_checkpoints_compute_the_official_function_through_attack_py(self, tmp_path, arch, wrap):
        sd = random_official_state(arch, 0)
        saved = {"module": {"module." + k: v for k, v in sd.items()}, "plain": sd, "state_dict": {"state_dict": sd}}[wrap]
        torch.save(saved, tmp_path / "official.pt")
        model, ckpt = attack.load_any_checkpoint(str(tmp_path / "official.pt"), torch.device("cpu"), "synthetic")
        assert ckpt["weights"] == "official" and ckpt["arch"] == arch
        x = D.to_float(D.get_data("synthetic", test_samples=40).test_x)
        forward = official_resnet18_forward if arch == "resnet18" else official_vit_forward
        with torch.no_grad():
            ref = forward(sd, (x - 0.5) / 0.5)  # the official model takes [-1, 1] images
            ours = model(x)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4) and torch.equal(ours.argmax(1), ref.argmax(1))
        spread = ref - ref.mean(0)  # the part of the logits that depends on the image: far above the tolerance
        assert spread.abs().max() > 1e-2 and torch.allclose(ours - ours.mean(0), spread, atol=1e-5)
        if wrap == "module":  # the whole command line: its table, and results that say whose weights they are
            proc = run("attack.py", "--checkpoint", tmp_path / "official.pt", "--dataset", "synthetic", "--attacks", "clean",
                       "--eval-samples", "40")
            res = json.loads((tmp_path / "attack.json").read_text())
            assert res["weights"] == "official" and "official release" in proc.stdout
            y = D.get_data("synthetic", test_samples=40).test_y
            assert res["clean"]["acc"] == pytest.approx((ref.argmax(1) == y).float().mean().item())

    def test_official_files_that_do_not_fit_are_refused_in_one_line(self, tmp_path):
        sd = random_official_state("resnet18", 1)
        cases = {"missing": {k: v for k, v in sd.items() if k != "layer2.0.bn1.weight"},
                 "extra": {**sd, "layer5.weight": torch.zeros(1)},
                 "shape": {**sd, "linear.weight": torch.zeros(10, 256)},
                 "finite": {**sd, "conv1.weight": sd["conv1.weight"].clone().fill_(float("inf"))},
                 "state dict": {"weights": [1, 2, 3]},
                 "recognised": {k: v for k, v in sd.items() if k != "conv1.weight"},
                 "neither": {"conv.weight": torch.zeros(3)}}
        for fragment, obj in cases.items():
            torch.save({"module." + k: v for k, v in obj.items()} if fragment not in ("state dict",) else obj, tmp_path / "o.pt")
            assert_cli_error(attack.main, ["--checkpoint", tmp_path / "o.pt", "--dataset", "synthetic", "--attacks", "clean"],
                             "official", {"missing": "missing", "extra": "unexpected", "shape": "linear.weight",
                                          "finite": "not finite", "state dict": "state dict", "neither": "neither",
                                          "recognised": "missing 'conv1.weight'"}[fragment])


# ============================================================================= TestPagLoss
class TestPagLoss:
    """The method: the PAG loss against an analytic gradient and the official replicated computation."""

    @pytest.mark.smoke
    def test_pag_loss_matches_analytic_linear_model_value_and_parameter_gradient(self):
        torch.manual_seed(0)
        model = nn.Linear(6, 4).double()
        x = torch.randn(5, 6, dtype=torch.float64)
        target_classes = sample_targets(5, 4, 3, torch.Generator().manual_seed(1))
        gt_grad = torch.randn(5, 3, 6, dtype=torch.float64)
        ours = pag_loss(model, x, gt_grad, target_classes)
        (g_ours_w, g_ours_b) = torch.autograd.grad(ours, (model.weight, model.bias))
        w = model.weight.detach().clone().requires_grad_(True)
        b = model.bias.detach().clone().requires_grad_(True)
        expected = analytic_pag_loss(w, b, x, gt_grad, target_classes)
        (g_exp_w, g_exp_b) = torch.autograd.grad(expected, (w, b))
        assert torch.allclose(ours, expected, atol=1e-12)
        # Double back-propagation: the loss is differentiable in the weights, with the right gradient.
        assert torch.allclose(g_ours_w, g_exp_w, atol=1e-12) and torch.allclose(g_ours_b, g_exp_b, atol=1e-12)
        assert g_ours_w.abs().sum() > 0

    @pytest.mark.smoke
    def test_pag_loss_is_zero_for_aligned_and_two_for_opposite_targets(self):
        torch.manual_seed(0)
        model = build_model("cnn", 10, 1, 12).double().eval()
        x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
        t = sample_targets(3, 10, 4)
        g = input_gradients(model, x, t)[0].detach()
        assert pag_loss(model, x, g, t).item() == pytest.approx(0.0, abs=1e-10)
        assert pag_loss(model, x, -3 * g, t).item() == pytest.approx(2.0, abs=1e-10)

    def test_input_gradients_match_per_sample_autograd(self):
        torch.manual_seed(0)
        model = build_model("cnn", 10, 1, 12).double().eval()
        x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
        t = sample_targets(4, 10, 3, torch.Generator().manual_seed(2))
        ours = input_gradients(model, x, t, create_graph=False)[0]
        for i in range(4):
            for j in range(3):
                xi = x[i: i + 1].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.log_softmax(model(xi), 1)[0, t[i, j]], xi)
                assert torch.allclose(ours[i, j], g[0], atol=1e-12)

    def test_pag_loss_under_train_mode_batch_norm_is_the_official_replicated_computation(self):
        model, x, gt, t = small_batch("resnet18")
        ours, g_ours = loss_and_weight_grads(model, lambda m: pag_loss(m, x, gt, t))
        ref, g_ref = loss_and_weight_grads(model, lambda m: official_replicated_pag_loss(m, x, gt, t))
        assert abs(ours - ref) < 1e-8
        assert (g_ours - g_ref).norm() <= 1e-6 * g_ref.norm()
        # The per-column products on the plain batch couple samples differently under batch-norm:
        # this is what the test tells apart (measured 0.57 relative on an H100 in float64).
        _, g_col = loss_and_weight_grads(model, lambda m: pag_loss(m, x, gt, t, formulation="per-column"))
        assert (g_col - g_ref).norm() > 1e-3 * g_ref.norm()

    @pytest.mark.parametrize("arch,mode", [("cnn", "train"), ("vit", "train"), ("resnet18", "eval"), ("mlp", "train")])
    def test_formulations_agree_where_no_layer_couples_samples(self, arch, mode):
        if arch == "mlp":
            torch.manual_seed(0)
            model = build_model("mlp", 2, 2, None).double()
            x, t = torch.randn(5, 2, dtype=torch.float64) * 20, torch.tensor([[0, 1], [1, 0]] * 2 + [[0, 1]])
            gt = torch.randn(5, 2, 2, dtype=torch.float64)
        else:
            model, x, gt, t = small_batch(arch, b=2 if arch == "vit" else 3, k=3)
        model.train(mode == "train")
        ref, g_ref = loss_and_weight_grads(model, lambda m: official_replicated_pag_loss(m, x, gt, t))
        for formulation in ("auto", "replicated", "per-column"):
            loss, g = loss_and_weight_grads(model, lambda m: pag_loss(m, x, gt, t, formulation=formulation))
            assert abs(loss - ref) < 1e-10 and (g - g_ref).norm() <= 1e-8 * g_ref.norm(), formulation

    def test_the_replicated_forward_gives_the_plain_batch_logits_for_the_ce(self):
        model, x, gt, t = small_batch("resnet18")
        _, logits = pag_loss(model, x, gt, t, return_logits=True)
        assert torch.allclose(logits, copy.deepcopy(model)(x), atol=1e-10)  # train mode: the same batch statistics

    def test_chunked_pag_loss_matches_its_definition_and_updates_running_statistics_once(self):
        weight, chunk = 7.0, 2
        for arch in ("cnn", "resnet18"):
            model, x, gt, t = small_batch(arch, k=5)
            m = copy.deepcopy(model)
            loss, logits, pag = chunked_pag_loss(m, x, gt, t, weight, chunk)
            loss.backward()
            got = torch.cat([p.grad.flatten() for p in m.parameters()])
            # Definition: each pass of `chunk` targets is its own replicated forward; passes weigh by their share.
            parts = [(s, min(s + chunk, 5)) for s in range(0, 5, chunk)]
            ref_value, ref_grad = 0.0, 0.0
            for a, b in parts:
                v, g = loss_and_weight_grads(model, lambda mm: official_replicated_pag_loss(mm, x, gt[:, a:b], t[:, a:b]))
                ref_value, ref_grad = ref_value + v * (b - a) / 5, ref_grad + weight * g * (b - a) / 5
            assert abs(pag - ref_value) < 1e-8 and (got - ref_grad).norm() <= 1e-6 * ref_grad.norm(), arch
            assert abs(loss.item() - weight * ref_value) < 1e-8  # the value is the whole term, the graph the last pass
            if arch == "cnn":  # nothing couples samples: chunking changes nothing
                full, g_full = loss_and_weight_grads(model, lambda mm: weight * pag_loss(mm, x, gt, t))
                assert (got - g_full).norm() <= 1e-8 * g_full.norm()
            else:  # three passes, one update of the running statistics, with the batch's mean
                bn, bn0 = m.bn1, model.bn1
                assert int(bn.num_batches_tracked) == int(bn0.num_batches_tracked) + 1
                once = copy.deepcopy(model)
                once(x)
                assert torch.allclose(bn.running_mean, once.bn1.running_mean, atol=1e-12)
                assert not torch.allclose(bn.running_mean, bn0.running_mean)
            # The logits (for the CE) come from the last pass: the plain batch's, as replicas are exact.
            assert torch.allclose(logits, copy.deepcopy(model)(x), atol=1e-10), arch

    def test_targets_per_pass_bound_the_memory_of_a_step(self):
        """What --pag-chunk is for: every pass but the last is back-propagated at once, so only one pass's
        double-backward graph is alive and a step's peak memory scales with the targets per pass (the
        replicated forward, as on a GPU; measured with bench/pag_speed.py's profiler count: 112, 56 and
        22 MiB for 10, 5 and 2 of 10 targets per pass)."""
        cpu_peak_gib = load_bench("pag_speed").cpu_peak_gib
        torch.manual_seed(0)
        model = build_model("cnn", 10, 1, 28).train()
        x, t, gt = torch.rand(16, 1, 28, 28), sample_targets(16, 10, 10), torch.randn(16, 10, 1, 28, 28)

        def step(chunk):
            model.zero_grad(set_to_none=True)
            loss = chunked_pag_loss(model, x, gt, t, 1.0, chunk, formulation="replicated")[0]
            loss.backward()
        peak = {chunk: cpu_peak_gib(lambda: step(chunk)) for chunk in (10, 5, 2)}
        assert 0.45 * peak[10] < peak[5] < 0.55 * peak[10] and 0.15 * peak[10] < peak[2] < 0.25 * peak[10], peak

    def test_pag_loss_under_bf16_autocast_is_close_to_fp32(self):
        torch.manual_seed(0)
        model = build_model("cnn", 10, 1, 16).train()
        x, t = torch.rand(8, 1, 16, 16), sample_targets(8, 10, 10, torch.Generator().manual_seed(0))
        gt = input_gradients(model, x, t)[0].detach() + 1e-4 * torch.randn(8, 10, 1, 16, 16)  # nearly aligned
        fp32 = pag_loss(model, x, gt, t).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, logits = pag_loss(model, x, gt, t, return_logits=True)
        assert logits.dtype == torch.bfloat16 and bf16.dtype == torch.float32  # cosines and losses in fp32
        assert abs(bf16.item() - fp32) < 0.05 and torch.isfinite(bf16)

    def test_sample_targets_are_distinct_classes_per_image(self):
        t = sample_targets(50, 10, 7, torch.Generator().manual_seed(0))
        assert t.shape == (50, 7) and t.min() >= 0 and t.max() < 10
        assert all(len(set(row.tolist())) == 7 for row in t)
        full = sample_targets(20, 10, 10)
        assert (full.sort(1).values == torch.arange(10)).all()


# ============================================================================= TestSources
class TestSources:
    """The ground truth (OI, CM, NN sources), datasets, the validation split and augmentation."""

    def test_nearest_of_class_matches_brute_force_and_never_returns_itself(self):
        d = tiny_data()
        xf = D.to_float(d.train_x).flatten(1)
        dist = torch.cdist(xf.double(), xf.double())
        dist.fill_diagonal_(float("inf"))
        ours = S.nearest_of_class(d.train_x, d.train_x, d.train_y, 3, query_idx=torch.arange(60), chunk=7)
        for t in range(3):
            masked = dist.clone()
            masked[:, d.train_y != t] = float("inf")
            assert (ours[:, t] == masked.argmin(1)).all()
            assert (d.train_y[ours[:, t]] == t).all()
        assert (ours != torch.arange(60)[:, None]).all()

    def test_nearest_of_class_agrees_with_a_brute_force_search_on_the_toy(self):
        train_x, train_y, test_x, _ = D.make_toy(seed=1, train_per_mode=50, test_per_mode=10, dtype=torch.float64)
        ours = S.nearest_of_class(train_x, train_x, train_y, 2, query_idx=torch.arange(len(train_x)), chunk=64)
        assert (ours == brute_force_nearest_of_class(train_x, train_x, train_y, exclude_self=True)).all()
        assert (S.nearest_of_class(test_x, train_x, train_y, 2) == brute_force_nearest_of_class(test_x, train_x, train_y)).all()

    @pytest.mark.smoke
    def test_sources_cm_oi_nn(self, tmp_path):
        d = tiny_data()
        x = D.to_float(d.train_x[:8])
        idx = torch.arange(8)
        t = sample_targets(8, 3, 3)
        cm = S.make_source("cm", d)(x, t, idx)
        means = torch.stack([D.to_float(d.train_x[d.train_y == c]).mean(0) for c in range(3)])
        assert torch.allclose(cm, means[t] - x[:, None], atol=1e-6)
        oi_reps = S.make_source("oi", d, seed=5)(torch.zeros_like(x), t, idx)  # r_t - 0 = r_t
        for c in range(3):  # one fixed training image per class, of that class
            rep = oi_reps[t == c][0]
            match = [i for i in range(60) if torch.equal(D.to_float(d.train_x[i]), rep)]
            assert match and all(d.train_y[i] == c for i in match) and (oi_reps[t == c] == rep).all()
        nn_src = S.make_source("nn", d, cache_dir=str(tmp_path))
        g = nn_src(x, t, idx)
        assert len(os.listdir(tmp_path)) == 1  # cached
        neighbours = g + x[:, None]
        for i in range(8):
            for j in range(3):
                assert not torch.equal(neighbours[i, j], x[i])  # never the image itself
        assert torch.allclose(S.make_source("nn", d, cache_dir=str(tmp_path))(x, t, idx), g)  # from the cache

    @pytest.mark.smoke
    def test_crop_flip_matches_per_sample_reference_and_moves_fields_with_image(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(6, 3, 8, 8, generator=gen)
        fields = torch.rand(6, 4, 3, 8, 8, generator=gen)
        offsets, flips = D.draw_crop_flip(6, 4, gen)
        xa, fa = D.crop_flip(x, offsets, flips), D.crop_flip(fields, offsets, flips)
        for i in range(6):
            ref = F.pad(x[i], (4, 4, 4, 4))[:, offsets[i, 0]: offsets[i, 0] + 8, offsets[i, 1]: offsets[i, 1] + 8]
            ref = ref.flip(-1) if flips[i] else ref
            assert torch.equal(xa[i], ref)
            for j in range(4):
                f = F.pad(fields[i, j], (4, 4, 4, 4))[:, offsets[i, 0]: offsets[i, 0] + 8, offsets[i, 1]: offsets[i, 1] + 8]
                assert torch.equal(fa[i, j], f.flip(-1) if flips[i] else f)
        # Linear: cropping r - x equals cropped r minus cropped x (so targets stay consistent).
        r = torch.rand(6, 3, 8, 8, generator=gen)
        assert torch.allclose(D.crop_flip(r - x, offsets, flips), D.crop_flip(r, offsets, flips) - xa)
        assert flips.any() and (~flips).any()

    @pytest.mark.smoke
    def test_training_crops_pad_images_with_the_models_zero_and_fields_with_zero(self):
        """The official code crops images in [-1, 1] with zero padding: mid-grey. Our images are [0, 1] pixels,
        so they pad with 0.5, which the model's Normalize maps to 0; target fields pad with 0."""
        n = 64
        data = D.Data("cifar10", torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.arange(n) % 10, None, None, 10)
        batch = T.make_batch(data, torch.arange(n), True, 0, 0, torch.Generator().manual_seed(0))
        fields = batch.augment(torch.ones(n, 2, 3, 8, 8))
        shifted = (batch.x == 0.5).flatten(1).any(1)  # black images: only padding is grey
        assert shifted.sum() > n // 2 and set(batch.x.unique().tolist()) == {0.0, 0.5}
        assert torch.equal(Normalize()(batch.x)[batch.x == 0.5], torch.zeros(int((batch.x == 0.5).sum())))
        assert torch.equal((fields[:, 0] == 0), (batch.x == 0.5)) and set(fields.unique().tolist()) == {0.0, 1.0}

    def test_fashion_mnist_idx_reader(self, tmp_path):
        arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
        header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
        with gzip.open(tmp_path / "a.gz", "wb") as f:
            f.write(header + arr.tobytes())
        assert (files.read_idx(str(tmp_path / "a.gz")) == arr).all()

    def test_folder_dataset(self, tmp_path):
        for split, n in (("train", 4), ("test", 2)):
            for c in ("cat", "dog"):
                os.makedirs(tmp_path / split / c)
                for i in range(n):
                    Image.new("RGB", (10, 10), (i * 40, 100 if c == "dog" else 0, 0)).save(tmp_path / split / c / f"{i}.png")
        d = D.get_data("folder", str(tmp_path))
        assert d.train_x.shape == (8, 3, 10, 10) and d.test_x.shape == (4, 3, 10, 10) and d.num_classes == 2
        assert d.train_x.dtype == torch.uint8 and set(d.train_y.tolist()) == {0, 1}
        assert int(d.train_x[d.train_y == 1][0, 1, 0, 0]) == 100
        assert D.get_data("folder", str(tmp_path), image_size=6).train_x.shape == (8, 3, 6, 6)

    def test_subsets_of_class_sorted_data_are_fair_samples_of_every_class(self, tmp_path):
        """A folder is read class by class and the toy drawn mode by mode: N of their images (--train-samples,
        --eval-samples) are a fair sample of the classes, every prefix of data.fair_order holding each class in
        proportion to its size (within one image for classes of one size, within 0.5 + C p / 2 for a class of share
        p), not the first class's N. Shuffled files keep their first N."""
        gen = torch.Generator().manual_seed(0)
        for sizes in ([50, 30, 7, 13], [7, 10, 4, 59], [5, 5, 5], *([int(v) for v in torch.randint(1, 40, (k,), generator=gen)]
                                                                     for k in (2, 3, 5, 8, 10))):
            labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
            order, total, share = D.fair_order(labels), len(labels), torch.tensor(sizes, dtype=torch.float64) / len(labels)
            assert sorted(order.tolist()) == list(range(total)) and torch.equal(order, D.fair_order(labels.clone()))
            bound = 1.0 if len(set(sizes)) == 1 else 0.5 + len(sizes) * share / 2 + 1e-9
            for n in range(1, total + 1):
                off = (labels[order[:n]].bincount(minlength=len(sizes)).double() - n * share).abs()
                assert (off <= bound).all(), (sizes, n, off)
        labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 7 + [3] * 13)
        order = D.fair_order(labels)
        within_class = order[labels[order] == 0][:10]  # a class's images in a fixed random order, not its first ten
        assert sorted(within_class.tolist()) != list(range(10))
        root = class_coloured_folder(tmp_path / "f", ("a", "b", "c"), 5)
        full = D.get_data("folder", str(root))
        d = D.get_data("folder", str(root), train_samples=8, test_samples=6)
        assert d.train_y.bincount().tolist() == [3, 3, 2] and d.test_y.bincount().tolist() == [2, 2, 2]
        # the images are the folder's own, each with its own label (a class is its red channel here)
        assert torch.equal(d.train_x[:, 0, 0, 0], 40 * d.train_y.to(torch.uint8))
        assert len({bytes(x.numpy()) for x in d.train_x}) == 8
        # the whole set keeps the folder's order: committed whole-set results are unchanged
        assert torch.equal(D.get_data("folder", str(root), train_samples=15).train_x, full.train_x)
        toy = D.get_data("toy", train_samples=2000, test_samples=60)
        assert toy.train_y.bincount().tolist() == [1000, 1000] and toy.test_y.bincount().tolist() == [30, 30]
        modes = ((toy.train_x[:, 0] + 50) / 20).round()  # every mode of both classes is in the subset, not one mode's points
        assert len(set(modes.tolist())) == 6
        syn, all_syn = D.get_data("synthetic", train_samples=37, image_size=8), D.get_data("synthetic", image_size=8)
        assert torch.equal(syn.train_x, all_syn.train_x[:37])  # shuffled files: their first N, as before
        assert D.class_counts_text(d.train_y, 3, ("a", "b", "c")) == "per class 3 a, 3 b, 2 c"
        assert D.class_counts_text(d.test_y, 3) == "2 per class"
        assert D.class_counts_text(torch.tensor([0, 0, 0, 1]), 2) == "per class 3, 1 (classes 0-1)"
        # The per-epoch check on held-out images takes its subset the same way (the validation images are a random
        # subset kept in the data's order: on the toy, class 0's first).
        toy_val = D.get_data("toy", val_samples=3000)
        _, y = T.eval_images(toy_val, 500)
        assert len(y) == 500 and y.bincount().min() >= 240

    def test_dataset_aliases_and_unknown_dataset(self):
        assert D.canonical_dataset("stl") == "stl10" and D.canonical_dataset("CIFAR10") == "cifar10"
        with pytest.raises(UserError):
            D.canonical_dataset("imagenet")

    def test_folder_images_decode_faithfully_or_are_refused(self, tmp_path):
        root = make_folder(tmp_path / "f", ["cat", "dog"], mode="L", value=7)
        cat = root / "train" / "cat"
        Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(cat / "sixteen.png")  # 16-bit: 32768 / 65535 -> 128
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(cat / "float.tiff")   # float: 0.5 -> 128
        Image.fromarray(np.full((8, 8), 65535, np.int32)).save(cat / "int.tiff")     # 32-bit within 16 bits -> 255
        d = D.get_data("folder", str(root))
        files_in_order = sorted(["0.png", "1.png", "2.png", "float.tiff", "int.tiff", "sixteen.png"])
        values = {f: int(d.train_x[i].float().mean()) for i, f in enumerate(files_in_order)}
        assert d.train_x.shape[1] == 1 and values["sixteen.png"] == 128 and values["float.tiff"] == 128
        assert values["int.tiff"] == 255 and values["0.png"] == 7
        # One colour image makes the whole set RGB, grey images repeated over the channels (whichever comes first).
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "train" / "dog" / "zz_colour.png")
        d = D.get_data("folder", str(root))
        assert d.train_x.shape[1] == 3 and (d.train_x[:6] == d.train_x[:6, :1]).all() and d.train_x[-1, 0].max() == 200
        assert d.test_x.shape[1] == 3
        for bad, fragment in [(np.full((8, 8), 70000, np.int32), "outside 0..65535"), (np.full((8, 8), 2.5, np.float32), "outside [0, 1]")]:
            Image.fromarray(bad).save(cat / "bad.tiff")
            assert_cli_error(T.main, ["--dataset", "folder", "--data-dir", root, "--out-dir", tmp_path / "o"], "bad.tiff", fragment)
        os.remove(cat / "bad.tiff")
        # A link loop is followed once: no image is read twice, no label changes.
        os.symlink(root / "train", root / "train" / "cat" / "loop")
        assert len(D.get_data("folder", str(root)).train_y) == 10
        os.symlink(root / "train" / "dog", root / "train" / "pup")  # one folder under two class names
        assert_cli_error(T.main, ["--dataset", "folder", "--data-dir", root, "--out-dir", tmp_path / "o"], "dog", "pup", "two labels")
        os.remove(root / "train" / "pup")
        os.mkfifo(cat / "pipe.png")  # a FIFO would hang the read
        assert_cli_error(T.main, ["--dataset", "folder", "--data-dir", root, "--out-dir", tmp_path / "o"], "pipe.png", "not a regular file")
        os.remove(cat / "pipe.png")
        Image.new("1", (14000, 14000)).save(cat / "bomb.png")  # 196 M pixels: PIL's decompression-bomb limit
        assert_cli_error(T.main, ["--dataset", "folder", "--data-dir", root, "--out-dir", tmp_path / "o"], "bomb.png", "too large")
        assert not (tmp_path / "o").exists()

    def test_validation_split_is_held_out_and_the_per_epoch_check_uses_it(self, tmp_path):
        full = D.get_data("synthetic", image_size=8)
        d = D.get_data("synthetic", image_size=8, val_samples=100, train_samples=300)
        again = D.get_data("synthetic", image_size=8, val_samples=100)
        assert len(d.val_y) == 100 and len(d.train_y) == 300 and len(again.train_y) == len(full.train_y) - 100
        rows = lambda t: {tuple(r.tolist()) for r in t.flatten(1)}  # noqa: E731
        assert not rows(d.val_x) & rows(again.train_x)  # never trained on
        assert rows(d.val_x) | rows(again.train_x) == rows(full.train_x) and torch.equal(d.val_x, again.val_x)  # fixed
        assert torch.equal(d.train_x, again.train_x[:300]) and torch.equal(d.test_x, full.test_x)
        assert set(D.get_data("toy", val_samples=200).val_y.tolist()) == {0, 1}  # random, not the last (sorted) points
        run("train_baseline.py", *TINY, "--val-samples", "40", "--eval-samples", "40", "--epochs", "1", "--out-dir", tmp_path / "v")
        line = json.loads((tmp_path / "v" / "metrics.jsonl").read_text())
        assert line["eval_split"] == "val" and "test_acc" not in line and 0 <= line["val_pgd_l2_0.5_acc"] <= line["val_acc"]
        model = C.load_checkpoint(str(tmp_path / "v" / "model.pt"))[0]
        dv = D.get_data("synthetic", image_size=16, train_samples=96, val_samples=40)
        assert line["val_acc"] == pytest.approx((PGD.predict(model, D.to_float(dv.val_x)) == dv.val_y).float().mean().item())
        assert_one_line_error(run("train_baseline.py", *TINY, "--val-samples", "1024", check=False), "--val-samples 1024")

    def test_a_missing_dataset_is_downloaded_by_default_and_never_when_forbidden(self, tmp_path, monkeypatch):
        # Forbidden: one line that says what to fetch and where; no folder made.
        assert_cli_error(T.main, ["--dataset", "stl", "--no-download", "--data-dir", tmp_path / "d" / "data",
                                  "--out-dir", tmp_path / "r"], "--no-download", "stl10_binary", "fetch")
        assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()
        # By default it is fetched (here the network is down): the failed download leaves no folder either.
        calls = []

        def offline(*a, **k):
            calls.append(a)
            raise urllib.error.URLError("Temporary failure in name resolution")
        monkeypatch.setattr(urllib.request, "urlopen", offline)
        assert_cli_error(T.main, ["--dataset", "cifar10", "--data-dir", tmp_path / "d" / "data", "--out-dir", tmp_path / "r"],
                         "could not download", "cifar-10-batches-py")
        assert calls and not (tmp_path / "d").exists() and not (tmp_path / "r").exists()

    def test_data_seed_is_refused_for_data_that_is_not_drawn(self):
        assert_one_line_error(run("train_baseline.py", *TINY, "--data-seed", 1, check=False), "--data-seed", "synthetic")


# ============================================================================= TestTraining
class TestTraining:
    """The loop: settings, schedule, resume, divergence, adversarial training, torchrun."""

    def test_a_pag_run_that_stays_at_chance_says_so_with_what_to_try(self, tmp_path, capsys):
        """After epoch 2 or 3, accuracy near chance (below chance + a tenth of the way to 100%) while the PAG term is
        at least a quarter of the classification loss: one warning line with a smaller --pag-coeff to try."""
        args = argparse.Namespace(pag_coeff=0.25, pag_first_half_scale=1.0, epochs=10, eval_samples=20)
        images = torch.zeros(20, 3, 8, 8, dtype=torch.uint8)
        data = D.Data("folder", images, torch.arange(20) % 10, images, torch.arange(20) % 10, 10)
        row = {"epoch": 2, "eval_split": "test", "test_acc": 0.134, "ce": 2.29, "pag": 0.9}
        warning = train_pag.not_learning(row, args, data)
        assert "13.4%" in warning and "chance (10.0%)" in warning and "= 2.25" in warning and "--pag-coeff 0.08" in warning
        # Chance is the check's most common class: a run that answers it always, on imbalanced images, is flagged too.
        skewed = D.Data("folder", images, torch.arange(20) % 10, images, (torch.arange(20) >= 16).long(), 10)
        assert "near chance (80.0%)" in train_pag.not_learning({**row, "test_acc": 0.8}, args, skewed)
        for quiet in ({"test_acc": 0.19}, {"epoch": 1}, {"epoch": 4}, {"pag": 0.2}):  # learning, too early or late, small term
            assert train_pag.not_learning({**row, **quiet}, args, data) is None, quiet
        adv = {k: v for k, v in row.items() if k != "ce"} | {"adv": 2.0, "epoch": 3}
        assert "loss of 2.00" in train_pag.not_learning(adv, args, data)
        assert train_pag.not_learning({k: v for k, v in row.items() if k != "pag"}, args, data) is None  # no PAG term
        # The loop prints what check_epoch returns, after the epoch's line.
        p = add_common_args(cli.Parser())
        T.train(p.parse_args([str(a) for a in [*TINY, "--epochs", "2", "--out-dir", tmp_path / "r"]]),
                dataclasses.replace(T.BASELINE, check_epoch=lambda r, a, d: f"checked epoch {r['epoch']} of {a.epochs} "
                                                                          f"({d.num_classes} classes)"))
        out = capsys.readouterr().out.splitlines()
        at = out.index("warning: checked epoch 2 of 2 (10 classes)")
        assert out[at - 1].startswith("epoch 2:")

    @pytest.mark.smoke
    def test_smoke_train_baseline_then_attack(self, tmp_path):
        run("train_baseline.py", *SMOKE, "--out-dir", tmp_path)
        proc = run("attack.py", "--checkpoint", tmp_path, "--attacks", "clean", "pgd-l2", "--steps", "2", "--eval-samples", "16")
        res = json.loads((tmp_path / "attack.json").read_text())
        assert 0 <= res["pgd_l2"]["0.5"]["acc"] <= res["clean"]["acc"] <= 1 and "wrote" in proc.stdout

    @pytest.mark.smoke
    def test_smoke_train_pag(self, tmp_path):
        run("train_pag.py", *SMOKE, "--targets-per-image", "3", "--out-dir", tmp_path)
        line = json.loads((tmp_path / "metrics.jsonl").read_text())
        assert 0 <= line["pag"] <= 2 and line["epoch"] == 1

    def test_settings_are_resolved_once_from_one_table_per_dataset(self):
        """resolve_settings: the dataset's row, the architecture's, then what follows from the loaded data (a folder's
        classes and image size); the result is read-only."""
        parser = T.add_common_args(argparse.ArgumentParser())
        resolve = lambda p, argv, data, name="baseline": T.resolve_settings(p.parse_args(argv), data,  # noqa: E731
                                                                            dataclasses.replace(T.BASELINE, name=name))
        fm = resolve(parser, ["--dataset", "fashion-mnist"], blank_images("fashion-mnist", 28))
        assert (fm.arch, fm.optimizer, fm.lr, fm.lr_drops, fm.weight_decay, fm.augment) == ("cnn", "adam", 1e-3, [], 0.0, False)
        cifar = resolve(parser, ["--dataset", "cifar10"], blank_images("cifar10"))
        assert (cifar.arch, cifar.optimizer, cifar.lr, cifar.lr_drops, cifar.weight_decay, cifar.batch_size, cifar.augment) == \
            ("resnet18", "sgd", 0.01, [0.5, 0.75], 1e-4, 64, True)
        assert (cifar.run_name, cifar.out_dir) == ("baseline", os.path.join("runs", "baseline_cifar10_resnet18"))
        with pytest.raises(AttributeError, match="resolved once"):
            cifar.lr = 1.0
        assert resolve(parser, ["--dataset", "stl"], blank_images("stl10", 96), "b").batch_size == 32
        assert resolve(parser, ["--dataset", "folder"], blank_images("folder", 32)).augment
        assert not resolve(parser, ["--dataset", "folder"], blank_images("folder", 16)).augment
        assert resolve(parser, ["--dataset", "folder", "--augment"], blank_images("folder", 16)).augment
        assert not resolve(parser, ["--dataset", "cifar10", "--no-augment"], blank_images("cifar10")).augment
        with pytest.raises(UserError, match="--standardize is for the toy"):
            resolve(parser, ["--dataset", "cifar10", "--standardize"], blank_images("cifar10"))

    def test_pag_settings_and_lambda_per_epoch_come_from_one_place(self):
        """The source, k and lambda resolved with the rest (a folder's classes known once loaded); the weight on
        the PAG term per epoch from one function, train_pag.pag_weight."""
        resolve = lambda argv, data, name="pag": T.resolve_settings(parser_pag().parse_args(argv), data,  # noqa: E731
                                                                    dataclasses.replace(train_pag.PAG, name=name))
        stl = resolve(["--dataset", "stl"], blank_images("stl10", 96), lambda s: f"pag_{s.source}")
        assert (stl.pag_chunk, stl.source, stl.pag_coeff, stl.pag_first_half_scale, stl.targets_per_image, stl.run_name) == \
            (4, "cm", 1.5, 1.0, 10, "pag_cm")
        vit = resolve(["--dataset", "cifar10", "--arch", "vit", "--sbg-file", "f.pt", "--epochs", "10"], blank_images("cifar10"))
        assert (vit.pag_chunk, vit.source, vit.pag_coeff, vit.pag_first_half_scale) == (None, "sbg", 3.0, 2 / 3)
        # lambda per epoch: lambda x C, times 2/3 in the first half for the vit (epochs 0-4 of 10)
        assert [train_pag.pag_weight(vit, 10, e) for e in (0, 4, 5, 9)] == pytest.approx([20.0, 20.0, 30.0, 30.0])
        # CIFAR-100: lambda * C * mean over 10 targets = 1.5 * 10 * mean, the official code's weight (docs/choices.md)
        c100 = resolve(["--dataset", "cifar100"], blank_images("cifar100", 32, 100))
        assert c100.pag_coeff == pytest.approx(0.15) and train_pag.pag_weight(c100, 100, 0) == pytest.approx(1.5 * 10)
        assert train_pag.pag_coeff_default("vit", 20) == pytest.approx(1.5) and train_pag.pag_coeff_default("cnn", 10, "fashion-mnist") == 0.25
        # The cnn on natural images: 0.1 (at 0.25 it stays near chance on CIFAR-10 images), on any folder of them.
        assert [resolve(["--dataset", d, "--arch", "cnn"], blank_images(d)).pag_coeff for d in ("folder", "cifar10", "stl10")] \
            == [0.1, 0.1, 0.1] and resolve(["--dataset", "fashion-mnist"], blank_images("fashion-mnist", 28)).pag_coeff == 0.25
        folder = resolve(["--dataset", "folder"], blank_images("folder", 32, 20))  # known once loaded: 20 classes
        assert (folder.pag_coeff, folder.targets_per_image) == (pytest.approx(0.75), 10)
        with pytest.raises(UserError, match=r"--targets-per-image must be in 1..10, got 11"):
            resolve(["--dataset", "cifar10", "--targets-per-image", "11"], blank_images("cifar10"))
        toy_data_ = D.Data("toy", torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2), None, None, 2)
        toy = resolve(["--dataset", "toy", "--pag-coeff", "7"], toy_data_)
        assert (toy.arch, toy.source, toy.pag_coeff, toy.optimizer, toy.lr, toy.augment) == ("mlp", "nn", 7.0, "adam", 0.01, False)
        assert set(train_pag.PAG_ARCH_DEFAULTS) == set(ARCHS)  # every architecture has its row

    def test_baseline_and_pag_cli_one_epoch_and_attack_reads_the_checkpoint(self, tmp_path):
        run("train_baseline.py", *TINY, "--epochs", "1", "--out-dir", tmp_path / "base")
        run("train_pag.py", *TINY, "--epochs", "1", "--source", "nn", "--cache-dir", tmp_path / "cache",
            "--targets-per-image", "4", "--pag-chunk", "3", "--out-dir", tmp_path / "pag")
        for name in ("base", "pag"):
            line = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
            assert line["epoch"] == 1 and 0 <= line["test_pgd_l2_0.5_acc"] <= line["test_acc"] <= 1
            ckpt = torch.load(tmp_path / name / "model.pt", weights_only=True)
            assert ckpt["arch"] == "cnn" and ckpt["epoch"] == 1 and ckpt["input_shape"] == (3, 16, 16)
        assert "pag" in line and 0 <= line["pag"] <= 2 and ckpt["args"]["source"] == "nn"
        out = tmp_path / "res.json"
        proc = run("attack.py", "--checkpoint", tmp_path / "pag" / "model.pt", "--attacks", "clean", "pgd-l2", "pgd-linf",
                   "align", "visualize", "--n-samples", "20", "--steps", "3", "--cache-dir", tmp_path / "cache",
                   "--vis-images", "2", "--vis-steps", "2", "--out", out)
        res = json.loads(out.read_text())
        assert res["clean"]["eval_samples"] == 20 and set(res["pgd_l2"]) == {"0.5"} and set(res["pgd_linf"]) == {f"{8 / 255:g}"}
        assert res["pgd_l2"]["0.5"]["acc"] <= res["clean"]["acc"] and -1 <= res["align"]["nn test"]["cos"] <= 1
        assert os.path.getsize(res["visualize"]["path"]) > 0 and "clean" in proc.stdout

    @pytest.mark.parametrize("script,extra", [("train_baseline.py", []),
                                              ("train_pag.py", ["--source", "cm", "--targets-per-image", "3"])])
    def test_resume_ends_where_an_uninterrupted_run_does(self, tmp_path, script, extra):
        args = [*TINY, "--epochs", "2", "--lr-drops", "0.5", *extra]
        run(script, *args, "--out-dir", tmp_path / "full")
        run(script, *args, "--out-dir", tmp_path / "cut", "--stop-after-epoch", "1")
        assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
        if script == "train_baseline.py":  # a checkpoint of format 3 (its data-order generator under "generator") resumes too
            old = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
            old["generator"], old["format"] = old.pop("data_order_generator"), 3
            torch.save(old, tmp_path / "cut" / "model.pt")
        run(script, *args, "--out-dir", tmp_path / "cut", "--resume")
        full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
        cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
        assert cut["format"] == C.CHECKPOINT_FORMAT == 5 and "generator" not in cut and "data_order_generator" in cut
        for k, v in full["model"].items():
            assert torch.equal(v, cut["model"][k]), k
        lines = [[json.loads(s) for s in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "cut")]
        strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
        assert strip(lines[0]) == strip(lines[1]) and len(lines[0]) == 2

    @pytest.mark.parametrize("epochs,expected", [(1, [0.01]), (2, [0.01, 1e-5]), (3, [0.01, 0.001, 1e-5])])
    def test_lr_never_drops_before_the_first_epoch_ends_and_metrics_log_the_rate_used(self, tmp_path, epochs, expected):
        T.main(list(map(str, [*TINY, "--epochs", epochs, "--lr", "0.01", "--lr-drops", "0.5,0.75", "--out-dir", tmp_path])))
        rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in rows] == pytest.approx(expected)

    @pytest.mark.parametrize("epochs", [4, 7, 10, 100])
    def test_the_lr_schedule_is_the_official_one(self, epochs):
        model = nn.Linear(2, 2)
        args = adv_args(epochs=epochs, lr_drops=[0.5, 0.75], optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
        opt, sched = T.make_optimizer(model, args)
        used = []
        for _ in range(epochs):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert used == pytest.approx([official_adjust_learning_rate(0.01, e, epochs) for e in range(1, epochs + 1)])

    def test_the_last_partial_batch_is_dropped_as_the_official_loader_does(self, tmp_path):
        sizes = []

        def make_loss(args, data):
            base = T.make_classification_loss(args, data)
            return lambda model, train_model, batch: (sizes.append(len(batch.y)), base(model, train_model, batch))[1]
        p = T.add_common_args(cli.Parser())
        T.train(p.parse_args([*TINY, "--train-samples", "90", "--epochs", "2", "--out-dir", str(tmp_path / "r")]),
                T.Method(make_loss=make_loss))
        assert sizes == [32, 32] * 2  # 90 = 2 x 32 + 26: the 26 never train
        assert_cli_error(T.main, [*TINY, "--train-samples", "20", "--out-dir", tmp_path / "s"], "20 training image", "--batch-size")

    def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(self, tmp_path):
        # Real divergence: nothing is saved, the error names the epoch, the batch and the term.
        assert_cli_error(T.main, [*TINY, "--lr", "1e6", "--epochs", "2", "--out-dir", tmp_path / "lr"], "epoch 1, batch", "CE")
        assert not (tmp_path / "lr" / "model.pt").exists()
        assert_cli_error(train_pag.main, [*TINY, "--pag-coeff", "1e6", "--lr", "1", "--source", "cm", "--epochs", "2",
                                          "--out-dir", tmp_path / "pag"], "diverged", "PAG")
        # A term that turns NaN in the second epoch: epoch 1 stays, metrics stay JSON, --resume continues.
        def make_loss(bad_epoch):
            def factory(args, data):
                ce = T.make_classification_loss(args, data)

                def loss_fn(model, train_model, batch):
                    loss, logs = ce(model, train_model, batch)
                    if batch.epoch == bad_epoch:
                        loss = loss * float("nan")
                        logs["ce"] = float("nan")
                    return loss, logs
                return loss_fn
            return factory

        parser = T.add_common_args(argparse.ArgumentParser())
        args = lambda *extra: parser.parse_args([str(a) for a in [*TINY, "--epochs", 2, "--out-dir", tmp_path / "nan", *extra]])  # noqa: E731
        with pytest.raises(UserError, match=r"epoch 2, batch 1: the CE loss is nan"):
            T.train(args(), T.Method(make_loss=make_loss(bad_epoch=1)))
        kept = torch.load(tmp_path / "nan" / "model.pt", weights_only=True)
        assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
        lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(s)["epoch"] for s in lines] == [1]
        model, _ = T.train(args("--resume"), T.Method(make_loss=make_loss(bad_epoch=None)))
        assert torch.load(tmp_path / "nan" / "model.pt", weights_only=True)["epoch"] == 2
        # attack.py refuses a checkpoint with non-finite weights.
        kept["model"][next(iter(kept["model"]))].fill_(float("nan"))
        torch.save(kept, tmp_path / "nan.pt")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "nan.pt"], "not finite")

    @pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
    def test_an_interrupted_run_says_what_is_saved_and_resumes(self, tmp_path, signal_name):
        # Far more epochs than can pass before the signal, so the run cannot end first: the resume below asks
        # for two more than the interrupted run kept (no lr drops, so the schedule allows it).
        args = [*TINY, "--train-samples", "256", "--epochs", "100000", "--lr-drops=", "--out-dir", tmp_path / "r"]
        # SIGINT as at a terminal: a shell that starts the tests in the background (`pytest ... &`) hands its
        # children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen([sys.executable, "train_baseline.py", *map(str, args)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not (tmp_path / "r" / "model.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        try:
            proc.send_signal(getattr(signal, signal_name))
            out, err = proc.communicate(timeout=120)
        finally:  # a run that ignored the signal would otherwise go on training
            proc.kill()
        assert proc.returncode == 130, err
        (line,) = err.strip().splitlines()
        assert line.startswith("interrupted: ") and "holds epoch" in line and line.endswith("--resume")
        command = line.split("continue with: ")[1].split()
        assert command[:2] == ["python", "train_baseline.py"]
        kept = int(line.split("holds epoch ")[1].split()[0].strip(",;:"))
        assert kept == torch.load(tmp_path / "r" / "model.pt", weights_only=True)["epoch"] >= 1
        assert command[command.index("--epochs") + 1] == "100000"
        command[command.index("--epochs") + 1] = str(kept + 2)
        run(*command[1:])
        rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == list(range(1, kept + 3))

    def test_a_failed_start_leaves_no_folder_and_the_last_line_says_what_next(self, tmp_path):
        assert_cli_error(T.main, ["--dataset", "cifar10", "--data-dir", tmp_path / "none", "--no-download", "--out-dir",
                                  tmp_path / "r"], "not found")
        assert not (tmp_path / "r").exists()
        proc = run("train_pag.py", *TINY, "--epochs", "1", "--lr-drops=", "--out-dir", tmp_path / "p")
        first, last = proc.stdout.splitlines()[0], proc.stdout.strip().splitlines()[-1]
        assert "PAG source cm lambda 0.25" in first and "x C = 2.5" in first
        assert last.startswith("done: ") and f"python attack.py --checkpoint={tmp_path / 'p' / 'model.pt'}" in last
        # No schedule depends on the epochs (no lr drops): a finished run continues for longer.
        run("train_pag.py", *TINY, "--epochs", "2", "--lr-drops=", "--out-dir", tmp_path / "p", "--resume")
        assert len((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()) == 2
        proc = run("train_pag.py", *TINY, "--epochs", "3", "--out-dir", tmp_path / "p", "--resume", check=False)
        assert_one_line_error(proc, "--lr-drops")  # the schedule changed: refused
        run("toy_data.py", "--out", tmp_path / "toy" / "t.png")
        assert (tmp_path / "toy" / "t.png").stat().st_size > 1000

    def test_bf16_is_refused_on_a_gpu_without_bf16_arithmetic(self, tmp_path, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        assert_cli_error(T.main, [*TINY, "--device", "cuda", "--amp", "bf16", "--out-dir", tmp_path / "r"],
                         "--amp bf16", "V100", "7.0", "--amp fp32")
        assert not (tmp_path / "r").exists()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        ranks.check_amp("bf16", torch.device("cuda"))  # an A100 passes
        ranks.check_amp("bf16", torch.device("cpu"))  # the CPU emulates it (slowly), as tests do

    def test_trades_with_beta_zero_is_clean_cross_entropy(self):
        torch.manual_seed(0)
        model = build_model("cnn", 10, 3, 16).train()
        x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
        logits = model(x)
        loss, _ = adversarial_loss(model, x, y, logits, adv_args(adv="trades", trades_beta=0.0), (0.0, 1.0), None)
        assert torch.allclose(loss, F.cross_entropy(logits, y))
        loss6, _ = adversarial_loss(model, x, y, logits, adv_args(adv="trades", trades_beta=6.0), (0.0, 1.0), None)
        assert loss6 > loss  # the KL term is positive once the attack moved the prediction

    @pytest.mark.parametrize("mode,norm", [("pgd", "linf"), ("pgd", "l2"), ("trades", "linf")])
    def test_training_attack_stays_in_its_ball_and_leaves_the_model_in_train_mode(self, monkeypatch, mode, norm):
        seen = []
        real_pgd = PGD.pgd

        def spy(model, x, y, eps, **kw):
            assert not model.training  # crafted in eval mode
            x_adv = real_pgd(model, x, y, eps, **kw)
            seen.append((x, x_adv, eps))
            return x_adv
        monkeypatch.setattr(T, "pgd", spy)
        torch.manual_seed(0)
        model = build_model("cnn", 10, 3, 16).train()
        x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
        loss, adv_logits = T.adversarial_loss(model, x, y, model(x), adv_args(adv=mode, adv_norm=norm),
                                                           (0.0, 1.0), None)
        (x0, x_adv, eps), = seen
        dist = (x_adv - x0).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x0).flatten(1).norm(dim=1)
        assert (dist <= eps + 1e-6).all() and (dist > 0).any() and x_adv.min() >= 0 and x_adv.max() <= 1
        assert model.training and loss.requires_grad and adv_logits.shape == (8, 10)

    @pytest.mark.parametrize("script,extra", [("train_baseline.py", ["--adv", "pgd"]),
                                              ("train_baseline.py", ["--adv", "trades", "--adv-norm", "l2"]),
                                              ("train_pag.py", ["--adv", "pgd", "--source", "cm", "--targets-per-image", "3"])])
    def test_adversarial_training_cli_one_epoch(self, tmp_path, script, extra):
        run(script, *TINY, "--epochs", "1", "--adv-steps", "2", *extra, "--out-dir", tmp_path / "r")
        line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
        assert 0 <= line["adv_train_acc"] <= 1 and 0 <= line["test_pgd_l2_0.5_acc"] <= line["test_acc"]
        assert ("pag" in line) == (script == "train_pag.py")

    def test_torchrun_two_processes_step_equals_one_process_over_the_same_global_batch(self, tmp_path):
        # One SGD step on 16 images: 2 processes x batch 8 vs 1 process x batch 16. No augmentation and
        # k = C = 10 targets make the batch loss independent of sampling order; cnn has no batch-norm.
        # NN targets are looked up by dataset index, so this also checks per-sample indexing under sharding.
        # Targets go 4 per pass: DDP synchronises gradients once, with the last pass (the others under no_sync).
        common = ["--dataset", "synthetic", "--arch", "cnn", "--image-size", "16", "--train-samples", "16",
                  "--eval-samples", "16", "--eval-steps", "1", "--epochs", "1", "--no-augment", "--source", "nn",
                  "--cache-dir", tmp_path / "cache",
                  "--targets-per-image", "10", "--pag-chunk", "4", "--lr", "0.5", "--log-every", "1"]
        run("train_pag.py", *common, "--batch-size", "16", "--out-dir", tmp_path / "one")
        proc = torchrun("train_pag.py", *common, "--batch-size", "8", "--out-dir", tmp_path / "two")
        assert "x 2 processes (global batch 16)" in proc.stdout
        one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
        two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
        torch.manual_seed(3407)
        init = build_model("cnn", 10, 3, 16).state_dict()
        moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
        diff = max((one["model"][k] - two["model"][k]).abs().max().item() for k in init)
        assert moved > 1e-3 and diff < 1e-6 * max(1.0, moved) * 10
        lines = [json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("one", "two")]
        assert lines[0]["loss"] == pytest.approx(lines[1]["loss"], rel=1e-5)  # epoch means reduced over ranks
        assert len(two["sample_generators"]) == 2

    def test_torchrun_resume_and_refusals(self, tmp_path):
        args = [*TINY, "--epochs", "2", "--source", "cm", "--targets-per-image", "3"]
        torchrun("train_pag.py", *args, "--out-dir", tmp_path / "full")
        cut = torchrun("train_pag.py", *args, "--out-dir", tmp_path / "cut", "--stop-after-epoch", "1").stdout
        # What it says continues it is torchrun with its process count: pasted as printed, it resumes.
        said = cut.split("continue with: ")[1].splitlines()[0]
        assert said == shlex.join(["torchrun", "--nproc_per_node", "2", "train_pag.py", *map(str, args), "--out-dir",
                                   str(tmp_path / "cut"), "--stop-after-epoch", "1", "--resume"])
        torchrun(*shlex.split(said)[3:])
        full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
        cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(full[k], cut[k]) for k in full)
        assert_one_line_error(run("train_pag.py", *args, "--out-dir", tmp_path / "cut", "--epochs", "2", "--resume",
                                  check=False), "2 process(es)")

    @pytest.mark.parametrize("script,extra", [("train_baseline.py", ["--adv", "trades"]),
                                              ("train_pag.py", ["--adv", "pgd", "--source", "cm", "--targets-per-image", "2"])])
    def test_torchrun_with_two_forwards_per_step(self, tmp_path, script, extra):
        # TRADES and PAG + PGD-AT forward the clean and the adversarial batch through DDP before one backward.
        torchrun(script, *TINY, "--epochs", "1", "--adv-steps", "2", *extra, "--out-dir", tmp_path / "r")
        line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
        assert line["epoch"] == 1 and 0 <= line["adv_train_acc"] <= 1

    @pytest.mark.parametrize("flag,values", [("--lr", ["0.01", "0.1"]), ("--epochs", ["1", "3"]), ("--out-dir", ["a", "b"])])
    def test_every_rank_refuses_settings_that_differ_between_ranks(self, tmp_path, flag, values):
        args = [*TINY, "--device", "cpu", "--epochs", "1", "--out-dir", tmp_path / "run"]
        per_rank = [[*args, flag, v if flag != "--out-dir" else tmp_path / v] for v in values]
        for code, err in launch_ranks(tmp_path, per_rank):
            lines = err.strip().splitlines()
            assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], err
        assert not any(p.name.endswith(".pt") for p in tmp_path.rglob("*"))  # nothing trained


# ============================================================================= TestAttack
class TestAttack:
    """Evaluation: PGD, AutoAttack, exact 2-D distance, alignment, results that belong to one model, pictures."""

    @pytest.mark.parametrize("norm", ["l2", "linf"])
    def test_pgd_stays_in_ball_and_box_and_eps_zero_is_clean(self, tiny_model, norm):
        model, x, y = tiny_model
        clean = (PGD.predict(model, x) == y).float().mean().item()
        assert clean > 0.9
        for eps in (0.0, 0.3, 2.0):
            adv = PGD.pgd(model, x, y, eps, norm, steps=5, generator=torch.Generator().manual_seed(0))
            PGD.check_perturbation(adv, x, eps, norm, (0.0, 1.0), "test")
            assert adv.min() >= 0 and adv.max() <= 1
        assert PGD.robust_accuracy(model, x, y, 0.0, norm, (0.0, 1.0), steps=5) == clean
        robust = PGD.robust_accuracy(model, x, y, 0.05, norm, (0.0, 1.0), steps=5)
        assert robust <= clean

    def test_pgd_breaks_a_vanilla_model_at_large_eps(self, tiny_model):
        model, x, y = tiny_model
        assert PGD.robust_accuracy(model, x, y, 8.0, "l2", (0.0, 1.0), steps=20, loss="margin") == 0.0
        assert PGD.robust_accuracy(model, x, y, 0.5, "linf", (0.0, 1.0), steps=20, loss="margin") == 0.0
        # This model is saturated (softmax == 1 in float32): CE's gradient is rounding noise and
        # CE-PGD under-reports, which is why attack.py evaluates with the margin loss by default.
        assert PGD.robust_accuracy(model, x, y, 8.0, "l2", (0.0, 1.0), steps=20, loss="ce") > 0.1
        # Targeted toward a fixed class succeeds on most points.
        adv = PGD.pgd(model, x, torch.full_like(y, 3), 8.0, "l2", steps=30, targeted=True)
        assert (PGD.predict(model, adv) == 3).float().mean() > 0.9

    def test_check_perturbation_refuses_out_of_ball_and_out_of_box(self):
        x = torch.full((2, 1, 4, 4), 0.5)
        with pytest.raises(RuntimeError):
            PGD.check_perturbation(x + 0.2, x, 0.1, "linf", (0, 1), "t")
        with pytest.raises(RuntimeError):
            PGD.check_perturbation(x + 0.2, x, 0.5, "l2", (0, 1), "t")  # L2 norm 0.8
        with pytest.raises(RuntimeError):
            PGD.check_perturbation(x + 0.6, x, 1.0, "linf", (0, 1), "t")  # 1.1 > box
        PGD.check_perturbation(x + 0.1, x, 0.1, "linf", (0, 1), "t")

    def test_autoattack_runs_end_to_end_reduced(self, tiny_model):
        model, x, y = tiny_model
        clean = (PGD.predict(model, x[:32]) == y[:32]).float().mean().item()
        acc = attack.autoattack_mask(model, x[:32], y[:32], 0.5, "l2", (0.0, 1.0), version="apgd", n_iter=5, batch_size=32).float().mean().item()
        assert 0.0 <= acc <= clean
        acc0 = attack.autoattack_mask(model, x[:32], y[:32], 1e-6, "linf", (0.0, 1.0), version="apgd", n_iter=3).float().mean().item()
        assert acc0 == pytest.approx(clean)

    def test_alignment_is_one_for_the_models_own_gradients(self, tiny_model):
        # A fresh model: the trained tiny one is so confident that p_y == 1 even in float64,
        # which makes its true-class gradients exactly 0 (cosine 0).
        torch.manual_seed(0)
        model, x = build_model("cnn", 10, 3, 16).double().eval(), tiny_model[1].double()
        own = lambda xb, t, idx=None: input_gradients(model, xb, t, create_graph=False)[0]  # noqa: E731
        assert attack.alignment(model, x[:16], own, 10) == pytest.approx(1.0, abs=1e-5)
        neg = lambda xb, t, idx=None: -own(xb, t)  # noqa: E731
        assert attack.alignment(model, x[:16], neg, 10, targets_per_image=3) == pytest.approx(-1.0, abs=1e-5)

    @pytest.mark.smoke
    def test_boundary_distance_2d_matches_the_analytic_distance_to_a_line(self):
        # logits [0, w.x + b]: class 1 where w.x + b > 0; the boundary is a line at |w.x + b| / |w|.
        w, b = torch.tensor([3.0, -4.0]), 2.0
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(torch.stack([torch.zeros(2), w]))
            model.bias.copy_(torch.tensor([0.0, b]))
        x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) * 5
        y = (x @ w + b > 0).long()
        truth = (x @ w + b).abs() / w.norm()
        y[:5] = 1 - y[:5]  # misclassified points are at distance 0
        truth[:5] = 0
        dist = attack.boundary_distance_2d(model, x, y, max_radius=20.0, directions=720)
        far = truth > 20
        assert torch.isinf(dist[far]).all()
        assert torch.allclose(dist[~far], truth[~far], atol=0.02)  # radial step + angular grid
        assert (dist[~far] >= truth[~far] - 1e-4).all()  # never closer than the true boundary

    def test_robustness_numbers_are_never_silently_wrong(self, tmp_path, tiny_run):
        ckpt = tiny_run / "model.pt"
        # Radii and steps that overflow float32 are refused where they are parsed.
        for flags in (["--eps-l2", "1e300"], ["--step-size", "1e308"], ["--eps-linf", "1e308"], ["--vis-eps", "1e40"]):
            assert_cli_error(attack.main, ["--checkpoint", ckpt, "--out", tmp_path / "a.json", *flags], flags[0], "float32")
        # An attack that produced non-finite points is never counted.
        x = torch.rand(4, 3, 8, 8)
        with pytest.raises(UserError, match="non-finite"):
            PGD.check_perturbation(x + float("nan"), x, 1.0, "l2", (0.0, 1.0), "pgd-l2")
        # Robust accuracy never rises with eps, for PGD and for AutoAttack (nested radii within a call).
        res = attack.main(["--checkpoint", str(ckpt), "--attacks", "clean", "pgd-l2", "aa-linf", "--eps-l2", "2", "0.1", "0.5",
                           "--eps-linf", "0.01", "0.2", "--aa-version", "apgd", "--steps", "3", "--eval-samples", "24",
                           "--out", str(tmp_path / "n.json")])
        for key in ("pgd_l2", "aa_linf"):
            accs = [res[key][e]["acc"] for e in sorted(res[key], key=float)]
            assert accs == sorted(accs, reverse=True) and res[key][min(res[key], key=float)]["acc"] <= res["clean"]["acc"]
        # Weights that are not float32 (float64 beyond float32's range, complex) or not finite are refused.
        good = torch.load(ckpt, weights_only=True)
        name = next(k for k, v in good["model"].items() if v.is_floating_point())
        for bad, fragment in [(good["model"][name].double().fill_(1e300), "float64"), (good["model"][name].to(torch.complex64), "complex"),
                              (good["model"][name].clone().fill_(float("nan")), "not finite")]:
            torch.save({**good, "model": {**good["model"], name: bad}}, tmp_path / "bad.pt")
            assert_cli_error(attack.main, ["--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "b.json"], fragment)
        assert not (tmp_path / "b.json").exists()

    def test_a_checkpoint_refuses_data_with_other_classes(self, tmp_path):
        root = make_folder(tmp_path / "f", ["cat", "dog"])
        flags = ["--dataset", "folder", "--data-dir", root, "--batch-size", "2", "--eval-steps", "1", "--epochs", "2"]
        T.main(list(map(str, [*flags, "--stop-after-epoch", "1", "--out-dir", tmp_path / "r"])))
        assert torch.load(tmp_path / "r" / "model.pt", weights_only=True)["classes"] == ["cat", "dog"]
        make_folder(root, ["bird"])  # a class folder added since (it sorts first: every label would shift)
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "r", "--attacks", "clean"], "2 classes", "bird")
        assert_cli_error(T.main, [*flags, "--out-dir", tmp_path / "r", "--resume"], "2 classes")

    def test_a_checkpoint_refuses_a_folder_whose_files_or_labels_changed(self, tmp_path, capsys):
        """A copy of the folder with two classes swapped has the same class names and shapes: only the content tells.
        --resume and attack.py refuse it; the same content at another path is the same data."""
        root = class_coloured_folder(tmp_path / "f", ("cat", "dog", "owl"), 4, step=60)
        flags = ["--dataset", "folder", "--data-dir", root, "--batch-size", "2", "--eval-steps", "1", "--epochs", "2",
                 "--arch", "cnn", "--train-samples", "8", "--eval-samples", "6"]
        T.main(list(map(str, [*flags, "--stop-after-epoch", "1", "--out-dir", tmp_path / "r"])))
        first = capsys.readouterr().out.splitlines()[0]
        assert "8 train images (per class 3 cat, 3 dog, 2 owl)" in first and "6 test images (2 per class)" in first
        attack.main(list(map(str, ["--checkpoint", tmp_path / "r", "--attacks", "clean", "--eval-samples", "6"])))
        assert "6 test images of folder (2 per class)" in capsys.readouterr().out
        shutil.copytree(root, tmp_path / "copy")  # the same files elsewhere: accepted
        attack.main(list(map(str, ["--checkpoint", tmp_path / "r", "--attacks", "clean", "--data-dir", tmp_path / "copy"])))
        for split in ("train", "test"):  # swap cat and dog in the copy
            os.rename(tmp_path / "copy" / split / "cat", tmp_path / "copy" / split / "tmp")
            os.rename(tmp_path / "copy" / split / "dog", tmp_path / "copy" / split / "cat")
            os.rename(tmp_path / "copy" / split / "tmp", tmp_path / "copy" / split / "dog")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "r", "--attacks", "clean", "--data-dir", tmp_path / "copy"],
                         "other train data", "changed since", str(tmp_path / "copy" / "train"))  # the folder read now
        moved = [*flags[:3], tmp_path / "copy", *flags[4:]]
        assert_cli_error(T.main, [*moved, "--out-dir", tmp_path / "r", "--resume"], "other train data", "changed since")
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "test" / "owl" / "0.png")  # one test image edited
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "r", "--attacks", "clean"], "other test data")
        assert torch.load(tmp_path / "r" / "model.pt", weights_only=True)["epoch"] == 1  # nothing was trained on
        # A checkpoint made before subsets were fair samples (format 4, no content hashes): --train-samples would now
        # select other images, so it is not resumed.
        ckpt = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
        ckpt["format"] = 4
        del ckpt["data_sha256"], ckpt["input_files_sha256"]
        torch.save(ckpt, tmp_path / "r" / "model.pt")
        assert_cli_error(T.main, [*flags, "--out-dir", tmp_path / "r", "--resume"], "fair samples", "new run")

    def test_attack_results_merge_across_calls_and_concurrent_processes(self, tmp_path, tiny_run):
        run_dir = copy_run(tiny_run, tmp_path / "r")
        base = ["--checkpoint", str(run_dir), "--eval-samples", "16", "--steps", "2"]  # a run folder is a checkpoint
        attack.main([*base, "--attacks", "clean", "pgd-l2", "--eps-l2", "0.5", "1"])
        first = json.loads((run_dir / "attack.json").read_text())
        attack.main([*base, "--attacks", "visualize", "--vis-images", "1", "--vis-steps", "1"])
        merged = json.loads((run_dir / "attack.json").read_text())
        assert merged["pgd_l2"] == first["pgd_l2"] and merged["visualize"]["path"].endswith("targeted_attacks.png")
        assert os.path.exists(run_dir / "targeted_attacks.png") and not os.path.exists(run_dir / "pag_grid.png")
        attack.main([*base, "--attacks", "pgd-l2", "--eps-l2", "0.5", "--steps", "3"])  # same attack and radius: replaced
        again = json.loads((run_dir / "attack.json").read_text())
        assert again["pgd_l2"]["0.5"]["steps"] == 3 and again["pgd_l2"]["1"] == first["pgd_l2"]["1"]
        assert {"made", "eval_samples", "steps", "loss", "seed"} <= set(again["pgd_l2"]["0.5"])
        # Two processes at once on one checkpoint: both results stay.
        procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "attack.py"), *base, "--attacks", *which],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for which in (["pgd-linf"], ["align"])]
        assert all(p.wait(timeout=300) == 0 for p in procs)
        final = json.loads((run_dir / "attack.json").read_text())
        assert "pgd_linf" in final and "nn test" in final["align"] and final["pgd_l2"] == again["pgd_l2"]
        assert "visualize" in final
        other = other_model(tiny_run, tmp_path / "other")
        assert_cli_error(attack.main, ["--checkpoint", other, "--out", run_dir / "attack.json", "--attacks", "clean"],
                         "results of another model")
        (tmp_path / "text.pt").write_text("not a checkpoint at all")
        code, err = run_main(attack.main, ["--checkpoint", tmp_path / "text.pt"])
        assert code == 1 and err.strip().endswith(")") and len(err.strip().splitlines()) == 1

    def test_a_result_belongs_to_one_model(self, tmp_path, tiny_run):
        """attack.json names its model by content: any path to it is the same model, another model's results
        never merge in, and a file that does not match the schema is refused before any attack, untouched."""
        a, b = copy_run(tiny_run, tmp_path / "A" / "runs" / "x"), other_model(tiny_run, tmp_path / "B" / "runs" / "x")
        base = ["--attacks", "clean", "--eval-samples", "16"]
        attack.main(["--checkpoint", str(a / "model.pt"), *base])
        res = json.loads((a / "attack.json").read_text())
        assert res["checkpoint_sha256"] == files.file_sha256(a / "model.pt") and res["epoch"] == 1
        # From another folder, a relative path to the same file: the same model, merged.
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "attack.py"), "--checkpoint", "runs/x/model.pt", "--out",
                               str(a / "attack.json"), "--attacks", "pgd-l2", "--steps", "1", "--eval-samples", "16"],
                              cwd=tmp_path / "A", capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert {"clean", "pgd_l2"} <= set(json.loads((a / "attack.json").read_text()))
        # Model B, by the same relative path from its own folder, into A's file: refused, A's file untouched.
        before = (a / "attack.json").read_bytes()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "attack.py"), "--checkpoint", "runs/x/model.pt", "--out",
                               str(a / "attack.json"), *base], cwd=tmp_path / "B", capture_output=True, text=True)
        assert_one_line_error(proc, "another model")
        assert (a / "attack.json").read_bytes() == before
        # New weights under the same path (the run trained further, or replaced) are another model too.
        shutil.copy(b / "model.pt", a / "model.pt")
        assert_cli_error(attack.main, ["--checkpoint", a, *base], "trained further")
        # An older attack.json without the content hash: its model cannot be told, so nothing merges into it (its
        # epoch was once rewritten to the new model's).
        older = {k: v for k, v in json.loads(before).items() if k != "checkpoint_sha256"}
        (b / "attack.json").write_text(json.dumps({**older, "checkpoint": str(b / "model.pt")}))
        kept = (b / "attack.json").read_bytes()
        assert_cli_error(attack.main, ["--checkpoint", b, *base], "without its content hash")
        assert (b / "attack.json").read_bytes() == kept
        # Files that do not match the schema: refused in one line, before any attack, left as they were.
        good = json.loads(before)
        for broken, fragment in [({**good, "pgd_l2": [0.5]}, "pgd_l2"), ({**good, "checkpoint": 3}, "checkpoint"),
                                 ({**good, "clean": {"acc": 1.5, "eval_samples": 16}}, "acc"),
                                 ({**good, "aa_l2": {"0.5": {"acc": 0.9, "eval_samples": 16}}, "clean": {"acc": 0.2, "eval_samples": 16}},
                                  "above the clean"), ({**good, "extra": 1}, "extra"),
                                 ({**good, "pgd_l2": {"nan": {"acc": 0.1, "eval_samples": 16}}}, "'nan'"),
                                 ({**good, "epoch": True}, "epoch"), ({**good, "clean": {**good["clean"], "foo": 1}}, "foo"),
                                 ({**good, "exact_l2_distance": {"distances": ["a"]}}, "distances"),
                                 ({**good, "checkpoint_sha256": "z" * 64}, "checkpoint_sha256")]:
            (b / "attack.json").write_text(json.dumps(broken))
            assert_cli_error(attack.main, ["--checkpoint", b, *base], "attack.json", fragment)
            assert json.loads((b / "attack.json").read_text()) == broken
        (b / "attack.json").write_text(json.dumps(good).replace('"acc": ' + json.dumps(good["clean"]["acc"]), '"acc": NaN'))
        text = (b / "attack.json").read_text()
        assert_cli_error(attack.main, ["--checkpoint", b, *base], "NaN")
        assert (b / "attack.json").read_text() == text
        (b / "attack.json").write_text("[" * 100000 + "]" * 100000)
        assert_cli_error(attack.main, ["--checkpoint", b, *base], "nested too deeply")
        # A kept entry that contradicts this call's clean accuracy (a hand-edited file): refused, the file as it was.
        edited = {k: v for k, v in json.loads(before).items() if k != "clean"}
        edited["pgd_l2"] = {"0.5": {**edited["pgd_l2"]["0.5"], "acc": 1.0}}
        (b / "attack.json").write_text(json.dumps({**edited, "checkpoint_sha256": files.file_sha256(b / "model.pt")}))
        text = (b / "attack.json").read_text()
        assert_cli_error(attack.main, ["--checkpoint", b, *base], "above the clean accuracy", "left as it was")
        assert (b / "attack.json").read_text() == text
        # A killed merge's temporary is removed by the next call; a live writer's is not touched.
        (b / "attack.json").unlink()
        (b / f"attack.json.tmp{dead_pid()}").write_text("{half")
        (b / f"attack.json.tmp{os.getpid()}x").write_text("not ours")
        (b / "attack.json.tmp99999999999999999999").write_text("no process has this pid")
        (b / f"attack.json.tmp{dead_pid()}").mkdir()  # a folder: never removed
        attack.main(["--checkpoint", str(b), *base])
        assert sorted(os.listdir(b)) == sorted(["attack.json", "metrics.jsonl", "model.pt", f"attack.json.tmp{os.getpid()}x",
                                                "attack.json.tmp99999999999999999999", *[p for p in os.listdir(b) if p.startswith(
                                                    "attack.json.tmp") and (b / p).is_dir()]])

    def test_visualize_draws_a_second_model_beside_the_first(self, tmp_path, tiny_run, capsys):
        a, b = copy_run(tiny_run, tmp_path / "pag run"), other_model(tiny_run, tmp_path / "vanilla")
        attack.main(["--checkpoint", str(a), "--attacks", "visualize", "--vis-images", "2", "--vis-steps", "3",
                     "--vis-compare", str(b)])
        out = capsys.readouterr().out
        assert "measure" not in out and f"beside {b}" in out  # no empty table
        assert out.strip().splitlines()[-1] == f"wrote {a / 'attack.json'} (its visualize entry now names {a / 'targeted_attacks.png'})"
        entry = json.loads((a / "attack.json").read_text())["visualize"]
        assert entry["compared_with"] == str(b) and os.path.getsize(a / "targeted_attacks.png") > 5000
        # The marks: a targeted attack counts as reached when the model then predicts the target class.
        model, _ = C.load_checkpoint(str(a))
        x = D.to_float(D.get_data("synthetic", image_size=16, test_samples=2).test_x)
        adv, hit = attack.targeted_grid(model, x, 10, 5.0, 3, (0.0, 1.0))
        assert adv.shape == (2, 10, 3, 16, 16)
        assert torch.equal(hit, PGD.predict(model, adv.flatten(0, 1)).view(2, 10) == torch.arange(10))
        assert_cli_error(attack.main, ["--checkpoint", a, "--attacks", "clean", "--vis-compare", b], "--vis-compare")
        # A second model that cannot be drawn is refused before any attack runs: nothing is written.
        (a / "attack.json").unlink()
        for bad in (tmp_path / "missing.pt", tiny_run.parent / "nope"):
            assert_cli_error(attack.main, ["--checkpoint", a, "--attacks", "pgd-l2", "visualize", "--vis-compare", bad], "does not exist")
        assert not (a / "attack.json").exists()

    def test_the_hash_attack_json_records_is_of_the_bytes_the_model_was_loaded_from(self, tmp_path, tiny_run, monkeypatch):
        """The file replaced between the load and the hash (a rename, a run saving an epoch): the results and the
        sha256 are still one model's, the one that was loaded."""
        a, b = copy_run(tiny_run, tmp_path / "a"), other_model(tiny_run, tmp_path / "b")
        shutil.copy(a / "model.pt", tmp_path / "a.pt")
        real = attack.load_checkpoint

        def swap_then_load(path, device="cpu", loaded=None):
            shutil.copy(b / "model.pt", a / "model.pt")  # replaced on disk right after it was read
            return real(path, device, loaded=loaded)
        monkeypatch.setattr(attack, "load_checkpoint", swap_then_load)
        attack.main(["--checkpoint", str(a), "--attacks", "clean", "--eval-samples", "48"])
        res = json.loads((a / "attack.json").read_text())
        assert res["checkpoint_sha256"] == files.file_sha256(tmp_path / "a.pt") != files.file_sha256(a / "model.pt")
        model = real(str(tmp_path / "a.pt"))[0]
        x = D.get_data("synthetic", image_size=16, test_samples=48)
        assert res["clean"]["acc"] == (PGD.predict(model, D.to_float(x.test_x)) == x.test_y).float().mean().item()

    def test_visualize_tells_two_models_in_folders_of_one_name_apart(self, tmp_path, tiny_run, monkeypatch):
        """a/run beside b/run: each row is labelled and says what its own model predicts (models were once keyed
        by folder name, so both rows showed one model's predictions)."""
        a, b = copy_run(tiny_run, tmp_path / "a" / "run"), other_model(tiny_run, tmp_path / "b" / "run")
        ckpt = torch.load(b / "model.pt", weights_only=True)
        ckpt["model"]["head.3.bias"][7] += 100.0  # b says class 7 for every image, unlike a
        torch.save(ckpt, b / "model.pt")
        assert attack.run_label(str(a), str(b)) == "a/run" and attack.run_label(str(b / "model.pt"), str(a)) == "b/run"
        assert attack.run_label(str(a)) == "run"
        figures = []
        monkeypatch.setattr(files, "save_figure", lambda fig, path, **kw: figures.append(fig))
        attack.main(["--checkpoint", str(a), "--attacks", "visualize", "--vis-images", "4", "--vis-steps", "1",
                     "--vis-compare", str(b)])
        x = D.to_float(D.get_data("synthetic", image_size=16, test_samples=48).test_x)[:4]
        said = {}
        names = D.CLASS_NAMES.get("synthetic") or [f"class {k}" for k in range(10)]
        for ax in figures[0].axes[::11]:  # the first column: one row per image and model
            label, title = ax.get_ylabel(), ax.get_title()
            said.setdefault(label, []).append(title.split(" says ")[1])
        for label, folder in (("a/run", a), ("b/run", b)):
            preds = PGD.predict(C.load_checkpoint(str(folder))[0], x)
            assert said[label] == [names[int(p)] for p in preds], label
        assert said["a/run"] != said["b/run"]


# ============================================================================= TestSBG
class TestSBG:
    """Score-based ground truth: the field against a Gaussian posterior, the denoiser, its exported fields."""

    @pytest.mark.smoke
    def test_sbg_field_equals_the_analytic_gradient_of_log_posterior_for_gaussian_classes(self):
        torch.manual_seed(0)
        c, d, sigma, abar = 3, 5, 0.7, 0.6
        mu = torch.randn(c, d, dtype=torch.float64)

        def log_lik(x_t):  # log N(x_t; sqrt(abar) mu_c, v I) per class, up to a shared constant
            v = abar * sigma ** 2 + 1 - abar
            return -((x_t[:, None] - abar ** 0.5 * mu) ** 2).sum(-1) / (2 * v)

        def oracle(x_t, timestep, cls):  # exact eps prediction = -sqrt(1 - abar) * score
            x_t = x_t.detach().requires_grad_(True)
            ll = log_lik(x_t)
            logp = torch.where(cls[:, None] == c, torch.logsumexp(ll, 1, keepdim=True), ll.gather(1, cls.clamp(max=c - 1)[:, None]))
            (score,) = torch.autograd.grad(logp.sum(), x_t)
            return -(1 - abar) ** 0.5 * score

        x = torch.randn(4, d, dtype=torch.float64)
        noise = torch.randn(4, d, dtype=torch.float64)
        targets = torch.tensor([[0, 1, 2]] * 4)
        ours = sbg.sbg_field(oracle, x, targets, abar, noise, c, 300)
        x_t = (abar ** 0.5 * x + (1 - abar) ** 0.5 * noise).requires_grad_(True)
        for j in range(3):  # independent: autograd of log p(t | x_t) = log N_t - logsumexp_c log N_c
            log_post = log_lik(x_t)[:, j] - torch.logsumexp(log_lik(x_t), 1)
            (expected,) = torch.autograd.grad(log_post.sum(), x_t)
            assert torch.allclose(ours[:, j], expected, atol=1e-10)

    @pytest.mark.smoke
    def test_resume_refuses_sbg_fields_exported_again_under_the_same_path(self, tmp_path):
        """The fields a run trains on are recorded by content: a file exported again under the same path (another
        denoiser, another draw of noise) is not what the run started with, and --resume says so in one line."""
        data = D.get_data("synthetic", train_samples=96, image_size=16)
        fields = class_mean_fields(data)
        path = save_sbg_fields(tmp_path / "f.pt", fields, data)
        flags = [*TINY, "--source", "sbg", "--sbg-file", path, "--epochs", "2", "--targets-per-image", "2",
                 "--out-dir", tmp_path / "r"]
        train_pag.main(list(map(str, [*flags, "--stop-after-epoch", "1"])))
        ckpt = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
        assert ckpt["input_files_sha256"] == {"sbg_file": files.file_sha256(path)}
        save_sbg_fields(tmp_path / "f.pt", class_mean_fields(data, seed=1), data)  # exported again: another draw
        assert_cli_error(train_pag.main, [*flags, "--resume"], "--sbg-file", "contents changed")
        assert torch.load(tmp_path / "r" / "model.pt", weights_only=True)["epoch"] == 1
        shutil.copy(tmp_path / "f.pt", tmp_path / "g.pt")
        save_sbg_fields(tmp_path / "f.pt", fields, data)  # the first fields again: the same content, resumed
        assert files.file_sha256(path) == ckpt["input_files_sha256"]["sbg_file"] != files.file_sha256(tmp_path / "g.pt")
        shutil.move(path, tmp_path / "moved.pt")  # and from another path: a file compared by content may move
        moved = [str(tmp_path / "moved.pt") if a == path else a for a in map(str, flags)]
        train_pag.main([*moved, "--resume"])
        assert torch.load(tmp_path / "r" / "model.pt", weights_only=True)["epoch"] == 2

    def test_smoke_sbg_train_and_export(self, tmp_path):
        data_args = ["--dataset", "synthetic", "--image-size", "8", "--train-samples", "16"]
        run("sbg.py", "train", *data_args, "--epochs", "1", "--width", "8", "--out-dir", tmp_path)
        run("sbg.py", "export", *data_args, "--checkpoint", tmp_path / "denoiser.pt", "--noise-draws", "1", "--out", tmp_path / "f.pt")
        assert torch.load(tmp_path / "f.pt", weights_only=True)["fields"].shape == (16, 10, 3, 8, 8)

    def test_sbg_train_export_and_train_pag_with_the_file(self, tmp_path):
        data_args = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "32"]
        run("sbg.py", "train", *data_args, "--epochs", "1", "--width", "16", "--batch-size", "16", "--out-dir", tmp_path / "dn")
        run("sbg.py", "export", *data_args, "--checkpoint", tmp_path / "dn" / "denoiser.pt", "--noise-draws", "2",
            "--batch-size", "8", "--out", tmp_path / "f.pt")
        obj = torch.load(tmp_path / "f.pt", weights_only=True)
        assert obj["fields"].shape == (32, 10, 3, 16, 16) and obj["fields"].dtype == torch.float16
        other = ["--dataset", "synthetic", "--image-size", "8", "--train-samples", "32"]  # not the denoiser's images
        for cmd in (["export", "--out", tmp_path / "g.pt"], ["sweep", "--sweep-timesteps", "100", "--sweep-images", "4"]):
            assert_one_line_error(run("sbg.py", cmd[0], *other, "--checkpoint", tmp_path / "dn" / "denoiser.pt", *cmd[1:],
                                      check=False), "denoiser was trained on synthetic (3, 16, 16)", "not synthetic (3, 8, 8)", "--dataset")
        assert not (tmp_path / "g.pt").exists()
        assert torch.isfinite(obj["fields"].float()).all() and obj["fields"].float().abs().sum() > 0
        run("train_pag.py", *TINY[:6], "--train-samples", "32", "--eval-samples", "16", "--batch-size", "16", "--eval-steps", "1",
            "--epochs", "1", "--sbg-file", tmp_path / "f.pt", "--targets-per-image", "2", "--out-dir", tmp_path / "p")
        ckpt = torch.load(tmp_path / "p" / "model.pt", weights_only=True)
        assert ckpt["args"]["source"] == "sbg"
        proc = run("train_pag.py", *TINY, "--epochs", "1", "--sbg-file", tmp_path / "f.pt", "--out-dir", tmp_path / "q", check=False)
        assert_one_line_error(proc, "exported for 32 synthetic train images", "these 96")  # TINY uses 96 images: refused
        assert_one_line_error(run("attack.py", "--checkpoint", tmp_path / "p" / "model.pt", "--attacks", "align",
                                  "--align-source", "sbg", "--sbg-file", tmp_path / "f.pt", "--n-samples", "8", check=False),
                              "exported for 32 synthetic train images", "test images")  # training fields: not held out
        # Held out: fields exported for the first test images, by the same denoiser, and aligned on those images.
        run("sbg.py", "export", *data_args, "--checkpoint", tmp_path / "dn" / "denoiser.pt", "--noise-draws", "2",
            "--split", "test", "--eval-samples", "12", "--out", tmp_path / "ft.pt")
        test_fields = torch.load(tmp_path / "ft.pt", weights_only=True)
        test_y = D.get_data("synthetic", test_samples=12, image_size=16).test_y
        assert test_fields["split"] == "test" and test_fields["fields"].shape == (12, 10, 3, 16, 16)
        assert torch.equal(test_fields["labels"], test_y)
        proc = run("attack.py", "--checkpoint", tmp_path / "p" / "model.pt", "--attacks", "align", "--align-source", "sbg",
                   "--sbg-file", tmp_path / "ft.pt", "--n-samples", "8", "--out", tmp_path / "t.json")
        model = C.load_checkpoint(str(tmp_path / "p" / "model.pt"))[0]
        x8 = D.to_float(D.get_data("synthetic", test_samples=8, image_size=16).test_x)
        fields8 = test_fields["fields"][:8].float()
        expected = attack.alignment(model, x8, lambda xb, t, idx: fields8[idx[:, None], t], 10, indices=torch.arange(8))
        assert json.loads((tmp_path / "t.json").read_text())["align"]["sbg test"]["cos"] == pytest.approx(expected, abs=1e-6)
        assert_one_line_error(run("attack.py", "--checkpoint", tmp_path / "p" / "model.pt", "--attacks", "align",
                                  "--align-source", "sbg", "--sbg-file", tmp_path / "ft.pt", "--n-samples", "20", check=False),
                              "12 synthetic test images")  # fields for 12 test images, 20 asked for
        assert_one_line_error(run("train_pag.py", *TINY[:6], "--train-samples", "32", "--batch-size", "16", "--epochs", "1",
                                  "--sbg-file", tmp_path / "ft.pt", "--out-dir", tmp_path / "w", check=False), "test images")
        assert_one_line_error(run("attack.py", "--checkpoint", tmp_path / "p" / "model.pt", "--attacks", "exact-l2",
                                  "--n-samples", "8", check=False), "needs 2-D inputs")
        proc = run("attack.py", "--checkpoint", tmp_path / "p" / "model.pt", "--attacks", "align", "--align-source", "sbg",
                   "--sbg-file", tmp_path / "f.pt", "--align-split", "train", "--n-samples", "8", "--out", tmp_path / "a.json")
        assert -1 <= json.loads((tmp_path / "a.json").read_text())["align"]["sbg train"]["cos"] <= 1

    def test_sbg_train_under_torchrun_and_resume(self, tmp_path):
        common = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "32", "--width", "16", "--batch-size", "8"]
        torchrun("sbg.py", "train", *common, "--epochs", "2", "--out-dir", tmp_path / "full")
        torchrun("sbg.py", "train", *common, "--epochs", "1", "--out-dir", tmp_path / "cut")
        torchrun("sbg.py", "train", *common, "--epochs", "2", "--out-dir", tmp_path / "cut", "--resume")
        full = torch.load(tmp_path / "full" / "denoiser.pt", weights_only=True)
        cut = torch.load(tmp_path / "cut" / "denoiser.pt", weights_only=True)
        assert full["epoch"] == cut["epoch"] == 2 and len(full["sample_generators"]) == 2
        assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])

    def test_sbg_reads_the_official_release_format_and_refuses_other_images(self, tmp_path):
        d = D.get_data("synthetic", train_samples=12, image_size=8)
        fields = torch.randn(12, 10, 3, 8, 8)
        official = torch.cat([(D.to_float(d.train_x) * 2 - 1)[:, None], fields], dim=1)  # (N, 1+C, 3, H, W)
        torch.save((official, d.train_y), tmp_path / "official.pt")
        gt = S.make_source("sbg", d, sbg_file=str(tmp_path / "official.pt"))
        idx, t = torch.tensor([3, 7]), torch.tensor([[1, 4], [9, 0]])
        assert torch.equal(gt(None, t, idx), fields[idx[:, None], t])
        torch.save(official, tmp_path / "bare.pt")  # a bare tensor works too
        assert torch.equal(S.make_source("sbg", d, sbg_file=str(tmp_path / "bare.pt"))(None, t, idx), fields[idx[:, None], t])
        torch.save((official[torch.randperm(12)], d.train_y), tmp_path / "shuffled.pt")
        with pytest.raises(UserError, match="not this run's"):
            S.make_source("sbg", d, sbg_file=str(tmp_path / "shuffled.pt"))
        with pytest.raises(UserError, match="shape"):
            S.make_source("sbg", D.get_data("synthetic", train_samples=10, image_size=8), sbg_file=str(tmp_path / "official.pt"))

    def test_sbg_export_replaces_only_an_earlier_export(self, tmp_path, tiny_run):
        data = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "16"]
        sbg.main(["train", *data, "--epochs", "1", "--width", "8", "--out-dir", str(tmp_path / "dn")])
        export = ["export", *data, "--checkpoint", str(tmp_path / "dn" / "denoiser.pt"), "--noise-draws", "1"]
        run_dir = copy_run(tiny_run, tmp_path / "r")
        for victim in (run_dir / "model.pt", run_dir / "metrics.jsonl"):  # a classifier, a text file
            before = victim.read_bytes()
            assert_cli_error(sbg.main, [*export, "--out", victim], "not a fields file")
            assert victim.read_bytes() == before
        sbg.main([*export, "--out", str(tmp_path / "f.pt")])
        made = torch.load(tmp_path / "f.pt", weights_only=True)
        assert made["denoiser_sha256"] == files.file_sha256(tmp_path / "dn" / "denoiser.pt") and made["classes"] is None
        assert_cli_error(sbg.main, ["sweep", *data, "--checkpoint", tmp_path / "dn" / "denoiser.pt", "--png", run_dir / "model.pt"],
                         "suffix")
        sbg.main([*export, "--out", str(tmp_path / "f.pt"), "--seed", "1"])  # an earlier export: replaced
        assert torch.load(tmp_path / "f.pt", weights_only=True)["seed"] == 1

    @pytest.mark.parametrize("change,fragment", [
        (lambda f: f[:, [1, 0, *range(2, 10)]], r"another order.*slot 0 fits class 1.*slot 1 fits class 0"),  # swapped
        (lambda f: f.roll(1, dims=1), "another order"),
        (lambda f: f.index_fill(1, torch.tensor([3]), 0), r"200 of 2000 fields are zero or nearly \(class 3: 200 \(all\)"),
        (lambda f: torch.cat([f[:5].index_fill(1, torch.tensor([7]), 0), f[5:]]),
         r"5 of 2000 fields are zero or nearly \(class 7: 5 of 200"),
        (torch.zeros_like, "2000 of 2000 fields are zero"),
        (lambda f: {"fields": f * 1e-30}, "2000 of 2000 fields are zero or nearly"),  # below the cosine's eps (float32)
        (lambda f: {"classes": 3}, "'classes'"),
        (lambda f: {"fields": f.half().to_sparse()}, "sparse")],
        ids=["two classes swapped", "classes rolled", "one class zero", "five fields zero", "all zero", "below eps",
             "classes not names", "sparse"])
    def test_sbg_fields_that_are_zero_or_in_another_class_order_are_refused(self, tmp_path, change, fragment):
        data = D.get_data("synthetic", train_samples=200, image_size=8)
        fields = class_mean_fields(data)
        assert S.load_sbg_file(save_sbg_fields(tmp_path / "f.pt", fields, data), data).shape == fields.shape  # accepted
        changed = change(fields)
        extra = changed if isinstance(changed, dict) else {"fields": changed.half()}
        with pytest.raises(UserError, match=fragment):
            S.load_sbg_file(save_sbg_fields(tmp_path / "f.pt", fields, data, **extra), data)

    def test_sbg_fields_without_class_structure_pass_and_scripts_refuse_another_order(self, tmp_path):
        data = D.get_data("synthetic", train_samples=200, image_size=8)
        fields = class_mean_fields(data)
        # Noise (no class structure) cannot be checked for its order: accepted, as weak real fields are.
        noise = torch.randn(fields.shape, generator=torch.Generator().manual_seed(1))
        assert S.load_sbg_file(save_sbg_fields(tmp_path / "f.pt", noise, data), data) is not None
        # Through the scripts: train_pag.py and attack.py's align say it in one line.
        save_sbg_fields(tmp_path / "f.pt", fields[:, [1, 0, *range(2, 10)]], data)
        assert_cli_error(train_pag.main, ["--dataset", "synthetic", "--image-size", "8", "--train-samples", "200", "--source",
                                          "sbg", "--sbg-file", tmp_path / "f.pt", "--out-dir", tmp_path / "r"], "another order")
        # An export names its classes: another order than the data's is refused exactly.
        fm = D.Data("fashion-mnist", data.train_x[:, :1], data.train_y, data.test_x[:, :1], data.test_y, 10, D.CLASS_NAMES["fashion-mnist"])
        torch.save({"kind": "sbg-fields", "fields": fields[:, :, :1].half(), "dataset": "fashion-mnist", "n": 200, "split": "train",
                    "labels": data.train_y, "classes": list(reversed(D.CLASS_NAMES["fashion-mnist"])), "train_samples": 200,
                    "val_samples": None}, tmp_path / "g.pt")
        with pytest.raises(UserError, match="in this order"):
            S.load_sbg_file(str(tmp_path / "g.pt"), fm)


# ============================================================================= TestToy
class TestToy:
    """The paper's 2-D toy: the draw, its ground truth, float64 training, the toy bench."""

    @pytest.mark.smoke
    def test_smoke_toy_data_and_toy_bench(self, tmp_path):
        run("toy_data.py", "--out", tmp_path / "toy_data.png")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "toy.py"), "--out-dir", str(tmp_path / "b"),
                               "--epochs", "1", "--seed", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
        assert set(metrics) == {"vanilla", "pag", "attack"} and (tmp_path / "toy_data.png").stat().st_size > 1000

    def test_toy_bench_replaces_only_its_own_files_and_says_how_to_continue(self, tmp_path, monkeypatch):
        """The toy clears its model folders before training (attack.json would merge): only folders it made (its
        marker). A user's model.pt there is refused in one line before anything is cleared or trained. An
        interrupt says to run the toy again (it has no --resume), not the scripts' own "continue with"."""
        toy = load_bench("toy")
        user = tmp_path / "d" / "pag"
        user.mkdir(parents=True)
        (user / "model.pt").write_bytes(b"a user's model")
        (tmp_path / "d" / "vanilla").mkdir()
        (tmp_path / "d" / "vanilla" / "attack.json").write_text("{}")
        assert_cli_error(toy.main, ["--out-dir", tmp_path / "d", "--epochs", "1"], "vanilla holds attack.json", "did not make")
        (tmp_path / "d" / "vanilla" / "attack.json").unlink()
        assert_cli_error(toy.main, ["--out-dir", tmp_path / "d", "--epochs", "1"], "pag holds model.pt", "did not make")
        (tmp_path / "d" / "vanilla" / "attack.json").write_text("{}")
        assert (user / "model.pt").read_bytes() == b"a user's model" and (tmp_path / "d" / "vanilla" / "attack.json").exists()
        assert not (tmp_path / "d" / "vanilla" / toy.MARKER).exists()
        mine = tmp_path / "e" / "vanilla"  # the toy's own folder: cleared under its lock, then refilled
        mine.mkdir(parents=True)
        (mine / toy.MARKER).write_text("")
        (mine / "attack.json").write_text("{}")
        toy.clear_model_folder(str(mine))
        assert not (mine / "attack.json").exists() and (mine / toy.MARKER).exists()
        with files.RunLock(str(mine)):  # a run training there: never cleared
            (mine / "model.pt").write_bytes(b"training")
            assert_cli_error(lambda argv: toy.clear_model_folder(str(mine)), [], "in use")
        assert (mine / "model.pt").read_bytes() == b"training"

        def interrupted(argv):
            raise files.Interrupted("x.pt holds epoch 3 of 100; continue with: python bench/toy.py --seed 5 --resume")
        monkeypatch.setattr(T, "main", interrupted)
        monkeypatch.setattr(sys, "argv", ["bench/toy.py", "--seed", "5"])
        with pytest.raises(files.Interrupted) as e:
            toy.run_script("train_baseline.py", str(tmp_path / "f" / "run.log"), "--dataset", "toy")
        assert "--resume" not in str(e.value) and "run python bench/toy.py --seed 5 again" in str(e.value)

    def test_toy_data_follows_the_spec(self):
        train_x, train_y, test_x, test_y = D.make_toy(seed=0)
        assert train_x.shape == (6000, 2) and test_x.shape == (600, 2)
        assert (train_y.bincount() == 3000).all() and (test_y.bincount() == 300).all()
        assert torch.equal(train_x[:, 1], 2 * train_x[:, 0]) and torch.equal(test_x[:, 1], 2 * test_x[:, 0])
        for label, centres in enumerate(D.TOY_CENTRES):
            x1 = train_x[train_y == label, 0]
            for m, c in enumerate(centres):  # 1,000 points per mode, N(c, 1)
                mode = x1[m * 1000: (m + 1) * 1000]
                assert abs(mode.mean().item() - c) < 0.15 and 0.9 < mode.std().item() < 1.1
        assert torch.equal(D.make_toy(seed=0)[0], train_x) and not torch.equal(D.make_toy(seed=1)[0], train_x)

    def test_toy_ground_truth_on_a_hand_made_case(self):
        train_x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, 10.0], [-3.0, -6.0]])
        train_y = torch.tensor([0, 0, 1, 1])
        targets = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
        g = toy_data.toy_gt_grad(train_x, targets, train_x, train_y, exclude_self=True)
        expected_nn = torch.tensor([[1, 3], [0, 2], [1, 3], [0, 2]])  # never the point itself
        assert torch.equal(g, train_x[expected_nn] - train_x[:, None])

    def test_toy_data_seed_reaches_training_and_the_attack(self, tmp_path):
        assert torch.equal(D.get_data("toy").train_x, D.make_toy(0, dtype=torch.float64)[0])
        assert torch.equal(D.get_data("toy", data_seed=3).test_x, D.make_toy(3, dtype=torch.float64)[2])
        assert torch.equal(D.make_toy(3)[2], D.make_toy(3, dtype=torch.float64)[2].float())  # one draw, two precisions
        run("train_baseline.py", "--dataset", "toy", "--seed", 1, "--data-seed", 3, "--epochs", 1, "--out-dir", tmp_path)
        run("attack.py", "--checkpoint", tmp_path / "model.pt", "--attacks", "exact-l2", "--eps-l2", 2)
        model, ckpt = attack.load_checkpoint(str(tmp_path / "model.pt"))
        assert ckpt["args"]["data_seed"] == 3
        reported = torch.tensor([float("inf") if d is None else d for d in
                                 json.loads((tmp_path / "attack.json").read_text())["exact_l2_distance"]["distances"]])
        assert reported.isfinite().sum() > 50  # enough points near a boundary to tell the draws apart
        with torch.no_grad():  # the attack measured the points of draw 3, not those of the default draw
            for seed, same in ((3, True), (0, False)):
                _, _, test_x, test_y = D.make_toy(seed, dtype=torch.float64)
                expected = attack.boundary_distance_2d(model, test_x, test_y, 2.0)
                assert torch.allclose(reported, expected, atol=1e-4, rtol=0) == same  # attack.json rounds to 4 places

    def test_standardized_toy_keeps_raw_radii(self, tmp_path):
        T.main(["--dataset", "toy", "--epochs", "1", "--standardize", "--out-dir", str(tmp_path / "s")])
        model, ckpt = C.load_checkpoint(str(tmp_path / "s"))
        data = D.get_data("toy")
        assert torch.allclose(model[0].mean, data.train_x.mean(0)) and torch.allclose(model[0].std, data.train_x.std(0))
        z = (data.test_x - data.train_x.mean(0)) / data.train_x.std(0)
        with torch.no_grad():  # the model takes raw points: its first layer standardises them
            assert torch.allclose(model(data.test_x), model[1:](z))
        assert_cli_error(T.main, [*TINY, "--standardize", "--out-dir", tmp_path / "img"], "--standardize is for the toy")

    def test_the_toy_trains_as_its_rerun_did_in_float64_and_the_same_with_any_thread_count(self, tmp_path):
        """lambda * C = 10 and the last partial batch kept (47 Adam steps an epoch), float64 weights, and the same
        weights, bit for bit, with 1 and 2 threads (OMP_NUM_THREADS)."""
        weights = []
        for threads in ("1", "2"):
            out = tmp_path / f"t{threads}"
            proc = subprocess.run([sys.executable, "train_pag.py", "--dataset", "toy", "--epochs", "2", "--seed", "2",
                                   "--data-seed", "2", "--out-dir", str(out), "--cache-dir", str(tmp_path / "c")], cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            first = next(line for line in proc.stdout.splitlines() if line.startswith("pag_nn"))
            assert "PAG source nn lambda 5 (x C = 10)" in first and "float64 on 1 thread" in first
            ckpt = torch.load(out / "model.pt", weights_only=True)
            assert {s["step"].item() for s in ckpt["optimizer"]["state"].values()} == {2 * 47}  # 6,000 / 128: 47 batches
            assert all(v.dtype == torch.float64 for v in ckpt["model"].values())
            weights.append(ckpt["model"])
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        # The attack reads it back in float64 too; image datasets keep dropping their last partial batch.
        run("attack.py", "--checkpoint", tmp_path / "t1", "--attacks", "exact-l2", "--eps-l2", "15", "--eval-samples", "60")
        assert D.DATASETS["cifar10"]["drop_last"] and D.DATASETS["cifar10"]["dtype"] == "float32"

    def test_toy_nudge_moves_one_initial_weight_by_one_unit_in_the_last_place(self):
        toy = load_bench("toy")
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            plain = T.build_model("mlp", 2, 2, None).double()
            with toy.nudged_first_weight(dtype):
                torch.manual_seed(0)
                nudged = T.build_model("mlp", 2, 2, None)
            a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (plain, nudged))
            assert b.dtype == torch.float64 and (a != b).sum() == 1
            expected = torch.nextafter(a[:1].to(dtype), torch.tensor([math.inf], dtype=dtype)).double()
            assert torch.equal(b[:1], expected) and b[0] > a[0]
        assert T.build_model.__module__ == "models"  # the real builder is back

    def test_toy_bench_runs_through_the_scripts(self, toy_bench_two_seeds):
        tmp_path = toy_bench_two_seeds / "seed3"  # one seed's folder: what a one-seed call writes
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert set(m) == {"vanilla", "pag", "attack"} and set(m["pag"]) == {"clean_acc", "robust_acc"}  # the issue's shape
        exact = json.loads((tmp_path / "exact.json").read_text())["exact_robust_acc"]
        for name in ("vanilla", "pag"):
            for accs in ([m[name]["robust_acc"][e] for e in EPS_TOY], [exact[name][e] for e in EPS_TOY]):
                assert all(0 <= a <= m[name]["clean_acc"] <= 1 for a in accs)
                assert accs == sorted(accs, reverse=True)  # nested balls: never more robust at a larger radius
        boundaries = json.loads((tmp_path / "exact.json").read_text())["boundaries"]
        for name in ("vanilla", "pag"):
            modes = boundaries[name]["modes"]
            assert sorted(m["x1"] for m in modes) == [-50, -30, -10, 10, 30, 50]
            for e in EPS_TOY:  # per-mode distances and attack.py's exact-l2 agree: all robust iff every mode is far
                assert (exact[name][e] == 1.0) == all(m["min_dist"] is None or m["min_dist"] > float(e) for m in modes)
            dist = json.loads((tmp_path / name / "attack.json").read_text())["exact_l2_distance"]["distances"]
            assert len(dist) == 600
            for e in EPS_TOY:  # the accuracies are the fraction of points farther than eps
                far = sum(d is None or d > float(e) for d in dist) / 600
                assert abs(exact[name][e] - far) < 1e-6
        assert os.path.getsize(tmp_path / "toy.png") > 1000

    def test_toy_bench_summarises_several_seeds(self, toy_bench_two_seeds, tmp_path):
        summary = json.loads((toy_bench_two_seeds / "seeds.json").read_text())
        assert summary["seeds"] == [3, 1]
        for name in ("vanilla", "pag"):
            per_seed = [json.loads((toy_bench_two_seeds / f"seed{s}" / "exact.json").read_text()) for s in (3, 1)]
            assert [p["config"]["data_seed"] for p in per_seed] == [3, 1]
            for e in EPS_TOY:
                values = [p["exact_robust_acc"][name][e] for p in per_seed]
                st = summary[name]["exact_robust_acc"][e]
                assert st["per_seed"] == values and st["min"] == min(values) and st["max"] == max(values)
                assert st["median"] == pytest.approx(sum(values) / 2)  # two seeds: the median is their mean
            clean = [json.loads((toy_bench_two_seeds / f"seed{s}" / "metrics.json").read_text())[name]["clean_acc"] for s in (3, 1)]
            assert summary[name]["clean_acc"]["per_seed"] == clean
        dup = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "toy.py"), "--out-dir", str(tmp_path / "dup"),
                              "--seed", "1", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert dup.returncode == 2 and "twice" in dup.stderr and not (tmp_path / "dup").exists()


# ============================================================================= TestFiles
class TestFiles:
    """Every file read or written: no code run, schemas, atomic writes, locks, faults."""

    def test_no_file_the_project_reads_runs_code(self, tmp_path):
        marker = tmp_path / "code-ran"
        evil = {"model": CodeInPickle(marker), "kind": "classifier", "format": C.CHECKPOINT_FORMAT, "args": {}}
        torch.save(evil, tmp_path / "evil.pt")
        # the checkpoint attack.py reads, model.pt under --resume, a denoiser (export and train --resume), fields
        (tmp_path / "run").mkdir()
        torch.save(evil, tmp_path / "run" / "model.pt")
        (tmp_path / "sbg").mkdir()
        torch.save({**evil, "kind": "sbg-denoiser"}, tmp_path / "sbg" / "denoiser.pt")
        sbg_data = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "32"]
        assert_one_line_error(run("attack.py", "--checkpoint", tmp_path / "evil.pt", check=False), "not a readable")
        assert not marker.exists()  # a real process first; the others in this process, where code would run too
        cases = [(T.main, [*TINY, "--out-dir", tmp_path / "run", "--resume"]),
                 (sbg.main, ["export", *sbg_data, "--checkpoint", tmp_path / "sbg" / "denoiser.pt", "--out", tmp_path / "f.pt"]),
                 (sbg.main, ["train", *sbg_data, "--out-dir", tmp_path / "sbg", "--resume"]),
                 (train_pag.main, [*TINY, "--sbg-file", tmp_path / "evil.pt", "--out-dir", tmp_path / "p"])]
        for main, argv in cases:
            assert_cli_error(main, argv, "not a readable")
            assert not marker.exists(), argv
        # the nearest-neighbour cache: made by a first run, then replaced
        train_pag.main(list(map(str, [*TINY, "--epochs", "1", "--source", "nn", "--cache-dir", tmp_path / "cache",
                                      "--out-dir", tmp_path / "n1"])))
        (cache,) = (tmp_path / "cache").iterdir()
        torch.save(CodeInPickle(marker), cache)
        assert_cli_error(train_pag.main, [*TINY, "--epochs", "1", "--source", "nn", "--cache-dir", tmp_path / "cache",
                                          "--out-dir", tmp_path / "n2"], "not a readable nearest-neighbour cache")
        assert not marker.exists()
        torch.save(torch.zeros(3, dtype=torch.long), cache)  # loads, but is no table for these images
        assert_cli_error(train_pag.main, [*TINY, "--epochs", "1", "--source", "nn", "--cache-dir", tmp_path / "cache",
                                          "--out-dir", tmp_path / "n3"], "not a valid nearest-neighbour table", "delete it")

    def test_unreadable_files_and_datasets_are_refused_in_one_line(self, tmp_path):
        T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "r"])))
        good = (tmp_path / "r" / "model.pt").read_bytes()
        for content, fragment in [(good[: len(good) // 2], "not a readable"), (b"", "not a readable")]:
            (tmp_path / "r" / "model.pt").write_bytes(content)
            assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "r", "--resume"], fragment)
        (tmp_path / "r" / "model.pt").write_bytes(good)
        (tmp_path / "r" / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.3}\n{"epoch": 2, "lo')
        assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "r", "--resume"], "metrics.jsonl line 2")
        (tmp_path / "d.pt").write_bytes(good[:100])
        assert_cli_error(sbg.main, ["export", "--dataset", "synthetic", "--checkpoint", tmp_path / "d.pt", "--out", tmp_path / "f.pt"],
                         "not a readable")

        def folder(name, classes, bad=None):
            for split in ("train", "test"):
                for c, n in classes.items():
                    os.makedirs(tmp_path / name / split / c, exist_ok=True)
                    for i in range(n):
                        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / name / split / c / f"{i}.png")
            if bad:
                (tmp_path / name / "train" / bad).write_bytes(b"not a png")
            return ["--dataset", "folder", "--data-dir", tmp_path / name, "--out-dir", tmp_path / f"out-{name}"]
        assert_cli_error(T.main, folder("one", {"cat": 3}), "at least 2")
        assert_cli_error(T.main, folder("empty", {"cat": 3, "dog": 0}), "dog")
        assert_cli_error(T.main, folder("bad", {"cat": 3, "dog": 3}, bad="dog/broken.png"), "broken.png")

    def test_every_broken_checkpoint_is_refused_by_training_and_attack(self, tmp_path, tiny_run):
        ckpt = torch.load(tiny_run / "model.pt", weights_only=True)
        name = next(iter(ckpt["model"]))
        broken = {"no pag_source": ({k: v for k, v in ckpt.items() if k != "pag_source"}, "'pag_source'"),
                  "no input_shape": ({k: v for k, v in ckpt.items() if k != "input_shape"}, "'input_shape'"),
                  "negative epoch": ({**ckpt, "epoch": -1}, "'epoch'"),
                  "epoch beyond the run": ({**ckpt, "epoch": 5}, "epoch 5"),
                  "bad args": ({**ckpt, "args": {**ckpt["args"], "train_samples": "all"}}, "'train_samples'"),
                  "wrong shape": ({**ckpt, "model": {**ckpt["model"], name: torch.zeros(3)}}, name),
                  "missing weight": ({**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != name}}, "missing 1"),
                  "extra weight": ({**ckpt, "model": {**ckpt["model"], "extra.weight": torch.zeros(1)}}, "unexpected 1"),
                  "no optimizer (resume)": ({k: v for k, v in ckpt.items() if k != "optimizer"}, "'optimizer'")}
        for case, (obj, fragment) in broken.items():
            run_dir = tmp_path / case.replace(" ", "_").replace("(", "").replace(")", "")
            run_dir.mkdir()
            torch.save(obj, run_dir / "model.pt")
            assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", run_dir, "--resume"], fragment)
            if "resume" not in case:
                assert_cli_error(attack.main, ["--checkpoint", run_dir / "model.pt", "--out", run_dir / "a.json"], fragment)

    def test_metrics_lines_are_checked_on_resume(self, tmp_path, tiny_run):
        """metrics.jsonl: a NaN (which would fail a whole epoch later), a FIFO (which would hang)."""
        run_dir = copy_run(tiny_run, tmp_path / "m")
        (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "loss": NaN}\n')
        assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", run_dir, "--resume"], "line 1", "finite")
        os.remove(run_dir / "metrics.jsonl")
        os.mkfifo(run_dir / "metrics.jsonl")
        assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", run_dir, "--resume"], "not a regular file")

    def test_sbg_field_files_ours_and_the_official_layout_are_checked(self, tmp_path):
        data = D.get_data("synthetic", train_samples=12, image_size=8)
        ours = {"kind": "sbg-fields", "fields": torch.zeros(12, 10, 3, 8, 8, dtype=torch.float16), "dataset": "synthetic",
                "n": 12, "split": "train", "labels": data.train_y, "val_samples": None}
        for obj, fragment in [({k: v for k, v in ours.items() if k != "dataset"}, "'dataset'"),
                              ({**ours, "fields": ours["fields"].fill_(float("nan"))}, "not finite"),
                              ((torch.zeros(12, 11, 3, 8, 8),), "official tensor"),
                              ((torch.zeros(12, 11, 3, 8, 8, dtype=torch.complex64), data.train_y), "official tensor")]:
            torch.save(obj, tmp_path / "f.pt")
            with pytest.raises(UserError, match=fragment):
                S.load_sbg_file(str(tmp_path / "f.pt"), data)

    def test_a_nearest_neighbour_cache_is_checked_before_use(self, tmp_path):
        """Sparse, or every image its own neighbour, or not the nearest ones: refused, naming the file."""
        d = D.get_data("synthetic", train_samples=40, image_size=8)
        table = S.nearest_of_class(d.train_x, d.train_x, d.train_y, 10, query_idx=torch.arange(40))
        S.cached_nearest(d, str(tmp_path / "c"))
        (path,) = (tmp_path / "c").iterdir()
        self_table = table.clone()
        self_table[torch.arange(40), d.train_y] = torch.arange(40)
        shuffled = table.clone()
        for t in range(10):  # another member of the right class: not the nearest
            members = (d.train_y == t).nonzero().flatten()
            shuffled[:, t] = members[(members.view(-1, 1) == table[:, t]).float().argmax(0).add(1) % len(members)]
        for bad in (table.to_sparse(), self_table, shuffled):
            torch.save(bad, path)
            with pytest.raises(UserError, match="not a valid nearest-neighbour table"):
                S.cached_nearest(d, str(tmp_path / "c"))

    def test_idx_files_are_checked(self, tmp_path):
        """Truncated, a label file shorter than the images, a label out of range: one line each."""
        root = tmp_path / "fm" / "FashionMNIST" / "raw"
        root.mkdir(parents=True)

        def idx(path, array, cut=0):
            raw = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
            (root / path).write_bytes(raw[: len(raw) - cut])
        images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20, dtype=np.uint8) % 10
        for cut_images, labels_now, fragment in [(5, labels, "header says"), (0, labels[:15], "one label per"),
                                                 (0, np.where(labels == 3, 200, labels).astype(np.uint8), "label is 200")]:
            for prefix in ("train", "t10k"):
                idx(f"{prefix}-images-idx3-ubyte", images, cut_images)
                idx(f"{prefix}-labels-idx1-ubyte", labels_now)
            with pytest.raises(UserError, match=fragment):
                D.get_data("fashion-mnist", str(tmp_path / "fm"))

    def test_a_denoiser_whose_weights_are_not_finite_exports_nothing(self, tmp_path):
        sbg_data = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "16"]
        sbg.main(["train", *sbg_data, "--epochs", "1", "--width", "8", "--out-dir", str(tmp_path / "dn")])
        dn = torch.load(tmp_path / "dn" / "denoiser.pt", weights_only=True)
        key = next(k for k, v in dn["model"].items() if v.is_floating_point())
        torch.save({**dn, "model": {**dn["model"], key: dn["model"][key].fill_(float("nan"))}}, tmp_path / "dn" / "nan.pt")
        assert_cli_error(sbg.main, ["export", *sbg_data, "--checkpoint", tmp_path / "dn" / "nan.pt", "--out", tmp_path / "x.pt"],
                         "not finite")
        assert not (tmp_path / "x.pt").exists()

    def test_failed_writes_leave_nothing_behind_and_say_so(self, tmp_path, monkeypatch):
        # A full disk: torch.save fails midway (torch reports it as a RuntimeError).
        def full_disk(obj, f):
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(UserError, match="could not write .*model.pt: the disk is full or a file-size limit"):
            files.atomic_write(str(tmp_path / "model.pt"), {"w": torch.zeros(1)})
        assert os.listdir(tmp_path) == []
        monkeypatch.undo()
        # An output or cache folder that cannot be made (a file is in the way): one line, before any work.
        (tmp_path / "file").write_text("x")
        assert_cli_error(T.main, [*TINY, "--out-dir", tmp_path / "file" / "run"], "file")
        assert_cli_error(train_pag.main, [*TINY, "--source", "nn", "--cache-dir", tmp_path / "file" / "c",
                                          "--out-dir", tmp_path / "r"], "could not write")
        # No network: the download says so in one line.

        def offline(*a, **k):
            raise urllib.error.URLError("Temporary failure in name resolution")
        monkeypatch.setattr(urllib.request, "urlopen", offline)
        with pytest.raises(UserError, match="could not download"):
            D.load_torchvision("cifar10", str(tmp_path / "nodata"), download=True)
        assert not (tmp_path / "nodata").exists()

    def test_no_result_or_user_file_is_lost(self, tmp_path, tiny_run):
        run_dir = copy_run(tiny_run, tmp_path / "r")
        before = (run_dir / "model.pt").read_bytes()
        assert_cli_error(attack.main, ["--checkpoint", run_dir / "model.pt", "--out", run_dir / "model.pt"], "also an input")
        assert_cli_error(attack.main, ["--checkpoint", run_dir, "--attacks", "visualize", "--vis-out", run_dir / "model.pt"],
                         "also an input")
        assert (run_dir / "model.pt").read_bytes() == before
        # A bad figure path or an unwritable results file is found before any attack runs.
        (tmp_path / "file").write_text("in the way")
        for flags, fragment in [(["--attacks", "visualize", "--vis-out", tmp_path / "grid.txt"], "suffix"),
                                (["--out", tmp_path / "file" / "a.json"], "could not write"),
                                (["--attacks", "visualize", "--vis-out", tmp_path / "file" / "g.png"], "could not write")]:
            assert_cli_error(attack.main, ["--checkpoint", run_dir, *flags], fragment)
        assert not (run_dir / "attack.json").exists()
        # The JSON is written before the figure: a figure that fails to save loses no number.
        # sbg.py export never overwrites its own denoiser.
        sbg_data = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "16"]
        sbg.main(["train", *sbg_data, "--epochs", "1", "--width", "8", "--out-dir", str(tmp_path / "dn")])
        den = (tmp_path / "dn" / "denoiser.pt").read_bytes()
        assert_cli_error(sbg.main, ["export", *sbg_data, "--checkpoint", tmp_path / "dn" / "denoiser.pt",
                                    "--out", tmp_path / "dn" / "denoiser.pt"], "also an input")
        assert (tmp_path / "dn" / "denoiser.pt").read_bytes() == den
        # A planted run.lock link: refused, its target untouched.
        target = tmp_path / "precious.txt"
        target.write_text("keep me")
        (tmp_path / "p").mkdir()
        os.symlink(target, tmp_path / "p" / "run.lock")
        assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "p"], "run.lock")
        assert target.read_text() == "keep me"
        # Stale-temporary cleanup removes only the exact temporaries this project makes.
        run_dir2 = copy_run(tiny_run, tmp_path / "t")
        (run_dir2 / "model.pt.tmpl_notes").write_text("a user's notes")
        gone = dead_pid()
        (run_dir2 / f"model.pt.tmp{gone}").write_text("half")
        T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", run_dir2, "--resume"])))
        assert (run_dir2 / "model.pt.tmpl_notes").read_text() == "a user's notes" and not (run_dir2 / f"model.pt.tmp{gone}").exists()

    def test_faults_while_writing_end_in_one_line_and_keep_what_was_there(self, tmp_path, tiny_run, monkeypatch):
        run_dir = copy_run(tiny_run, tmp_path / "r")
        base = ["--checkpoint", str(run_dir), "--attacks", "visualize", "--vis-images", "1", "--vis-steps", "1"]
        attack.main(base)
        figure, results = (run_dir / "targeted_attacks.png").read_bytes(), (run_dir / "attack.json").read_bytes()
        real = matplotlib.figure.Figure.savefig

        def full_disk(self, fname, **kw):  # half a figure, then the disk is full
            real(self, fname, **kw)
            with open(fname, "r+b") as f:
                f.truncate(100)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
        assert_cli_error(attack.main, [*base, "--attacks", "clean", "visualize"], "targeted_attacks.png", "disk is full")
        monkeypatch.undo()
        assert (run_dir / "targeted_attacks.png").read_bytes() == figure  # the previous figure, whole
        after = json.loads((run_dir / "attack.json").read_text())
        assert "clean" in after and after["visualize"] == json.loads(results)["visualize"]  # the number kept; no new pointer
        assert not [p for p in os.listdir(run_dir) if ".tmp" in p]
        # A file-size limit while saving a checkpoint (torch's "unexpected pos"): one line naming the file.
        limited = "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); sys.argv = sys.argv[1:]; " \
                  "runpy.run_path(sys.argv[0], run_name='__main__')"
        proc = subprocess.run([sys.executable, "-c", limited, os.path.join(ROOT, "train_baseline.py"),
                               *map(str, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "big"])],
                              cwd=ROOT, capture_output=True, text=True)
        assert_one_line_error(proc, "model.pt", "disk is full or a file-size limit")
        assert not (tmp_path / "big" / "model.pt").exists()
        proc = subprocess.run([sys.executable, "-c", limited.replace("100000, 100000", "0, 0"), os.path.join(ROOT, "train_baseline.py"),
                               *map(str, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "zero"])], cwd=ROOT, capture_output=True, text=True)
        assert_one_line_error(proc, "run.lock", "disk is full or a file-size limit")
        assert not (tmp_path / "zero").exists()
        # Ctrl-C in the middle of a write: the temporary goes too.
        def interrupted(tmp):
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            files.atomic_write(str(tmp_path / "k.pt"), write=interrupted)
        assert not [p for p in os.listdir(tmp_path) if p.startswith("k.pt")]

    def test_one_run_per_directory_and_stale_temporaries(self, tmp_path):
        out = tmp_path / "r"
        out.mkdir()
        # Another process holds both folders (files.RunLock, as a run does) and stays.
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time, files; locks = [files.RunLock(f) for f in sys.argv[1:]]; "
                                   "print('held', flush=True); time.sleep(60)", str(out), str(tmp_path / "s")],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", out], f"process {holder.pid}")
            assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", out, "--resume"], f"process {holder.pid}")
            proc = run("sbg.py", "train", "--dataset", "synthetic", "--image-size", "16", "--train-samples", "32",
                       "--out-dir", tmp_path / "s", check=False)
            assert_one_line_error(proc, f"process {holder.pid}")
        finally:
            holder.kill()  # SIGKILL: its run.lock files stay behind, naming it
            holder.wait()
        assert (out / "run.lock").read_text() == str(holder.pid)
        # The holder is gone: the lock is taken over; stale temporaries of our files are removed; released at the end.
        (out / f"model.pt.tmp{holder.pid}").write_bytes(b"half a checkpoint")  # its writer is gone
        (out / f"metrics.jsonl.tmp{holder.pid}").write_text("{")
        (out / "notes.txt.tmp1").write_text("not ours")
        T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", out])))
        assert sorted(os.listdir(out)) == ["metrics.jsonl", "model.pt", "notes.txt.tmp1"]

    def test_of_runs_started_together_on_one_folder_exactly_one_runs(self, tmp_path):
        """Six processes take the same (stale) lock at once, three times over: one wins each time."""
        script = ("import os, sys, time, files\n"
                  "folder, me = sys.argv[1], sys.argv[2]\n"
                  "open(os.path.join(folder, 'ready' + me), 'w').close()\n"
                  "while sum(f.startswith('ready') for f in os.listdir(folder)) < 6:\n"
                  "    time.sleep(0.001)\n"
                  "try:\n"
                  "    with files.RunLock(os.path.join(folder, 'run')):\n"
                  "        print('won', flush=True)\n"
                  "        time.sleep(1.0)\n"
                  "except files.UserError as e:\n"
                  "    print(e, flush=True)\n")
        for trial in range(3):
            folder = tmp_path / str(trial)
            (folder / "run").mkdir(parents=True)
            (folder / "run" / "run.lock").write_text("999999999")  # a killed run's
            procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(i)], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True) for i in range(6)]
            outs = [p.communicate(timeout=120)[0] for p in procs]
            assert sorted(o.split(" ")[0] for o in outs).count("won\n") == 1, outs
            assert all(o == "won\n" or "is in use by another run" in o for o in outs), outs  # (its pid, once written)
            assert not (folder / "run" / "run.lock").exists()  # released by the winner

    def test_without_posix_locks_a_run_says_the_folder_is_not_locked(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(files, "fcntl", None)  # as on Windows
        with files.RunLock(str(tmp_path / "r")):
            assert "one run per directory is not enforced" in capsys.readouterr().out
        assert not (tmp_path / "r").exists()  # it made the folder, and nothing was written into it


# ============================================================================= TestCommandLines
class TestCommandLines:
    """Every script's flags: one-line errors, numbers checked where parsed, help, pasted commands, signals."""

    def test_inputs_that_once_gave_tracebacks_give_one_line_errors(self, tmp_path, toy_bench_two_seeds):
        """Each of these once ended in a traceback (or, for the timesteps, trained to the end and then refused its own
        denoiser): now one `error:` line, before any work."""
        data = ["--dataset", "synthetic", "--image-size", "8", "--train-samples", "16", "--out-dir", tmp_path / "dn"]
        assert_cli_error(sbg.main, ["train", *data, "--width", "12"], "--width", "multiple of 8")
        assert_cli_error(sbg.main, ["train", *data, "--timesteps", "200000"], "--timesteps", "100000")
        assert not (tmp_path / "dn").exists()
        for side in (1, 2, 3):
            assert_cli_error(T.main, ["--dataset", "synthetic", "--arch", "cnn", "--image-size", side, "--train-samples", "64",
                                      "--out-dir", tmp_path / "r"], "at least 4 px")
        toy = toy_bench_two_seeds / "seed3" / "vanilla" / "model.pt"
        assert_cli_error(attack.main, ["--checkpoint", toy, "--measures", "exact-l2", "--eps-l2", "1e6", "--out",
                                       tmp_path / "t.json"], "at most 1000")
        fm = load_bench("fashion_mnist")
        cfg = json.loads(json.dumps({**fm.CONFIG, **fm.QUICK}))
        bench = fm.ClaimsBench(cfg, str(tmp_path), str(tmp_path), 1, {"vanilla"})
        for seed in cfg["seeds"]:
            files.write_json({**bench_result("vanilla", 0.8, 0.1, 0.05, n=32, align_nn=None, align_sbg=0.1, val_acc=0.8,
                                             val_pgd_l2_acc=0.1, train_seconds=1.0, seconds=2.0, **{"lambda": None}),
                              "key": f"vanilla_seed{seed}", "seed": seed}, bench.result_path(f"vanilla_seed{seed}"))
        assert_cli_error(lambda argv: bench.assemble(0.0), [], "vanilla_seed0.json", "'align_nn'")

    def test_numbers_that_print_alike_fractions_and_failed_calls_leave_nothing(self, tmp_path, tiny_run):
        """Radii and lambdas are keys as printed ({:g}): two that print alike are refused, not merged into one entry or
        result file. --lr-drops takes fractions as every other number flag does. A failed attack.py leaves no folder."""
        assert_cli_error(attack.main, ["--checkpoint", tiny_run, "--attacks", "pgd-l2", "--eps-l2", "0.5", "0.5000000001",
                                       "--out", tmp_path / "x.json"], "print alike", "0.5")
        fm = load_bench("fashion_mnist")
        assert_cli_error(lambda argv: fm.parse(argv, "d"), ["--lambdas", "0.25", "0.2500000001"], "print alike", "0.25")
        assert fm.parse(["--lambdas", "0.25", "0.26"], "d")[0]["lambdas"] == [0.25, 0.26]
        assert cli.fractions("1/2,3/4") == [0.5, 0.75] == cli.fractions("0.5, 0.75") and cli.fractions("") == []
        for bad in ("1/0,0.5", "1/2/3", "2/2"):
            with pytest.raises(argparse.ArgumentTypeError):
                cli.fractions(bad)
        s = T.resolve_settings(add_common_args(cli.Parser()).parse_args(["--lr-drops", "1/2,3/4"]), blank_images("cifar10"),
                               T.BASELINE)
        assert s.lr_drops == [0.5, 0.75]
        new = tmp_path / "new" / "deeper"
        assert_cli_error(attack.main, ["--checkpoint", tiny_run, "--attacks", "exact-l2", "--out", new / "a.json"], "2-D inputs")
        assert not (tmp_path / "new").exists()  # the folder check_output made for --out is gone again
        attack.main(["--checkpoint", str(tiny_run), "--attacks", "clean", "--eval-samples", "8", "--out", str(new / "a.json")])
        assert (new / "a.json").exists()  # a call that succeeds keeps it

    def test_exact_l2_in_chunks_of_radii_finds_the_same_distances(self):
        """The ray search bounded in memory (radii in chunks, stopping once every ray is past a boundary) finds
        exactly the distances of the search over every radius at once."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)).double()
        x, y = torch.randn(20, 2, dtype=torch.float64) * 5, torch.randint(0, 2, (20,))
        whole = attack.boundary_distance_2d(model, x, y, 30.0, chunk=10 ** 6)
        assert torch.equal(attack.boundary_distance_2d(model, x, y, 30.0, chunk=7), whole)
        assert torch.isfinite(whole).any() and (whole >= 0).all()

    def test_bad_inputs_give_one_line_errors(self, tmp_path):
        # One through a real process (as a user runs it); the rest in this process, through the same run_cli.
        assert_one_line_error(run("train_baseline.py", "--dataset", "imagenet", check=False), "unknown dataset")
        assert_cli_error(T.main, [*TINY, "--arch", "vgg"], "invalid choice: 'vgg'")
        assert_cli_error(train_pag.main, ["--dataset", "cifar10", "--data-dir", tmp_path / "none", "--no-download"],
                         "not found", "--no-download")
        assert_cli_error(train_pag.main, [*TINY, "--source", "sbg"], "--sbg-file")
        T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "r"])))
        assert_cli_error(T.main, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "r"], "--resume")
        assert_cli_error(T.main, [*TINY[:2], "--arch", "resnet18", *TINY[4:], "--epochs", "1", "--out-dir", tmp_path / "r",
                                  "--resume"], "--arch", "cnn", "resnet18")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "missing.pt"], "does not exist")
        (tmp_path / "junk.pt").write_text("neither a checkpoint")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "junk.pt"], "not a readable checkpoint")
        torch.save({"hello": 1}, tmp_path / "dict.pt")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "dict.pt"], "neither a checkpoint")
        ckpt = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
        ckpt["arch"] = "resnet18"  # weights of a cnn labelled as another arch
        torch.save(ckpt, tmp_path / "wrong.pt")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "wrong.pt"], "do not fit")

    def test_numbers_are_validated_where_they_are_parsed(self, tmp_path):
        base = [*TINY, "--out-dir", tmp_path / "r"]
        for flags, fragment in [(["--eval-eps", "-1"], "--eval-eps"), (["--adv-eps", "-1"], "--adv-eps"),
                                (["--eval-eps", "nan"], "finite"), (["--eval-steps", "0"], "--eval-steps"),
                                (["--lr", "-1"], "--lr"), (["--lr-drops", "abc"], "--lr-drops"),
                                (["--lr-drops", "0.5,1.5"], "(0, 1)"), (["--batch-size", "0"], "--batch-size"),
                                (["--epochs", "0"], "--epochs")]:
            assert_cli_error(T.main, [*base, *flags], fragment)
        assert_cli_error(train_pag.main, [*base, "--pag-chunk", "0"], "--pag-chunk")
        assert_cli_error(train_pag.main, [*base, "--pag-coeff", "inf"], "--pag-coeff")
        assert_cli_error(sbg.main, ["train", "--p-uncond", "2"], "--p-uncond")
        assert_cli_error(sbg.main, ["export", "--timestep", "-3"], "--timestep")
        assert_cli_error(T.main, [*TINY, "--train-samples", "1", "--out-dir", tmp_path / "one"], "one full batch")
        assert not (tmp_path / "r").exists()
        T.main(list(map(str, [*TINY, "--epochs", "1", "--out-dir", tmp_path / "m"])))
        ckpt = tmp_path / "m" / "model.pt"
        for flags, fragment in [(["--eps-l2", "-1"], "--eps-l2"), (["--eps-l2", "nan"], "finite"), (["--steps", "0"], "--steps"),
                                (["--batch-size", "0"], "--batch-size"), (["--target", "11"], "0..9"),
                                (["--target", "cat"], "--target"), (["--n-samples", "0"], "--n-samples"),
                                (["--attacks", "align", "--align-targets", "11"], "--align-targets")]:
            assert_cli_error(attack.main, ["--checkpoint", ckpt, "--n-samples", 8, *flags], fragment)
        assert not (tmp_path / "m" / "attack.json").exists()

    def test_options_that_would_fail_deep_inside_are_refused_where_parsed(self, tmp_path, tiny_run):
        out = ["--out-dir", tmp_path / "r"]
        for flags, fragment in [(["--seed", "1e20"], "--seed"), (["--seed", str(2 ** 40)], "2^32"), (["--lr", "1e308"], "--lr"),
                                (["--weight-decay", "1e300"], "--weight-decay"), (["--image-size", "200000"], "1024"),
                                (["--adv-eps", "1e308"], "--adv-eps")]:
            assert_cli_error(T.main, [*TINY, *out, *flags], fragment)
        assert_cli_error(T.main, ["--dataset", "synthetic", "--image-size", "12", "--arch", "vit", *out], "vit", "12 px")
        assert_cli_error(train_pag.main, [*TINY, *out, "--source", "oi", "--train-samples", "5", "--batch-size", "2"],
                         "oi source", "class(es)")
        assert_cli_error(attack.main, ["--checkpoint", tiny_run, "--eps-linf", "1e308"], "--eps-linf")
        assert_cli_error(sbg.main, ["sweep", "--checkpoint", tmp_path / "none.pt", "--sweep-images", "3"], "not exist")
        assert not (tmp_path / "r").exists()

    def test_radii_and_steps_accept_fractions(self, tmp_path, tiny_run, capsys):
        assert cli.radius("8/255") == 8 / 255 and cli.step_size("2/255") == 2 / 255
        assert_cli_error(attack.main, ["--checkpoint", tiny_run, "--eps-linf", "8/0"], "fraction")
        run_dir = copy_run(tiny_run, tmp_path / "r")
        attack.main(["--checkpoint", str(run_dir), "--attacks", "pgd-linf", "--eps-linf", "8/255", "--steps", "1",
                     "--step-size", "2/255", "--eval-samples", "8"])
        entry = json.loads((run_dir / "attack.json").read_text())["pgd_linf"][f"{8 / 255:g}"]
        assert entry["step_size"] == 2 / 255  # recorded as a number
        assert "8 images 1 steps" in capsys.readouterr().out  # the table names what its numbers are

    def test_every_help_shows_its_defaults(self, monkeypatch):
        monkeypatch.setenv("COLUMNS", "300")  # no line wrapping inside a default
        expected = {train_pag.main: ["--epochs EPOCHS      training epochs (the paper: 100) (default: 100)", "(default: 3407)",
                                     "(default: 1000)", "default: 0.01 (paper, toy), 1e-3 (fashion-mnist)",
                                     "runs/<baseline|pag_SOURCE>"],
                    attack.main: ["(default: clean pgd-l2 pgd-linf)", "PGD iterations (default: 20)", "(default: 1000)",
                                  "default: the model's own PAG"],
                    sbg.main: ["(default: fashion-mnist)", "train: epochs (default: 20)", "(default: 4)", "{train,export,sweep}"]}
        for main, fragments in expected.items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                main(["--help"])
            text = " ".join(out.getvalue().split())
            for frag in fragments:
                assert " ".join(frag.split()) in text, frag

    def test_printed_commands_work_when_pasted_for_a_folder_with_spaces(self, tmp_path):
        out = tmp_path / "my runs" / "it's here"
        proc = run("train_baseline.py", *TINY, "--epochs", "1", "--out-dir", out)
        command = proc.stdout.strip().splitlines()[-1].split("evaluate it with: ")[1].split("   (")[0]
        argv = shlex.split(command)
        assert argv[:2] == ["python", "attack.py"] and f"--checkpoint={out / 'model.pt'}" in argv
        run(*argv[1:], "--eval-samples", "8", "--aa-version", "apgd", "--aa-iterations", "2", "--attacks", "clean")
        assert (out / "attack.json").exists()
        # A folder that starts with a dash, run from another folder: the command still names both right.
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_baseline.py"), *map(str, TINY), "--epochs", "1",
                               "--out-dir=-dash"], cwd=tmp_path, capture_output=True, text=True)
        argv = shlex.split(proc.stdout.strip().splitlines()[-1].split("evaluate it with: ")[1].split("   (")[0])
        pasted = subprocess.run([sys.executable, *argv[1:], "--eval-samples", "8", "--attacks", "clean"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert pasted.returncode == 0 and (tmp_path / "-dash" / "attack.json").exists(), pasted.stderr

    @pytest.mark.parametrize("script", ["attack.py", "sbg.py"])
    def test_sigterm_ends_attack_and_export_in_one_line(self, tmp_path, tiny_run, script):
        if script == "attack.py":
            argv = ["--checkpoint", copy_run(tiny_run, tmp_path / "r"), "--attacks", "pgd-l2", "--steps", "100000"]
            started = "pgd-l2 eps="
        else:
            data = ["--dataset", "synthetic", "--image-size", "16", "--train-samples", "16"]
            run("sbg.py", "train", *data, "--epochs", "1", "--width", "8", "--out-dir", tmp_path / "dn")
            argv = ["export", *data, "--checkpoint", tmp_path / "dn" / "denoiser.pt", "--split", "test", "--noise-draws", "100000",
                    "--out", tmp_path / "f.pt"]
            started = "export:"
        proc = subprocess.Popen([sys.executable, "-u", script, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if script == "attack.py":
            assert started in proc.stdout.readline() or started in proc.stdout.readline()
        else:
            time.sleep(8)  # torch imported and the export under way (its first progress line comes after 10 s)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted: nothing more was written"], err
        assert not (tmp_path / "f.pt").exists() and not (tmp_path / "r" / "attack.json").exists()


# ============================================================================= TestHouse
class TestHouse:
    """The code's shape: imports one way, copy-paste pieces that run alone."""

    def test_no_import_cycle_among_the_projects_modules(self):
        """Every import of ours, lazy ones inside functions included, points one way: among the root modules, among
        bench/'s (each above every root module; no root module imports one)."""
        ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "test_all.py"}
        benches = {f[:-3] for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py")}
        assert not ours & benches

        def imports(path):
            found = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module.split(".")[0])
            return found
        graph = {}
        for name in ours:
            found = imports(os.path.join(ROOT, name + ".py"))
            assert not found & benches, (name, found & benches)
            graph[name] = found & ours
        bench_layers = ["stats", "reports", "runner", "quickstart", "fashion_mnist", "lambda_per_source", "cifar10",
                        "paper_table", "pag_speed", "toy", "gpu"]
        assert set(bench_layers) == benches
        for name in benches:
            found = imports(os.path.join(ROOT, "bench", name + ".py")) & benches
            assert all(bench_layers.index(m) < bench_layers.index(name) for m in found), (name, found)
        assert graph["models"] == set() and graph["files"] == {"models"} and graph["cli"] == {"files"}
        assert graph["data"] == {"files"} and graph["toy_data"] == {"data", "files", "sources"}  # the draw is data's, the field nn's
        layers = ["models", "files", "cli", "ranks", "data", "sources", "toy_data", "pgd", "checkpoint", "train_baseline",
                  "train_pag", "sbg", "attack"]
        assert set(layers) == ours  # none upward: each module imports only those before it
        assert all(layers.index(m) < layers.index(n) for n in layers for m in graph[n]), graph
        done, visiting = set(), []

        def visit(n):
            assert n not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(n):] + [n])}"
            if n not in done:
                visiting.append(n)
                for m in graph[n]:
                    visit(m)
                visiting.pop()
                done.add(n)
        for n in sorted(graph):
            visit(n)

    def test_copy_paste_pieces_run_alone_with_math_and_torch(self):
        readme = open(os.path.join(ROOT, "README.md")).read()
        section = readme[readme.index("Copy-paste pieces"):].split("\n## ")[0]
        pasted = {}
        for piece, (module, names) in COPY_PASTE.items():
            mod = importlib.import_module(module)
            source = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n" + "\n\n".join(
                inspect.getsource(getattr(mod, n)) if callable(getattr(mod, n)) else f"{n} = {getattr(mod, n)!r}"
                for n in names)  # constants as their value
            namespace = {}
            exec(compile(source, piece, "exec"), namespace)  # a file holding only these, importing math and torch
            pasted[piece] = namespace
            assert all(f"`{n}`" in section or f".{n}`" in section for n in names), piece  # the README names each helper
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        torch.manual_seed(0)
        model, x = build_model("resnet18", 10, 3, 8).double().train(), torch.rand(3, 3, 8, 8, dtype=torch.float64)
        t = sample_targets(3, 10, 4, gen())
        gt = torch.randn(3, 4, 3, 8, 8, dtype=torch.float64)
        p = pasted["train_pag.pag_loss"]
        assert torch.equal(p["sample_targets"](3, 10, 4, gen()), t)
        assert torch.allclose(p["pag_loss"](model, x, gt, t), pag_loss(model, x, gt, t), atol=1e-12)
        with pytest.raises(ValueError, match="per-column"):  # a typo is a built-in error naming the choices, no NameError
            p["pag_loss"](model, x, gt, t, formulation="per_column")
        official = build_model("vit", 10, 3, 32).eval()
        pasted_vit = pasted["models.from_official"]["from_official"]({"module." + k: v for k, v in official.state_dict().items()})
        xv = torch.rand(2, 3, 32, 32)
        assert torch.equal(pasted_vit(xv), official(xv))
        c = pasted["train_pag.chunked_pag_loss"]
        assert abs(c["chunked_pag_loss"](model, x, gt, t, 2.0, 3)[2] - chunked_pag_loss(model, x, gt, t, 2.0, 3)[2]) < 1e-10
        small = build_model("cnn", 10, 3, 8).eval()
        xs, ys = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        for norm in ("l2", "linf"):
            assert torch.equal(pasted["pgd.pgd"]["pgd"](small, xs, ys, 0.5, norm, steps=3, generator=gen()),
                               PGD.pgd(small, xs, ys, 0.5, norm, steps=3, generator=gen()))
        d = tiny_data()
        s = pasted["sources"]
        assert torch.equal(s["class_means"](d.train_x, d.train_y, 3), S.class_means(d.train_x, d.train_y, 3))
        assert torch.equal(s["one_image_per_class"](d.train_y, 3, gen()), S.one_image_per_class(d.train_y, 3, gen()))
        assert torch.equal(s["nearest_of_class"](d.test_x, d.train_x, d.train_y, 3),
                           S.nearest_of_class(d.test_x, d.train_x, d.train_y, 3))
        with pytest.raises(ValueError, match="class 3"):  # a built-in exception when pasted
            s["nearest_of_class"](d.test_x, d.train_x, d.train_y, 4)
        cf = pasted["data.crop_flip"]
        offsets, flips = cf["draw_crop_flip"](4, 4, gen())
        assert torch.equal(cf["crop_flip"](xs, offsets, flips), D.crop_flip(xs, *D.draw_crop_flip(4, 4, gen())))


# ============================================================================= TestBench
class TestBench:
    """Bench/: statistics, the runner, the claims bench, Table 1, the speed bench."""

    def test_bench_statistics_paired_intervals_verdicts_and_seeds_to_decide(self):
        stats = load_bench("stats")
        a, b = [0.50, 0.55, 0.60], [0.40, 0.41, 0.45]
        d = [x - y for x, y in zip(a, b)]
        m, sd = sum(d) / 3, (sum((v - sum(d) / 3) ** 2 for v in d) / 2) ** 0.5
        out = stats.paired(a, b, "a - b")
        assert out["difference"] == pytest.approx(m) and out["ci95"] == pytest.approx([m - 4.303 * sd / 3 ** 0.5, m + 4.303 * sd / 3 ** 0.5])
        assert out["verdict"] == "holds" and stats.paired(b, a, "b - a")["verdict"] == "contradicted"
        unclear = stats.paired([0.5, 0.4, 0.6], [0.45, 0.45, 0.5], "x")  # differences +5, -5, +10
        assert unclear["verdict"] == "not shown"
        # What would decide it: 23 seeds with this mean (3.33) and standard deviation (7.64): t(21) 2.080 * 7.64 /
        # sqrt(22) = 3.39 > 3.33 still holds 0, t(22) 2.074 * 7.64 / sqrt(23) = 3.30 does not.
        assert unclear["seeds_to_decide"] == 23 and out["seeds_to_decide"] == 3  # out: it already holds at 3
        assert stats.seeds_to_decide([0.1, -0.1]) is None and stats.seeds_to_decide([0.3]) is None
        assert stats.seeds_to_decide([0.001, -0.0012, 0.0011], most=50) is None  # a mean near 0 takes more than 50
        assert stats.seeds_to_decide([-0.05, 0.05, -0.10]) == 23  # the sign does not matter
        assert stats.verdict([0.01, 0.2]) == "holds" and stats.verdict([-0.2, -0.01]) == "contradicted"
        assert stats.verdict([-0.1, 0.1]) == "not shown" and stats.verdict(None) == "not shown"
        assert stats.t_quantile_975(2) == 4.303 and abs(stats.t_quantile_975(60) - 2.000) < 2e-3
        st = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
        assert st["mean"] == 2.5 and st["ci95"] == pytest.approx([2.5 - 3.182 * (5 / 3) ** 0.5 / 2, 2.5 + 3.182 * (5 / 3) ** 0.5 / 2])

    def test_bench_correlation_over_seeds_is_fishers_z_with_a_t_interval(self):
        """Claim 3's statistic: Pearson r within each seed, averaged on Fisher's z scale, t interval over seeds
        (restated here with the standard library's correlation)."""
        stats = load_bench("stats")
        xs, ys = [0.1, 0.2, 0.3, 0.4], {0: [0.2, 0.5, 0.4, 0.9], 1: [0.1, 0.3, 0.2, 0.35], 2: [0.5, 0.1, 0.6, 0.7]}
        pts = [(s, x, y) for s in (0, 1, 2) for x, y in zip(xs, ys[s])]
        rs = [statistics.correlation(xs, ys[s]) for s in (0, 1, 2)]
        z = [math.atanh(r) for r in rs]
        half = 4.303 * statistics.stdev(z) / 3 ** 0.5
        got = stats.correlation_over_seeds(pts, [0, 1, 2])
        assert got["per_seed"] == pytest.approx(rs) and got["r"] == pytest.approx(math.tanh(statistics.fmean(z)))
        assert got["ci95"] == pytest.approx([math.tanh(statistics.fmean(z) - half), math.tanh(statistics.fmean(z) + half)])
        assert stats.correlation_over_seeds(pts[:-2], [0, 1, 2])["r"] is None  # seed 2 with 2 points has no r
        assert stats.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and stats.pearson([1, 1], [2, 3]) is None

    def test_claims_verdicts_lambda_selection_and_report_on_hand_made_numbers(self):
        fm, stats, reports = load_bench("fashion_mnist"), load_bench("stats"), load_bench("reports")
        # A claim of several comparisons: holds only if each holds; one contradicted comparison contradicts it.
        rows = {m: {k: {"per_seed": v} for k in ("aa_l2", "aa_linf")} for m, v in
                {"vanilla": [0.1, 0.1, 0.12], "pag-cm": [0.3, 0.32, 0.35], "pag-nn": [0.3, 0.31, 0.36], "pag-oi": [0.3, 0.34, 0.33],
                 "pag-sbg": [0.2, 0.21, 0.23], "pgd-at": [0.5, 0.5, 0.5], "pag-cm+pgd-at": [0.48, 0.52, 0.51]}.items()}
        found = fm.claims(rows)
        assert found["1"]["verdict"] == "holds" and len(found["1"]["comparisons"]) == 8
        assert found["2"]["verdict"] == "contradicted" and found["2"]["headline"].startswith("pag-sbg - ")
        assert found["4"]["verdict"] == "not shown"
        assert fm.claims({k: v for k, v in rows.items() if k != "pgd-at"})["4"]["verdict"] == "not run"
        # Claim 3: both measures, each without the row trained on its targets; SBG holds here, NN does not.
        models = [("pag-cm", 0.1), ("pag-cm", 0.5), ("pag-nn", 0.25), ("pag-sbg", 0.25)]
        points = [{"seed": s, "model": m, "lambda": lam, "aa_l2": 0.3 + 0.1 * i + 0.01 * s, "align_sbg": 0.4 + 0.05 * i - 0.001 * s * i,
                   "align_nn": [0.5, 0.3, 0.6, 0.4][(i + s) % 4]} for s in (0, 1, 2) for i, (m, lam) in enumerate(models)]
        c3 = fm.claim_3(points, [0, 1, 2])
        assert [c["comparison"] for c in c3["comparisons"]] == ["r(align_sbg, aa_l2) without pag-sbg", "r(align_nn, aa_l2) without pag-nn"]
        assert [c["points"] for c in c3["comparisons"]] == [9, 9] and c3["with_own_rows"]["align_sbg"]["points"] == 12
        assert c3["comparisons"][0]["verdict"] == "holds" and c3["comparisons"][1]["verdict"] != "holds"
        assert c3["verdict"] == "not shown" and c3["headline"] == "r(align_nn, aa_l2) without pag-nn"
        found["3"] = c3
        # lambda selection: the largest lambda within 10 points of vanilla's validation accuracy
        val = {"vanilla": [0.80, 0.82], 0.1: [0.79, 0.80], 0.5: [0.72, 0.73], 1.0: [0.60, 0.65]}
        assert fm.select_lambda(val, [0.1, 0.5, 1.0], 0.10) == 0.5 and fm.select_lambda(val, [0.5, 1.0], 0.01) == 0.5
        # The .md twin lists every comparison with what would decide it (here claim 4: 50 - 50, +2, -2 points).
        full = {m: {k: stats.mean_interval(v["aa_l2"]["per_seed"]) for k in (*fm.METRICS, "val_acc")} for m, v in rows.items()}
        config = dict(fm.CONFIG, selected_lambda=0.25)
        md = reports.claims_markdown(full, {}, found, config).splitlines()
        line = next(x for x in md if x.startswith("| 4 | pag-cm+pgd-at - pgd-at, aa_l2 |"))
        # mean 0.333, sd 2.082 points: 4.303 * 2.082 / sqrt(3) = 5.17 around it; sqrt(n) / t(n - 1) must pass
        # 2.082 / 0.333 = 6.245: at 152 seeds 12.329 / 1.9758 = 6.240, at 153 12.369 / 1.9757 = 6.261.
        assert line == "| 4 | pag-cm+pgd-at - pgd-at, aa_l2 | -2.0, +2.0, +1.0 | +0.3 [-4.8, +5.5] | not shown | 153 |"
        assert sum(x.startswith("| 1 | ") for x in md) == 8 and sum(x.startswith("| 2 | ") for x in md) == 6
        assert sum(x.startswith("| 3 | r(align_") for x in md) == 2 and sum(x.startswith("| 3 (not in the verdict) |") for x in md) == 2

    def test_bench_scheduler_respects_dependencies_and_fails_loudly(self):
        run_jobs = load_bench("runner").run_jobs
        log, lock = [], threading.Lock()

        def job(name):
            def fn():
                with lock:
                    log.append(("start", name))
                with lock:
                    log.append(("end", name))
            return fn

        jobs = {n: job(n) for n in ("sbg", "a", "pag-sbg", "b", "align a")}
        needs = {"pag-sbg": {"sbg"}, "align a": {"sbg", "a"}}
        run_jobs(jobs, needs, workers=2)
        ends = {n: log.index(("end", n)) for n in jobs}
        assert sorted(n for _, n in log if _ == "start") == sorted(jobs)  # each job ran once
        for name, deps in needs.items():
            assert all(ends[d] < log.index(("start", name)) for d in deps)

        def boom():
            raise RuntimeError("failed: x (log: y)")
        with pytest.raises(RuntimeError, match="failed: x"):
            run_jobs({"sbg": boom, "pag-sbg": job("pag-sbg")}, {"pag-sbg": {"sbg"}}, workers=2)
        assert ("start", "pag-sbg") not in log[len(jobs) * 2:]  # nothing that needed the failed job started

    def test_bench_runner_reuses_a_result_file_only_if_made_with_the_same_settings(self, tmp_path):
        """The runner's result cache alone, nothing trained: a file made with a model's settings (its command,
        the SBG fields named by role, not by path) is its result; one made with other settings is refused in one
        line naming it."""
        runner = load_bench("runner")

        class Tiny(runner.Bench):
            name, models = "tiny", {"pag-sbg": ("train_pag.py", ["--source", "sbg"])}

            def common_flags(self, cfg):
                return ["--dataset", "synthetic"], ["--dataset", "synthetic", "--epochs", cfg["epochs"]]
        cfg = {"epochs": 1, "test_samples": 16, "aa_version": "apgd", "eps_l2": 0.5, "eps_linf": 0.03, "sbg": None}
        bench = Tiny(cfg, str(tmp_path / "runs"), str(tmp_path), 1)
        key, want = bench.key("pag-sbg", 0, 0.5), bench.settings("pag-sbg", 0, 0.5)
        assert key == "pag-sbg_lambda0.5_seed0" and want["train"] == \
            "train_pag.py --dataset synthetic --epochs 1 --source sbg --sbg-file SBG_TRAIN_FIELDS --pag-coeff 0.5 --seed 0"
        files.write_json({**bench_result("pag-sbg", 0.8, 0.3, 0.2), "key": key, "settings": want}, bench.result_path(key))
        bench.train_and_attack("pag-sbg", 0, 0.5)
        assert not (tmp_path / "runs").exists()  # its file is its result: no run folder, no training
        files.write_json({**bench_result("pag-sbg", 0.8, 0.3, 0.2), "key": key, "settings": {**want, "train": "other"}},
                         bench.result_path(key))
        assert_cli_error(lambda argv: bench.train_and_attack("pag-sbg", 0, 0.5), [], f"{key}.json was made with other settings")

    def test_claims_bench_assembles_a_subset_of_rows(self, tmp_path):
        """--rows vanilla: the tables, claims ("not run") and figures from what there is, no KeyError."""
        fm = load_bench("fashion_mnist")
        cfg = json.loads(json.dumps({**fm.CONFIG, **fm.QUICK}))
        bench = fm.ClaimsBench(cfg, str(tmp_path), str(tmp_path), 1, {"vanilla"})
        for seed in cfg["seeds"]:
            r = bench_result("vanilla", 0.8, 0.1 + seed / 10, 0.05, n=32, align_nn=0.2, align_sbg=0.1, val_acc=0.8,
                             val_pgd_l2_acc=0.1, train_seconds=1.0, seconds=2.0, **{"lambda": None})
            files.write_json({**r, "key": f"vanilla_seed{seed}", "seed": seed}, bench.result_path(f"vanilla_seed{seed}"))
        out = bench.assemble(0.0)
        assert out["rows"]["vanilla"]["aa_l2"]["per_seed"] == [0.1, 0.2] and out["claims"]["1"]["verdict"] == "not run"
        assert (tmp_path / "fashion_mnist_tradeoff.png").stat().st_size > 1000 and "no PAG row" in \
            (tmp_path / "fashion_mnist_seeds.md").read_text()

    def test_an_interrupted_bench_stops_its_jobs_and_says_what_was_written(self, tmp_path):
        """SIGTERM to a bench: its running scripts are stopped at once (they resume at the next call), none starts
        after, and its one line names the jobs stopped and those finished (it once waited for every running job,
        wrote its row, then said that nothing more was written)."""
        script = tmp_path / "bench.py"
        script.write_text(f"""import os, sys, time
sys.path[:0] = [{os.path.join(ROOT, 'bench')!r}, {ROOT!r}]
import cli, files
from runner import run_jobs, sh
log = {str(tmp_path / 'log')!r}
def fast():
    files.write_json({{"done": True}}, {str(tmp_path / 'fast.json')!r})
def slow():
    sh(log, "-c", "import os, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(60)")
def later():
    sh(log, "-c", "open({str(tmp_path / 'later')!r}, 'w').write('ran')")
cli.run_cli(lambda: run_jobs({{"fast": fast, "slow": slow, "later": later}}, {{"later": {{"slow"}}}}, 2))
""")
        proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (tmp_path / "pid").exists() and time.time() < deadline:
            time.sleep(0.1)
        child = int((tmp_path / "pid").read_text())
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert time.time() - start < 20 and proc.returncode == 130, (out, err)
        assert err.strip().splitlines() == ["interrupted: stopped slow (each continues from its last saved epoch when the "
                                            "bench runs again); this call finished 1 job(s), each with its result file "
                                            "written (fast)"], err
        assert json.loads((tmp_path / "fast.json").read_text()) == {"done": True} and not (tmp_path / "later").exists()
        with pytest.raises(ProcessLookupError):  # the stopped script is gone, not left running
            os.kill(child, 0)

    def test_a_failed_job_stops_the_running_ones_at_once(self, tmp_path):
        """One job fails while another trains for an hour: the bench ends now, the other stopped (it resumes at the
        next call), and the one line says what failed, what was stopped and what was finished."""
        runner = load_bench("runner")
        log = str(tmp_path / "log")

        def fail():
            time.sleep(2)
            raise UserError("job broke")
        start = time.time()
        with pytest.raises(UserError, match=r"job broke; stopped slow \(each continues.*finished 0 job"):
            runner.run_jobs({"slow": lambda: runner.sh(log, "-c", "import time; time.sleep(120)"), "fail": fail}, {}, 2)
        assert time.time() - start < 30
        runner.sh(log, "-c", "print('after')")  # the stop ended with the bench: a later script in this process runs
        assert open(log).read().endswith("after\n")

    def test_a_subset_of_rows_never_rewrites_the_tables_of_more_rows(self, tmp_path, capsys):
        """--rows vanilla beside the committed tables (every row, 8 seeds, the sweep at 3): it prints vanilla's numbers
        and leaves every table and figure as it was (it once rewrote them vanilla-only, then raised a TypeError)."""
        fm = load_bench("fashion_mnist")
        res = os.path.join(ROOT, "bench", "results")
        for name in os.listdir(res):
            if name.startswith("fashion_mnist_") and (name.endswith((".json", ".md", ".png")) or name == "fashion_mnist_runs"):
                (shutil.copytree if os.path.isdir(os.path.join(res, name)) else shutil.copy)(os.path.join(res, name), tmp_path / name)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        bench = fm.ClaimsBench(json.loads(json.dumps(fm.CONFIG)), str(tmp_path / "o"), str(tmp_path), 1, {"vanilla"})
        out = bench.assemble(0.0)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
        assert set(out["rows"]) == {"vanilla"} and "left" in capsys.readouterr().out
        committed = json.loads(before["fashion_mnist_seeds.json"])
        assert out["rows"]["vanilla"] == committed["rows"]["vanilla"]  # the same numbers, from the same files

    def test_claims_bench_adds_seeds_at_the_chosen_lambda_without_choosing_again(self, tmp_path, monkeypatch):
        """--seeds 0 1 2 --sweep-seeds 0 1: the sweep (and the choice of lambda) stays at seeds 0 1; seed 2 gets
        every row at the chosen lambda; claim 3's verdict is over the same models at every seed, the sweep seeds'
        correlation with the sweep beside it."""
        fm = load_bench("fashion_mnist")
        assert_cli_error(fm.main, ["--seeds", "0", "1", "--sweep-seeds", "1", "2"], "among --seeds")
        cfg = json.loads(json.dumps({**fm.CONFIG, **fm.QUICK, "seeds": [0, 1, 2], "sweep_seeds": [0, 1]}))
        bench = fm.ClaimsBench(cfg, str(tmp_path), str(tmp_path), 1)
        planned = {}
        monkeypatch.setattr(fm, "run_jobs", lambda jobs, needs, workers, cost: planned.update(jobs=jobs, needs=needs))
        bench.run()
        jobs = set(planned["jobs"])
        assert {"pag-cm lambda 0.1 seed 0", "pag-cm lambda 1 seed 1"} <= jobs and not any("lambda" in j and "seed 2" in j for j in jobs)
        assert {f"{m} seed 2" for m in fm.MODELS} <= jobs and "pag-cm seed 0" not in jobs  # the sweep's run is seed 0's row
        assert planned["needs"]["pag-cm seed 2"] == {"select"} and planned["needs"]["pag-sbg seed 2"] == {"select", "sbg"}
        assert planned["needs"]["select"] == {"vanilla seed 0", "vanilla seed 1", *(f"pag-cm lambda {x:g} seed {s}"
                                                                                   for x in (0.1, 1.0) for s in (0, 1))}

        def write(model, seed, lam, l2):
            key = bench.key(model, seed, lam)
            files.write_json({**bench_result(model, 0.8, l2, l2 / 2, n=32, align_nn=l2 / 2 + seed / 100,
                                             align_sbg=l2 / 3 + seed / 50, val_acc=0.9 - (lam or 0) / 10, val_pgd_l2_acc=0.1,
                                             train_seconds=1.0, seconds=2.0, **{"lambda": lam}), "key": key, "seed": seed},
                             bench.result_path(key))
        for seed in (0, 1, 2):
            for i, model in enumerate(fm.MODELS):
                lam = 1.0 if model in fm.PAG_ROWS else None  # 1.0: the larger lambda within 10 points of vanilla
                write(model, seed, lam, 0.1 + i / 40 + seed / 100 + (i * seed % 3) / 50)
        for seed in (0, 1):
            write("pag-cm", seed, 0.1, 0.12 + seed / 100)
        out = bench.assemble(0.0)
        assert bench.lam == 1.0 and out["config"]["sweep_seeds"] == [0, 1]
        assert all(len(r["aa_l2"]["per_seed"]) == 3 for r in out["rows"].values())
        sweep_file = json.loads((tmp_path / "fashion_mnist_lambda.json").read_text())
        lambda_rows = sweep_file["rows"]
        assert lambda_rows["0.1"]["aa_l2"]["per_seed"] == [0.12, 0.13] and len(lambda_rows["1"]["clean"]["per_seed"]) == 2
        assert sweep_file["seeds"] == [0, 1]  # the seeds its rows are over, not the bench's
        c3 = out["claims"]["3"]
        assert [c["points"] for c in c3["comparisons"]] == [9, 9] and "over the PAG rows," in c3["claim"]
        fuller = c3["with_lambda_sweep"]
        assert [c["points"] for c in fuller["comparisons"]] == [8, 8] and len(fuller["comparisons"][0]["per_seed"]) == 2
        md = (tmp_path / "fashion_mnist_seeds.md").read_text()
        assert "3 seeds (0, 1, 2)" in md and "validation split of seeds 0, 1" in md and "3 (seeds 0, 1 with the λ sweep" in md

    def test_lambda_per_source_gives_each_source_its_own_lambda_and_claim_2_at_both(self, tmp_path, monkeypatch):
        """bench/lambda_per_source.py on hand-made files: every source swept at the sweep seeds, each chosen by the
        claims bench's rule on its own validation accuracies, the other seeds at the own and the common lambda (one
        model where they are one), claim 2 paired by seed at both."""
        ps = load_bench("lambda_per_source")
        assert_cli_error(ps.main, ["--seeds", "0", "1", "--sweep-seeds", "1", "2"], "among --seeds")
        cfg = json.loads(json.dumps({**ps.fm.CONFIG, **ps.fm.QUICK, "seeds": [0, 1, 2], "sweep_seeds": [0, 1]}))
        assert cfg["lambdas"] == [0.1, 1.0]
        bench = ps.PerSourceBench(cfg, str(tmp_path), str(tmp_path), 1)
        planned = {}
        monkeypatch.setattr(ps, "run_jobs", lambda jobs, needs, workers, cost: planned.update(jobs=jobs, needs=needs))
        bench.run()
        assert set(planned["jobs"]) == {"sbg", "select", "vanilla seed 0", "vanilla seed 1",
                                        *(f"{m} lambda {lam:g} seed {s}" for m in ps.SOURCES for lam in (0.1, 1.0) for s in (0, 1)),
                                        *(f"{m} {how} seed 2" for m in ps.SOURCES for how in ("own", "common"))}
        needs = planned["needs"]
        assert needs["pag-sbg lambda 1 seed 0"] == {"sbg"} and needs["pag-nn lambda 1 seed 0"] == set()
        assert needs["pag-sbg own seed 2"] == {"select", "sbg"} and needs["pag-nn common seed 2"] == {"select", "pag-nn own seed 2"}
        assert len(needs["select"]) == 2 + 4 * 2 * 2
        # Vanilla validates at 90%; within 10 points at lambda 1: pag-nn (85%) and pag-sbg (82%), not pag-cm or pag-oi.
        val_at_1 = {"pag-cm": 0.70, "pag-nn": 0.85, "pag-oi": 0.75, "pag-sbg": 0.82}
        base = {"pag-cm": 0.30, "pag-nn": 0.32, "pag-oi": 0.31, "pag-sbg": 0.35}

        def l2(m, lam, seed):
            return base[m] + lam / 10 + seed * (0.01 if m == "pag-nn" else 0.0)

        def write(m, seed, lam):
            key = bench.key(m, seed, lam)
            val = 0.9 if lam is None else val_at_1[m] if lam == 1.0 else 0.88
            a = 0.1 if lam is None else l2(m, lam, seed)
            files.write_json({**bench_result(m, 0.8, a, a / 2, n=32, align_nn=0.3, align_sbg=0.4, val_acc=val,
                                             val_pgd_l2_acc=0.1, train_seconds=1.0, seconds=2.0, **{"lambda": lam}),
                              "key": key, "seed": seed}, bench.result_path(key))
        for seed in (0, 1):
            write("vanilla", seed, None)
            for m in ps.SOURCES:
                for lam in (0.1, 1.0):
                    write(m, seed, lam)
        own = {"pag-cm": 0.1, "pag-nn": 1.0, "pag-oi": 0.1, "pag-sbg": 1.0}
        for m in ps.SOURCES:
            write(m, 2, own[m])
            write(m, 2, 0.1)  # the common lambda: the same file where it is the own one
        out = bench.assemble(0.0)
        assert bench.lam_of == own and out["config"]["common_lambda"] == 0.1
        assert out["rows"]["own"]["pag-nn"]["aa_l2"]["per_seed"] == pytest.approx([l2("pag-nn", 1.0, s) for s in (0, 1, 2)])
        assert out["rows"]["common"]["pag-nn"]["aa_l2"]["per_seed"] == pytest.approx([l2("pag-nn", 0.1, s) for s in (0, 1, 2)])
        for how, lam_of in (("own", own), ("common", dict.fromkeys(ps.SOURCES, 0.1))):
            comps = {c["comparison"]: c for c in out["claim_2"][how]["comparisons"]}
            assert len(comps) == 6
            for other in ("pag-cm", "pag-nn", "pag-oi"):
                c = comps[f"pag-sbg (λ {lam_of['pag-sbg']:g}) - {other} (λ {lam_of[other]:g}), aa_l2"]
                assert c["per_seed"] == pytest.approx([l2("pag-sbg", lam_of["pag-sbg"], s) - l2(other, lam_of[other], s)
                                                       for s in (0, 1, 2)])
        # Every source at one lambda, each lambda of the sweep: the sweep seeds alone (seed 2 has no pag-cm at 1).
        at_each = out["claim_2_at_each_sweep_lambda"]
        assert at_each["seeds"] == [0, 1] and set(at_each["by_lambda"]) == {"0.1", "1.0"}  # keys as validation_clean_acc's
        for lam in (0.1, 1.0):
            comps = {c["comparison"]: c["per_seed"] for c in at_each["by_lambda"][str(lam)]["comparisons"]}
            expected = {f"pag-sbg (λ {lam:g}) - {o} (λ {lam:g}), {m}":
                        [(l2("pag-sbg", lam, s) - l2(o, lam, s)) / (1 if m == "aa_l2" else 2) for s in (0, 1)]
                        for o in ("pag-cm", "pag-nn", "pag-oi") for m in ("aa_l2", "aa_linf")}
            assert sorted(comps) == sorted(expected)  # approx compares flat values only (pytest >= 9.2: no nesting)
            for name, per_seed in expected.items():
                assert comps[name] == pytest.approx(per_seed), name
        # The price beside the claim: clean accuracy differences of the same pairs (every model here: 80%).
        assert [(c["comparison"], c["per_seed"]) for c in out["claim_2"]["own"]["clean"]] == \
            [(f"pag-sbg (λ 1) - {o} (λ {own[o]:g}), clean", [0.0] * 3) for o in ("pag-cm", "pag-nn", "pag-oi")]
        assert {c["verdict"] for c in out["claim_2"]["own"]["clean"]} == {"not separated from 0"}  # no claim's words
        assert "own_unswept_seeds" not in out["claim_2"]  # one seed outside the sweep: no interval
        # pag-sbg - pag-nn: 0.03, 0.02, 0.01 at both lambdas: the t interval over three seeds reaches below 0.
        assert out["claim_2"]["own"]["verdict"] == out["claim_2"]["common"]["verdict"] == "not shown"
        assert json.loads((tmp_path / "fashion_mnist_per_source.json").read_text())["claim_2"] == out["claim_2"]
        md = (tmp_path / "fashion_mnist_per_source.md").read_text()
        assert "| pag-nn | 88.0 | **85.0** | 1 |" in md and "| pag-cm | **88.0** | 70.0 | 0.1 |" in md
        assert "| common, 0.1 (PAG-CM's) | **not shown** |" in md and "vanilla 90.0" in md
        assert "| 1 (claim: not shown) | pag-sbg (λ 1) - pag-nn (λ 1), aa_l2 | +3.0, +2.0 |" in md

    def test_per_source_sweep_table_in_bench_readme_is_the_committed_files_and_the_rule(self, tmp_path):
        """bench/README.md's per-source validation table: each cell is the mean over the sweep seeds of the committed
        result files, and each chosen lambda is the claims bench's SELECTION_RULE on them (an edited file or a hand-typed
        number fails here)."""
        ps = load_bench("lambda_per_source")
        cfg = json.loads(json.dumps(ps.fm.CONFIG))
        bench = ps.PerSourceBench(cfg, str(tmp_path), os.path.join(ROOT, "bench", "results"), 1)
        table = {}
        for line in open(os.path.join(ROOT, "bench", "README.md")):
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            if len(cells) == len(cfg["lambdas"]) + 2 and cells[0].startswith("PAG-"):
                table[cells[0].lower()] = [float(c) for c in cells[1:]]
        assert set(table) == set(ps.SOURCES)
        for src in ps.SOURCES:
            val, lam = bench.choose_lambda(src)  # the bench's own reading of the committed files and its rule
            assert table[src] == [round(100 * statistics.fmean(val[x]), 1) for x in cfg["lambdas"]] + [lam], src

    def test_cifar10_bench_assembles_its_files_with_the_papers_numbers_and_collects_without_training(self, tmp_path, capsys):
        """bench/cifar10.py on hand-made result files: the claims bench's tables and claims with the paper's CIFAR-10
        numbers beside the rows (a reference, not a pass mark), the SBG sweep and the standard AutoAttack check under
        them; --collect trains nothing and names a missing file; the data folder is not a setting (its content is);
        result files made on other data are refused; the budget curve reads the main bench's own budget."""
        c10 = load_bench("cifar10")
        cfg = json.loads(json.dumps({**c10.CONFIG, **c10.QUICK}))
        res, out = tmp_path / "res", tmp_path / "out"
        bench = c10.NaturalImagesBench(cfg, str(out), str(res), 1, None, name="cifar10_quick")
        data = {"train": "a" * 64, "test": "b" * 64}
        extra = dict(align_nn=0.2, align_sbg=0.1, val_pgd_l2_acc=0.1, train_seconds=1.0, seconds=2.0, data_sha256=data)

        def put(model, seed, lam, clean, l2, linf, val=0.8):
            key = bench.key(model, seed, lam)
            files.write_json({**bench_result(model, clean, l2, linf, n=32, val_acc=val, **extra), "key": key, "seed": seed,
                              "lambda": lam, "settings": bench.settings(model, seed, lam)}, bench.result_path(key))
        for seed in (0, 1):
            put("vanilla", seed, None, 0.9, 0.1 + 0.01 * seed, 0.0)
            put("pgd-at", seed, None, 0.8, 0.5, 0.3)
            put("pag-cm", seed, 0.05, 0.85, 0.3 + 0.01 * seed, 0.1, val=0.78)  # within 10 points of vanilla's 0.8: chosen
            put("pag-cm", seed, 0.1, 0.6, 0.3, 0.1, val=0.6)
        for model in ("pag-oi", "pag-nn", "pag-sbg"):
            put(model, 0, 0.05, 0.85, 0.35, 0.12)
        argv = ["--quick", "--collect", "--out-dir", str(out), "--results-dir", str(res)]
        assert_cli_error(c10.main, argv, "--collect", "pag-nn_lambda0.05_seed1 (not there)")  # one missing: named, nothing trained
        assert not out.exists()
        key = bench.key("pgd-at", 0)  # one made with other settings (another training command): not tabled either
        kept = open(bench.result_path(key)).read()
        files.write_json({**json.loads(kept), "settings": {**json.loads(kept)["settings"], "train": "other"}}, bench.result_path(key))
        assert_cli_error(c10.main, argv, "pgd-at_seed0 (made with other settings)")
        open(bench.result_path(key), "w").write(kept)
        for model in ("pag-oi", "pag-nn", "pag-sbg"):
            put(model, 1, 0.05, 0.84, 0.36, 0.13)
        files.write_json({"rows": [{"timestep": 100, "alpha_bar": 0.9, "consistency": 0.7, "cross_image": 0.3,
                                    "cross_class": 0.4, "gap": 0.3}], "best_timestep": 100, "images": 16},
                         res / "cifar10_quick_sbg" / "sweep.json")
        got = c10.main(argv)
        assert not out.exists() and got["config"]["selected_lambda"] == 0.05 and got["config"]["data_sha256"] == data
        assert got["claims"]["1"]["verdict"] == "holds" and got["claims"]["4"]["verdict"] == "not run"
        md = (res / "cifar10_quick_seeds.md").read_text()
        assert "| pag-oi | " in md and "| 46.63 / 13.50 |" in md and "| pgd-at |" in md and "*paper*:" in md
        assert "| L∞ 8/255 |" in md and "0.03137" not in md  # the radius as the paper writes it
        assert "| 100 **(chosen)** | 0.900 | 0.700 | 0.300 | 0.400 | 0.300 |" in md and "(not run yet)" in md
        # The data folder's path is not a setting; the training command names it DATA_DIR.
        jpeg = c10.NaturalImagesBench(json.loads(json.dumps(c10.CONFIG)), str(out), str(res), 1, None, name="cifar10_jpeg")
        assert "--data-dir DATA_DIR " in jpeg.settings("pag-cm", 0, 0.1)["train"] and "shared" not in jpeg.settings("vanilla", 0, None)["train"]
        # Result files of other data (another content) are never tabled together.
        put("pgd-at", 1, None, 0.8, 0.5, 0.3)
        key = bench.key("pgd-at", 1)
        files.write_json({**json.loads(open(bench.result_path(key)).read()), "data_sha256": {"train": "c" * 64, "test": "b" * 64}},
                         bench.result_path(key))
        assert_cli_error(c10.main, argv, "different data")
        # The budget curve: the main bench's budget read from its files, the others' from theirs.
        put("pgd-at", 1, None, 0.8, 0.5, 0.3)
        budget = c10.BudgetBench(cfg, str(out), str(res), 1, "cifar10_quick", [256, 1], 0.05)
        for model, lam in (("vanilla", None), ("pag-cm", 0.05)):
            key = budget.key(model, 0, lam)
            files.write_json({**bench_result(model, 0.7, 0.2, 0.05, n=32, val_acc=0.7, **{k: v for k, v in extra.items()
                                                                                          if k != "align_sbg"}),
                              "key": key, "seed": 0, "lambda": lam, "settings": budget.settings(model, 0, lam)},
                             budget.result_path(key))
        # Each finished run's per-epoch log is kept beside its result file (the main bench's under the budget's name),
        # so the per-epoch curves are drawn again from committed files on a machine without the run folders. A log is
        # its run's only if its last line holds the result's validation numbers.
        line = lambda val: {"epoch": 1, "loss": 1.0, "ce": 0.5, "pag": 0.5, "eval_split": "val", "val_acc": val,  # noqa: E731
                            "val_pgd_l2_0.5_acc": 0.1}
        for run, val in ((out / "budget" / budget.key("pag-cm", 0, 0.05), 0.7), (out / bench.key("pag-cm", 0, 0.05), 0.78)):
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text(json.dumps(line(val)) + "\n")
        (out / bench.key("vanilla", 0)).mkdir()
        (out / bench.key("vanilla", 0) / "metrics.jsonl").write_text("")  # no finished epoch: no curve, no copy
        curve = c10.budget_curve({**cfg, "budgets": [[256, 1], [384, 1]]}, str(out), str(res), 1, bench)
        assert [(p["train_samples"], p["model"], p["clean"]) for p in curve["points"]] == \
            [(256, "vanilla", 0.7), (256, "pag-cm", 0.7), (384, "vanilla", 0.9), (384, "pag-cm", 0.85)]
        want = lambda val: [{"epoch": 1, "val_acc": val, "pag": 0.5, "val_pgd_l2_acc": 0.1}]  # noqa: E731
        assert [p["per_epoch"] for p in curve["points"]] == [None, want(0.7), None, want(0.78)]
        copies = res / "cifar10_quick_budget_runs"
        assert sorted(p.name for p in copies.glob("*.metrics.jsonl")) == \
            ["pag-cm_lambda0.05_seed0_n256_e1.metrics.jsonl", "pag-cm_lambda0.05_seed0_n384_e1.metrics.jsonl"]
        shutil.rmtree(out)
        again = c10.budget_curve({**cfg, "budgets": [[256, 1], [384, 1]]}, str(out), str(res), 1, bench)
        assert [p["per_epoch"] for p in again["points"]] == [None, want(0.7), None, want(0.78)]
        # A copy of another run's log (swapped, or left from an earlier run) is refused, not drawn.
        mine, other = (copies / f"pag-cm_lambda0.05_seed0_n{n}_e1.metrics.jsonl" for n in (256, 384))
        kept = mine.read_text()
        mine.write_text(other.read_text())
        assert_cli_error(lambda argv: c10.budget_curve({**cfg, "budgets": [[256, 1], [384, 1]]}, str(out), str(res), 1, bench),
                         [], "n256_e1.metrics.jsonl is not the per-epoch log of pag-cm_lambda0.05_seed0_n256_e1")
        mine.write_text(kept)
        # --collect --budget: the same files assembled, nothing trained; a missing or other-settings file refused.
        assert c10.main([*argv, "--budget"])["points"] == again["points"] and not out.exists()
        victim = tmp_path / os.path.relpath(budget.result_path(budget.key("vanilla", 0)), tmp_path)
        kept = victim.read_text()
        victim.write_text(json.dumps({**json.loads(kept), "settings": {**json.loads(kept)["settings"], "train": "other"}}))
        assert_cli_error(c10.main, [*argv, "--budget"], "vanilla_seed0_n256_e1.json is made with other settings")
        victim.unlink()
        assert_cli_error(c10.main, [*argv, "--budget"], "vanilla_seed0_n256_e1.json is not there")
        assert not out.exists()
        victim.write_text(kept)
        assert (res / "cifar10_quick_budget.png").stat().st_size > 1000 and "| 384 | 1 | pag-cm | 85.0 |" in \
            (res / "cifar10_quick_budget.md").read_text()

    def test_standard_check_attacks_one_checkpoint_both_ways_and_names_it(self, tmp_path):
        """The benches' check that APGD-CE + APGD-T is enough: both it and standard AutoAttack on the same checkpoint
        (trained with the bench's own command when it is gone), the file naming that checkpoint by sha256."""
        c10 = load_bench("cifar10")
        cfg = json.loads(json.dumps({**c10.CONFIG, **c10.QUICK, "standard_check": "vanilla"}))
        bench = c10.NaturalImagesBench(cfg, str(tmp_path / "out"), str(tmp_path / "res"), 1, None, name="cifar10_quick")
        record = bench.standard_check()
        ckpt = tmp_path / "out" / "vanilla_seed0" / "model.pt"
        assert record["checkpoint_sha256"] == files.file_sha256(ckpt) and record["apgd"]["key"] == "vanilla_seed0"
        assert record["result_file"] is None  # no result file of the bench here: the check stands alone
        assert 0 <= record["standard"]["aa_l2"] <= record["standard"]["clean"] == record["apgd"]["clean"]
        assert json.loads((tmp_path / "res" / "cifar10_quick_standard_aa.json").read_text()) == json.loads(json.dumps(record))
        made = (tmp_path / "res" / "cifar10_quick_standard_aa.json").stat().st_mtime_ns
        assert bench.standard_check() is None and (tmp_path / "res" / "cifar10_quick_standard_aa.json").stat().st_mtime_ns == made

    def test_quickstart_bench_runs_the_readmes_quick_start(self):
        """bench/quickstart.py's commands are the README's Quick start (after the install and the tests), so its record
        says what the README's commands take."""
        qs = load_bench("quickstart")
        readme = open(os.path.join(ROOT, "README.md")).read()
        block = readme[readme.index("## Quick start"):].split("\n## ")[0]
        lines = [" ".join(line.split("#")[0].split()) for line in block.splitlines() if line.startswith("    python ")]
        assert lines[0] == "python -m pytest -q test_all.py"
        assert lines[1:] == [" ".join(c.split()) for c in qs.COMMANDS]
        # Its table of what to expect is the committed record's.
        rec = json.load(open(os.path.join(ROOT, "bench", "results", "quickstart.json")))
        rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip().strip("|").split("|")]
                                      for line in block.splitlines() if line.startswith("| ")) if len(c) == 3}
        pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
        assert rows["toy: exact robust accuracy at ε = 15"] == [pct(rec["toy_exact_at_15"][m]) for m in ("vanilla", "pag")]
        assert rows["Fashion-MNIST: clean accuracy, 200 test images"] == [pct(rec[m]["clean"]) for m in ("fm_vanilla", "fm_pag")]
        assert rows["Fashion-MNIST: AutoAttack L2 ε = 1.5"] == [pct(rec[m]["aa_l2_1.5"]) for m in ("fm_vanilla", "fm_pag")]
        assert rec["fm_vanilla"]["eval_samples"] == rec["fm_pag"]["eval_samples"] == 200

    def test_results_page_quotes_the_committed_files(self):
        """docs/results.md: each verdict is the one the committed files hold, and every interval in its tables is one
        they hold (a comparison, a paired clean difference, a correlation, the toy's spread): a number typed by hand,
        or left behind by a rerun, fails here. Its sentences are free to change."""
        res = os.path.join(ROOT, "bench", "results")
        seeds = json.load(open(os.path.join(res, "fashion_mnist_seeds.json")))
        per = json.load(open(os.path.join(res, "fashion_mnist_per_source.json")))
        toy = json.load(open(os.path.join(res, "toy_seeds", "seeds.json")))
        stats = load_bench("stats")
        pts = lambda c: f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"  # noqa: E731
        known = {pts(c) for k in ("1", "2", "4") for c in seeds["claims"][k]["comparisons"]}
        rows = seeds["rows"]
        known |= {pts(stats.paired(rows[a]["clean"]["per_seed"], rows[b]["clean"]["per_seed"], "")) for a in rows for b in rows if a != b}
        known |= {pts(c) for claim in per["claim_2"].values() for c in claim["comparisons"] + claim["clean"]}
        known |= {f"r {c['difference']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" for c in seeds["claims"]["3"]["comparisons"]}
        known |= {f"{100 * st['median']:.1f} [{100 * st['min']:.1f}, {100 * st['max']:.1f}]"
                  for st in (toy[m]["exact_robust_acc"]["15"] for m in ("vanilla", "pag"))}
        page = open(os.path.join(ROOT, "docs", "results.md")).read().replace("−", "-")
        sections = {part.split("\n", 1)[0]: part for part in page.split("\n## ")}
        cifar_page = next(part for title, part in sections.items() if title.startswith("CIFAR-10 images"))
        page = page.replace(cifar_page, "")  # CIFAR-10's numbers are checked against its own files, below
        regex = r"(?:r )?[+-]?\d+\.\d+ \[[+-]?\d+\.\d+, [+-]?\d+\.\d+\]"
        for text, known, bench_seeds, verdicts, least in (
                (page, known, seeds, {"1.": seeds["claims"]["1"]["verdict"], "2. SBG": seeds["claims"]["2"]["verdict"],
                                      "2. same": per["claim_2"]["own"]["verdict"], "3.": seeds["claims"]["3"]["verdict"],
                                      "4.": seeds["claims"]["4"]["verdict"]}, 15),
                (cifar_page, None, json.load(open(os.path.join(res, "cifar10_jpeg_seeds.json"))), None, 8)):
            if known is None:  # CIFAR-10: its comparisons, paired clean differences and correlations
                claims, rows = bench_seeds["claims"], bench_seeds["rows"]
                known = {pts(c) for k in ("1", "2") for c in claims[k]["comparisons"]}
                known |= {pts(stats.paired(rows[a]["clean"]["per_seed"], rows[b]["clean"]["per_seed"], ""))
                          for a in rows for b in rows if a != b}
                known |= {f"r {c['difference']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" for c in claims["3"]["comparisons"]}
                verdicts = {f"{k}.": claims[k]["verdict"] for k in ("1", "2", "3")}
            table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
            found = [m for line in table for m in re.findall(regex, line)]
            assert len(found) >= least and [m for m in found if m not in known] == []
            for start, verdict in verdicts.items():
                line = next(line for line in table if line.startswith(f"| {start}"))
                assert line.split("|")[2].strip().startswith(f"**{verdict}**"), (start, verdict)

    def test_readme_summary_rows_are_the_benches_files(self):
        """The README's one row per claims bench: PAG-CM − vanilla at L2 and the four verdicts, from its seeds file."""
        readme = open(os.path.join(ROOT, "README.md")).read().replace("−", "-")
        for start, name in (("| Fashion-MNIST, small CNN", "fashion_mnist"), ("| CIFAR-10 (JPEG copy), small CNN", "cifar10_jpeg")):
            seeds = json.load(open(os.path.join(ROOT, "bench", "results", f"{name}_seeds.json")))
            c, = [c for c in seeds["claims"]["1"]["comparisons"] if c["comparison"].startswith("pag-cm - vanilla, aa_l2")]
            cells = [x.strip() for x in next(line for line in readme.splitlines() if line.startswith(start)).strip("|").split("|")]
            assert cells[1:] == [f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]",
                                 " / ".join(seeds["claims"][k]["verdict"] for k in "1234")], name

    def test_per_source_claim_2_committed_is_the_benchs_and_the_readme_says_it(self, tmp_path):
        """fashion_mnist_per_source.json/.md are what the bench computes from the committed result files (assembled
        again here, into a copy); their common-lambda claim 2 is the claims bench's own claim 2 (same files, same
        pairs); and bench/README.md's claim-2 table quotes every comparison at both lambdas as computed."""
        ps = load_bench("lambda_per_source")
        results = os.path.join(ROOT, "bench", "results")
        shutil.copytree(os.path.join(results, "fashion_mnist_runs"), tmp_path / "fashion_mnist_runs")
        bench = ps.PerSourceBench(json.loads(json.dumps(ps.fm.CONFIG)), str(tmp_path / "runs"), str(tmp_path), 1)
        out = bench.assemble(0.0)
        committed = json.loads(open(os.path.join(results, "fashion_mnist_per_source.json")).read())
        for d in (out, committed):
            d["config"].pop("wall_minutes_this_call")
            assert len(d["config"].pop("assembled_at_commit")) == 40
        assert committed == json.loads(json.dumps(out))
        md = open(os.path.join(results, "fashion_mnist_per_source.md")).read()
        assert md == (tmp_path / "fashion_mnist_per_source.md").read_text()
        own, unswept = committed["claim_2"]["own"], committed["claim_2"]["own_unswept_seeds"]
        assert unswept["seeds"] == [3, 4, 5, 6, 7] and committed["seeds"] == [0, 1, 2, 3, 4, 5, 6, 7]
        assert [c["per_seed"] for c in unswept["comparisons"]] == [c["per_seed"][3:] for c in own["comparisons"]]
        claims = json.loads(open(os.path.join(results, "fashion_mnist_seeds.json")).read())["claims"]["2"]
        assert [(c["per_seed"], c["verdict"]) for c in committed["claim_2"]["common"]["comparisons"]] == \
            [(c["per_seed"], c["verdict"]) for c in claims["comparisons"]]
        interval = lambda c: f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"  # noqa: E731
        bench_readme = open(os.path.join(ROOT, "bench", "README.md")).read()
        quoted = {}
        for line in bench_readme.splitlines():
            cells = [c.strip().replace("−", "-").replace("*", "") for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0].startswith("PAG-SBG - "):
                quoted[cells[0]] = cells[1:]
        name = {"aa_l2": "L2", "aa_linf": "L∞"}
        expected = {}
        for own, common in zip(*(committed["claim_2"][how]["comparisons"] for how in ("own", "common"))):
            a_b, metric = own["comparison"].rsplit(", ", 1)
            other = a_b.split(" - ")[1].split(" (")[0]
            expected[f"PAG-SBG - {other.upper()}, {name[metric]}"] = [f"{interval(c)} {c['verdict']}" for c in (own, common)]
        assert quoted == expected and len(expected) == 6
        verdicts = {how: committed["claim_2"][how]["verdict"] for how in ("own", "common")}
        assert f"claim 2 at the sources' own λs: **{verdicts['own']}**, and at the common λ: **{verdicts['common']}**" \
            in bench_readme

    def test_bench_readme_tables_are_the_committed_files(self):
        """bench/README.md's tables outside its CIFAR-10 section (the claims bench's rows, its λ sweep and claims, the
        toy's ten draws, the SBG sweep) quote the committed files: each cell recomputed here from them. Its sentences are free to change."""
        res = os.path.join(ROOT, "bench", "results")
        page = open(os.path.join(ROOT, "bench", "README.md")).read().replace("−", "-")
        head, cifar = page.split("## CIFAR-10 images at CPU scale", 1)
        page = head + "\n## " + cifar.split("\n## ", 1)[1]  # CIFAR-10's section: its own test, below
        table = {}
        for line in page.splitlines():
            if line.startswith("| ") and not line.startswith("|---"):
                cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
                table.setdefault(cells[0], []).append(cells[1:])
        ci = lambda st: f"{100 * st['mean']:.1f} [{100 * st['ci95'][0]:.1f}, {100 * st['ci95'][1]:.1f}]"  # noqa: E731
        seeds = json.load(open(os.path.join(res, "fashion_mnist_seeds.json")))
        for model, r in seeds["rows"].items():
            assert table[model][0] == [ci(r["clean"]), ci(r["aa_l2"]), ci(r["aa_linf"]), f"{r['align_nn']['mean']:.3f}",
                                       f"{r['align_sbg']['mean']:.3f}"], model
        sweep = json.load(open(os.path.join(res, "fashion_mnist_lambda.json")))
        for lam, r in sweep["rows"].items():
            label = f"{lam} (selected)" if float(lam) == seeds["config"]["selected_lambda"] else lam
            assert table[label][0] == [ci(r["val_acc"]), ci(r["clean"]), ci(r["aa_l2"]), ci(r["aa_linf"]),
                                       f"{r['align_sbg']['mean']:.3f}"], lam
        pts = lambda c: f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"  # noqa: E731
        for k, start in (("1", "1. Every"), ("2", "2. SBG"), ("3", "3. Better"), ("4", "4. PAG +")):
            (verdict, weakest), = [r for label, rows in table.items() if label.startswith(start) for r in rows]
            c = seeds["claims"][k]
            assert verdict.startswith(c["verdict"]), k
            quoted = re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", weakest)
            held = {pts(x) for x in c["comparisons"]} if k != "3" else \
                {f"{x['difference']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]" for x in c["comparisons"]}
            assert quoted and set(quoted) <= held, (k, quoted)
        toy = json.load(open(os.path.join(res, "toy_seeds", "seeds.json")))
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        for eps in ("clean", "2", "5", "10", "15", "20", "30"):
            cells = table[eps][0]
            for cell, model in zip(cells, ("vanilla", "pag")):
                st = toy[model]["clean_acc"] if eps == "clean" else toy[model]["exact_robust_acc"][eps]
                assert cell == f"{pct(st['median'])}% [{pct(st['min'])}, {pct(st['max'])}]", (eps, model, cell)
        sbg_sweep = json.load(open(os.path.join(res, "sbg_sweep.json")))
        for r in sbg_sweep["rows"]:
            assert [f"{r[k]:.3f}" for k in ("alpha_bar", "consistency", "cross_image", "cross_class", "gap")] in \
                table[str(r["timestep"])], r["timestep"]
        # Standard AutoAttack against APGD on one checkpoint, and that row's committed result file.
        std = json.load(open(os.path.join(res, "fashion_mnist_standard_aa.json")))
        row = json.load(open(os.path.join(res, "fashion_mnist_runs", std["apgd"]["key"] + ".json")))
        assert std["result_file"] == {k: row[k] for k in ("clean", "aa_l2", "aa_linf")} and len(std["checkpoint_sha256"]) == 64
        for label, numbers in (("APGD-CE + APGD-T", std["apgd"]), ("standard AutoAttack", std["standard"]),
                               ("the committed result file of that row and seed", std["result_file"])):
            assert table[label][0] == [pct(numbers[k]) for k in ("clean", "aa_l2", "aa_linf")], label

    def test_cifar10_tables_are_the_committed_files(self):
        """bench/README.md's CIFAR-10 section quotes the committed files: the rows (mean and interval over seeds, the
        paper's number beside), the λ sweep and its selection, the claims with their quoted comparisons, the standard
        AutoAttack check, the budget curve and one row per result file; each cell recomputed here."""
        res = os.path.join(ROOT, "bench", "results")
        page = open(os.path.join(ROOT, "bench", "README.md")).read().replace("−", "-")
        section = page.split("## CIFAR-10 images at CPU scale", 1)[1].split("\n## ", 1)[0]
        table = {}
        for line in section.splitlines():
            if line.startswith("| ") and not line.startswith("|---"):
                cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
                table.setdefault(cells[0], []).append(cells[1:])
        c10 = load_bench("cifar10")
        seeds = json.load(open(os.path.join(res, "cifar10_jpeg_seeds.json")))
        assert seeds["seeds"] == [0, 1, 2] and seeds["config"]["test_samples"] == 1000 and seeds["config"]["models"] == 24
        ci = lambda st: f"{100 * st['mean']:.1f} [{100 * st['ci95'][0]:.1f}, {100 * st['ci95'][1]:.1f}]"  # noqa: E731
        for model, r in seeds["rows"].items():
            paper = c10.PAPER.get(model)
            assert table[model] == [[ci(r["clean"]), ci(r["aa_l2"]), ci(r["aa_linf"]), f"{r['align_nn']['mean']:.3f}",
                                     f"{r['align_sbg']['mean']:.3f}", "–" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f}"]], model
        sweep = json.load(open(os.path.join(res, "cifar10_jpeg_lambda.json")))
        assert list(sweep["rows"]) == ["0.05", "0.1", "0.15"] and seeds["config"]["selected_lambda"] == 0.1
        for lam, r in sweep["rows"].items():
            label = f"{lam} (selected)" if float(lam) == seeds["config"]["selected_lambda"] else lam
            assert table[label] == [[ci(r["val_acc"]), ci(r["clean"]), ci(r["aa_l2"]), ci(r["aa_linf"]),
                                     f"{r['align_sbg']['mean']:.3f}"]], lam
        pts = lambda c: f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"  # noqa: E731
        for k, start in (("1", "1. Every"), ("2", "2. SBG"), ("3", "3. Better"), ("4", "4. PAG +")):
            (verdict, quoted_cell), = [r for label, rows in table.items() if label.startswith(start) for r in rows]
            c = seeds["claims"][k]
            assert verdict.startswith(c["verdict"]), k
            if k == "4":
                assert c["verdict"] == "not run"
                continue
            quoted = re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", quoted_cell)
            held = {pts(x) for x in c["comparisons"]} if k != "3" else \
                {f"{x['difference']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]" for x in c["comparisons"]}
            assert quoted and set(quoted) <= held, (k, quoted)
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        std = json.load(open(os.path.join(res, "cifar10_jpeg_standard_aa.json")))
        row = json.load(open(os.path.join(res, "cifar10_jpeg_runs", std["apgd"]["key"] + ".json")))
        assert std["apgd"]["key"] == "pag-cm_lambda0.1_seed0" and std["test_samples"] == 1000
        assert std["apgd"] == {"key": std["apgd"]["key"], **{k: row[k] for k in ("clean", "aa_l2", "aa_linf")}}
        for label, numbers in (("APGD-CE + APGD-T (its result file)", std["apgd"]), ("standard AutoAttack", std["standard"])):
            assert table[label][-1] == [pct(numbers[k]) for k in ("clean", "aa_l2", "aa_linf")], label
        budget = json.load(open(os.path.join(res, "cifar10_jpeg_budget.json")))
        assert [(p["train_samples"], p["epochs"]) for p in budget["points"]][::2] == [(5000, 5), (10000, 10), (25000, 20)]
        for p in budget["points"]:
            assert [p["model"], pct(p["clean"]), pct(p["aa_l2"]), pct(p["aa_linf"]), f"{p['align_nn']:.3f}",
                    f"{p['train_seconds'] / 60:.0f}"] in table[f"{p['train_samples'] // 1000}k x {p['epochs']}"], p
            assert len(p["per_epoch"]) == p["epochs"]  # each run's per-epoch curve, from its committed copy
        sbg_sweep = json.load(open(os.path.join(res, "cifar10_jpeg_sbg", "sweep.json")))
        for r in sbg_sweep["rows"]:
            label = f"{r['timestep']} (chosen)" if r["timestep"] == sbg_sweep["best_timestep"] else str(r["timestep"])
            assert table[label] == [[f"{r[k]:.3f}" for k in ("alpha_bar", "consistency", "cross_image", "cross_class", "gap")]]
        # One row per committed result file, every row a file.
        runs = os.path.join(res, "cifar10_jpeg_runs")
        keys = {n[:-len(".json")] for n in os.listdir(runs) if n.endswith(".json")}
        assert len(keys) == 24 and keys == {label for label in table if "_seed" in label}
        for key in keys:
            r = json.load(open(os.path.join(runs, key + ".json")))
            assert table[key] == [[*(pct(r[k]) for k in ("val_acc", "clean", "aa_l2", "aa_linf")), f"{r['align_nn']:.3f}",
                                   f"{r['align_sbg']:.3f}", f"{r['train_seconds'] / 60:.0f}"]], key

    def test_cifar10_bench_assembles_again_from_its_committed_files(self, tmp_path):
        """`bench/cifar10.py --collect --budget` on a copy of the committed files (no image, no run folder): the same
        tables, claims and budget curve as committed, nothing trained."""
        c10 = load_bench("cifar10")
        res = os.path.join(ROOT, "bench", "results")
        for name in os.listdir(res):
            if name.startswith("cifar10_jpeg_") and not name.endswith(".png"):
                (shutil.copytree if os.path.isdir(os.path.join(res, name)) else shutil.copy)(os.path.join(res, name), tmp_path / name)
        out = tmp_path / "runs"
        c10.main(["--collect", "--budget", "--results-dir", str(tmp_path), "--out-dir", str(out)])  # reads no image
        assert not out.exists()
        for name in ("cifar10_jpeg_seeds.json", "cifar10_jpeg_lambda.json", "cifar10_jpeg_budget.json"):
            again, committed = (json.load(open(os.path.join(d, name))) for d in (tmp_path, res))
            for d in (again, committed):
                d["config"].pop("wall_minutes_this_call", None)
            assert again == committed, name
        for name in ("cifar10_jpeg_seeds.md", "cifar10_jpeg_budget.md"):
            assert (tmp_path / name).read_text() == open(os.path.join(res, name)).read(), name
        assert all((tmp_path / f"cifar10_jpeg_{f}.png").stat().st_size > 10000 for f in ("tradeoff", "alignment", "budget"))

    def test_claims_bench_quick_subset_lands_in_its_files_and_resumes(self, tmp_path):
        fm = load_bench("fashion_mnist")
        argv = ["--quick", "--rows", "pag-sbg", "--train-samples", "128", "--val-samples", "32", "--eval-samples", "16",
                "--out-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]
        out = fm.main(argv)
        res = tmp_path / "res"
        seeds = json.loads((res / "fashion_mnist_seeds.json").read_text())
        assert seeds["config"]["selection_split"] == "val" and "10 points" in seeds["config"]["selection_rule"]
        assert seeds["seeds"] == [0, 1] and set(seeds["rows"]) == {"vanilla", "pag-cm", "pag-sbg"}
        assert seeds["config"]["selected_lambda"] in (0.1, 1.0)
        runs = {p.name: json.loads(p.read_text()) for p in (res / "fashion_mnist_runs").iterdir()}
        assert len(runs) == 2 * (1 + 2 + 1)  # vanilla, the sweep's two lambdas, pag-sbg; two seeds each
        # Times are summed once per model (pag-cm is both a row and a sweep point).
        assert seeds["config"]["models"] == len(runs)
        assert seeds["config"]["train_minutes_sum"] == pytest.approx(sum(r["train_seconds"] for r in runs.values()) / 60, abs=0.051)
        # Every result names, by content, the SBG test fields it was aligned with; PAG-SBG also the fields it trained on.
        test_fields = files.file_sha256(tmp_path / "runs" / "sbg" / "fields_test.pt")
        assert all(r["sbg_fields"]["test"]["sha256"] == test_fields for r in runs.values())
        trained = {r["sbg_fields"]["train"]["denoiser_sha256"] for r in runs.values() if r["model"] == "pag-sbg"}
        assert trained == {files.file_sha256(res / "fashion_mnist_sbg" / "denoiser.pt")}
        assert all("train" not in r["sbg_fields"] for r in runs.values() if r["model"] != "pag-sbg")
        for model in ("vanilla", "pag-sbg"):
            for metric in fm.METRICS:
                entry = seeds["rows"][model][metric]
                values = [r[metric] for r in sorted(runs.values(), key=lambda r: r["seed"]) if r["model"] == model]
                assert entry["per_seed"] == values and entry["mean"] == pytest.approx(sum(values) / 2)
                assert all(-1 <= v <= 1 for v in values) and len(entry["ci95"]) == 2
        verdicts = {k: v["verdict"] for k, v in seeds["claims"].items()}
        assert verdicts["1"] == verdicts["2"] == verdicts["4"] == "not run"  # rows pag-nn, pag-oi, pgd-at... not asked for
        # Claim 3 without pag-sbg leaves 2 points a seed here (pag-cm at two lambdas): no r, so "not run".
        c3 = seeds["claims"]["3"]
        assert verdicts["3"] == "not run" and [c["points"] for c in c3["comparisons"]] == [4, 6]
        assert c3["comparisons"][0]["difference"] is None and c3["with_own_rows"]["align_sbg"]["points"] == 6
        assert set(json.loads((res / "fashion_mnist_lambda.json").read_text())["rows"]) == {"0.1", "1"}
        assert all((res / f).stat().st_size > 0 for f in ("fashion_mnist_seeds.md", "fashion_mnist_tradeoff.png",
                                                        "fashion_mnist_alignment.png"))
        assert out["rows"] == seeds["rows"]
        # Killed after some models: their result files are kept; a rerun trains only what is missing.
        victim = res / "fashion_mnist_runs" / "pag-sbg_lambda{:g}_seed1.json".format(seeds["config"]["selected_lambda"])
        victim.unlink()
        for p in (tmp_path / "runs").glob("pag-sbg_*seed1"):  # its checkpoint too, as on a fresh machine
            shutil.rmtree(p)
        again = fm.main(argv)
        after = {p.name: json.loads(p.read_text()) for p in (res / "fashion_mnist_runs").iterdir()}
        assert {k: v["made"] for k, v in after.items() if k != victim.name} == {k: v["made"] for k, v in runs.items() if k != victim.name}
        assert after[victim.name] == {**runs[victim.name], "made": after[victim.name]["made"], "seconds": after[victim.name]["seconds"],
                                      "train_seconds": after[victim.name]["train_seconds"]}  # the same model again
        assert again["rows"] == out["rows"]
        # The denoiser is kept with the results (a fresh machine exports the same fields from it); an earlier
        # bench's file without its SBG alignment is completed, from the checkpoint where it is still there.
        assert (res / "fashion_mnist_sbg" / "denoiser.pt").is_file()
        shutil.rmtree(tmp_path / "runs" / "sbg")
        partial = res / "fashion_mnist_runs" / "vanilla_seed0.json"
        partial.write_text(json.dumps({**after["vanilla_seed0.json"], "align_sbg": None}))
        # ... its numbers are the checkpoint's epoch's, whatever else metrics.jsonl holds (a kill between the
        # metrics line and the checkpoint leaves a line ahead of it), and its training time is the run's own.
        metrics = tmp_path / "runs" / "vanilla_seed0" / "metrics.jsonl"
        line = json.loads(metrics.read_text().splitlines()[-1])
        metrics.write_text(metrics.read_text() + json.dumps({**line, "epoch": 2, "val_acc": 0.0, "seconds": 1e6}) + "\n")
        fm.main(argv)
        done, before = json.loads(partial.read_text()), after["vanilla_seed0.json"]
        assert done["align_sbg"] == pytest.approx(before["align_sbg"], abs=1e-6)
        assert done["clean"] == before["clean"] and done["made"] != before["made"]
        assert done["val_acc"] == line["val_acc"] == before["val_acc"] and done["train_seconds"] == pytest.approx(line["seconds"], abs=0.1)
        assert_cli_error(fm.main, [*argv, "--epochs", "2"], "made with other settings")
        # A run folder or fields made with other settings are refused, not reused under this run's name.
        partial.unlink()
        run_settings = tmp_path / "runs" / "vanilla_seed0" / "bench_settings.json"
        run_settings.write_text(json.dumps({**json.loads(run_settings.read_text()), "train": "other"}))
        assert_cli_error(fm.main, argv, "vanilla_seed0 was made with other settings")
        run_settings.unlink()
        assert_cli_error(fm.main, argv, "or by an older bench")  # a checkpoint without its settings
        shutil.rmtree(tmp_path / "runs" / "vanilla_seed0")
        fields_settings = tmp_path / "runs" / "sbg" / "settings.json"
        fields_settings.write_text(json.dumps({**json.loads(fields_settings.read_text()), "denoiser_sha256": "0" * 64}))
        assert_cli_error(fm.main, argv, "another denoiser")

    def test_paper_table_compares_like_with_like(self, tmp_path):
        """Each row at the lambda its paper number was made at (OI, CM, NN, whose lambda the paper does not state, at
        1.5 and at 2.0 beside the same number), on the full test set, with a Wilson interval over the images attacked,
        no verdict from it (one seed moves a row by more: measured), and the SBG fields named."""
        pt = load_bench("paper_table")
        assert pt.CONFIG["test_samples"] == 10000
        assert pt.PAPER_TABLE_1["cifar10"]["pag-sbg"]["paper_lambda"] == 2.0 and pt.ROWS["pag-sbg"][2] == 2.0
        assert pt.ROWS["pag-sbg-lambda1.5"][2] == 1.5 and pt.PAPER_TABLE_1["cifar10"]["pag-sbg-lambda1.5"]["aa_l2"] is None
        for src in ("oi", "cm", "nn"):  # both lambdas, the same paper number, which states no lambda
            assert pt.ROWS[f"pag-{src}"][2] == 1.5 and pt.ROWS[f"pag-{src}-lambda2"][2] == 2.0
            assert pt.PAPER_TABLE_1["cifar10"][f"pag-{src}-lambda2"] == pt.PAPER_TABLE_1["cifar10"][f"pag-{src}"]
            assert pt.PAPER_TABLE_1["cifar10"][f"pag-{src}"]["paper_lambda"] is None
        for row, (_, _, lam, _) in pt.ROWS.items():  # every PAG row trains at its lambda, written into its command
            flags = pt.row_flags(row, False)
            assert (flags[flags.index("--pag-coeff") + 1] == lam) if lam is not None else "--pag-coeff" not in flags
        # Why no row is judged by its interval: the seed spread the table states is the claims bench's.
        per_seed = json.load(open(os.path.join(ROOT, "bench", "results", "fashion_mnist_seeds.json")))["rows"]["pag-cm"]["aa_l2"]["per_seed"]
        assert len(per_seed) == 8 and f"spans {100 * min(per_seed):.1f}-{100 * max(per_seed):.1f}%" in pt.SEED_SPREAD
        # The Wilson interval against values computed by hand (and its edges).
        assert pt.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
        assert pt.wilson_interval(0, 16) == pytest.approx([0.0, 0.1936], abs=1e-4) and pt.wilson_interval(16, 16)[1] == 1.0
        cfg = json.loads(json.dumps({**pt.CONFIG, "quick": False, "sbg_file": None, "dataset": "cifar10"}))
        bench = pt.PaperTable(cfg, str(tmp_path), 1, ["vanilla", "pag-sbg", "pag-sbg-vit"], {})
        fields = {"made_by": "the official release", "sha256": "ab" * 32}
        files.write_json(bench_result("pag-sbg", 0.8, 0.55, 0.2, **{"lambda": 2.0, "sbg_fields": fields}),
                         bench.result_path(bench.key("pag-sbg", 3407)))
        files.write_json(bench_result("pag-sbg-vit", 0.7, 0.4, 0.1, n=1000, **{"lambda": 3.0, "eval_samples": 512}),
                         bench.result_path(bench.key("pag-sbg-vit", 3407)))  # 1,000 asked for, 512 attacked
        table = bench.table(0.0)
        r = table["rows"]["pag-sbg"]
        assert r["lambda"] == 2.0 and r["paper_lambda"] == 2.0 and r["eval_samples"] == 10000 and r["sbg_fields"] == fields
        assert r["ci95"]["aa_l2"] == pytest.approx(pt.wilson_interval(5500, 10000)) and not any("in_ci95" in k for k in r)
        vit = table["rows"]["pag-sbg-vit"]
        assert vit["eval_samples"] == 512 and vit["ci95"]["aa_l2"] == pytest.approx(pt.wilson_interval(round(0.4 * 512), 512))
        md = (tmp_path / "paper_table_cifar10.md").read_text()
        assert "| pag-sbg | trained | 2 | 2 | 80.00 [79.20, 80.77] | 55.00 [54.02, 55.97] | 55.39 | 20.00 [19.23, 20.80] | " \
               "23.97 |" in md and pt.SEED_SPREAD in md and "512 / 10000 test images attacked" in md
        assert "SBG fields of pag-sbg: the official release" in md and "Not finished yet: vanilla" in md
        # A result of an SBG row names the content of the fields it was trained on, not their path.
        (tmp_path / "f.pt").write_bytes(b"fields one")
        with_file = lambda: pt.PaperTable({**cfg, "sbg_file": str(tmp_path / "f.pt")}, str(tmp_path), 1, ["pag-sbg"], {})  # noqa: E731
        first = with_file().settings("pag-sbg", 3407, None)
        assert first["sbg_file_sha256"] == hashlib.sha256(b"fields one").hexdigest() and first == with_file().settings("pag-sbg", 3407, None)
        (tmp_path / "f.pt").write_bytes(b"fields two")
        assert with_file().settings("pag-sbg", 3407, None) != first and "sbg_file_sha256" not in with_file().settings("vanilla", 3407, None)
        # Result files read back are checked: a truncated or impossible one is one line naming it, never a table.
        path = bench.result_path(bench.key("pag-sbg", 3407))
        for text, fragment in [('{"key": "pag-sbg_seed3407", "clean": 0.8', "not a valid"),
                               (json.dumps(bench_result("pag-sbg", 0.5, 0.6, 0.1)), "above its clean"),
                               (json.dumps(bench_result("pag-sbg", 1.5, 0.6, 0.1)), "'clean'"),
                               (json.dumps({k: v for k, v in bench_result("pag-sbg", 0.8, 0.6, 0.1).items() if k != "aa_linf"}),
                                "'aa_linf'")]:
            with open(path, "w") as f:
                f.write(text)
            assert_cli_error(lambda argv: bench.table(0.0), [], os.path.basename(path), fragment)

    def test_paper_table_dry_run_prints_every_rows_commands_and_writes_nothing(self, tmp_path, capsys):
        pt = load_bench("paper_table")
        out = tmp_path / "out"
        pt.main(["--dry", "--sbg-file", "fields.pt", "--out-dir", str(out)])  # an abbreviation is never copied into a job
        text = capsys.readouterr().out
        assert not out.exists() and "--dry " not in text
        for row, (script, _, lam, _) in pt.ROWS.items():
            fields = " --sbg-file fields.pt" if "sbg" in row else ""
            assert f"python bench/paper_table.py --dataset cifar10{fields} --out-dir {out} --rows {row}\n" in text
            block = text.split(f"# {row}:")[1].split("\n# ")[0]
            train = next(line for line in block.splitlines() if f"python {script}" in line)
            assert (f"--pag-coeff {lam}" in train) if lam is not None else "--pag-coeff" not in train
            assert "--eval-samples 10000" in next(line for line in block.splitlines() if "attack.py" in line)
        assert "# pag-sbg: lambda 2; paper AA L2 55.39 / L-inf 23.97 at lambda 2" in text
        assert "# pag-cm-lambda2: lambda 2; paper AA L2 47.25 / L-inf 11.24 (the paper states no lambda" in text
        # Every dataset's rows train at its weight lambda x C (CIFAR-10's for up to 10 classes): CIFAR-100 at 0.15, not 1.5.
        for dataset, classes in (("cifar10", 10), ("cifar100", 100), ("stl10", 10)):
            pt.main(["--dry-run", "--dataset", dataset, "--sbg-file", "fields.pt", "--out-dir", str(out)])
            text = capsys.readouterr().out
            for row, (script, _, lam, _) in pt.ROWS.items():
                train = next(line for line in text.split(f"# {row}:")[1].splitlines() if f"python {script}" in line)
                if lam is None:
                    continue
                got = float(train.split("--pag-coeff ")[1].split()[0])
                assert got * classes == pytest.approx(lam * 10) and f"--dataset {dataset}" in train, (dataset, row)
        assert not out.exists()
        # A dry run shows only jobs that can run: the SBG rows without fields are refused, as in a real run.
        assert_cli_error(pt.main, ["--dry-run", "--out-dir", out], "--sbg-file")
        pt.main(["--dry-run", "--rows", "vanilla", "pag-cm", "--out-dir", str(out)])
        assert "pag-sbg" not in capsys.readouterr().out

    def test_released_files_must_fit_their_row_and_are_results_of_their_content(self, tmp_path):
        pt = load_bench("paper_table")
        torch.save(random_official_state("vit", 3), tmp_path / "vit.pt")
        torch.save(random_official_state("resnet18", 4), tmp_path / "rn.pt")
        for argv, fragment in [([f"pag-oi={tmp_path / 'vit.pt'}"], "holds a vit"),
                               ([f"pag-sbg-vit={tmp_path / 'rn.pt'}"], "holds a resnet18"),
                               ([f"pag-oi={tmp_path / 'missing.pt'}"], "does not exist")]:
            assert_cli_error(pt.main, ["--official", *argv, "--out-dir", tmp_path / "o"], fragment)
        sd = random_official_state("resnet18", 5)
        sd["linear.weight"], sd["linear.bias"] = sd["linear.weight"][:5], sd["linear.bias"][:5]
        torch.save(sd, tmp_path / "five.pt")
        assert_cli_error(pt.main, ["--official", f"pag-cm={tmp_path / 'five.pt'}", "--out-dir", tmp_path / "o"], "5 classes")
        grey = random_official_state("resnet18", 5)
        grey["conv1.weight"] = grey["conv1.weight"][:, :1].contiguous()  # the release's format, 1-channel images
        torch.save(grey, tmp_path / "grey.pt")
        assert_cli_error(pt.main, ["--official", f"pag-cm={tmp_path / 'grey.pt'}", "--out-dir", tmp_path / "o"], "1-channel")
        assert_cli_error(attack.main, ["--checkpoint", tmp_path / "grey.pt", "--out", tmp_path / "g.json"], "1-channel")
        # --rows picks among the released files; a row without a file is refused.
        assert_cli_error(pt.main, ["--official", f"pag-cm={tmp_path / 'rn.pt'}", "--rows", "pag-oi", "--out-dir", tmp_path / "o"],
                         "pag-oi", "no released file")
        # Keyed by content: another file under the same path is evaluated again.
        argv = ["--quick", "--official", f"pag-cm={tmp_path / 'rn.pt'}", "--out-dir", str(tmp_path / "o")]
        first = pt.main(argv)["rows"]["pag-cm"]
        result = tmp_path / "o" / "paper_table_synthetic_official_runs" / "pag-cm_official.json"
        made = result.stat().st_mtime_ns
        assert pt.main(argv)["rows"]["pag-cm"] == first and result.stat().st_mtime_ns == made  # the same file: reused
        two = ["--quick", "--official", f"pag-cm={tmp_path / 'rn.pt'}", f"pag-sbg-vit={tmp_path / 'vit.pt'}", "--rows", "pag-cm",
               "--out-dir", str(tmp_path / "o")]
        assert set(pt.main(two)["rows"]) == {"pag-cm"}  # --rows honoured with released files: the ViT is not attacked
        assert not (tmp_path / "o" / "paper_table_synthetic_official_runs" / "pag-sbg-vit_official.json").exists()
        torch.save(random_official_state("resnet18", 6), tmp_path / "rn.pt")
        pt.main(argv)
        assert json.loads(result.read_text())["settings"]["official_sha256"] == files.file_sha256(tmp_path / "rn.pt")

    def test_paper_table_quick_trains_attacks_tabulates_and_resumes(self, tmp_path):
        pt = load_bench("paper_table")
        argv = ["--quick", "--rows", "vanilla", "pag-sbg", "pag-sbg-vit", "--out-dir", str(tmp_path)]
        out = pt.main(argv)
        assert set(out["rows"]) == {"vanilla", "pag-sbg", "pag-sbg-vit"}
        for row, r in out["rows"].items():
            assert 0 <= r["aa_l2"] <= r["clean"] <= 1 and 0 <= r["aa_linf"] <= r["clean"] and r["weights"] == "trained"
            assert r["paper_aa_l2"] is None  # synthetic data: the paper has no numbers for it
        assert "--arch vit" in out["rows"]["pag-sbg-vit"]["command"] and "--arch cnn" in out["rows"]["vanilla"]["command"]
        fields = out["rows"]["pag-sbg"]["sbg_fields"]  # the runner's own denoiser made them: named by its content
        assert fields["made_by"] == "sbg.py export" and fields["timestep"] == 300 and \
            fields["denoiser_sha256"] == files.file_sha256(tmp_path / "paper_table_synthetic_sbg" / "denoiser.pt")
        assert "--pag-coeff 2.0" in out["rows"]["pag-sbg"]["command"] and out["rows"]["pag-sbg"]["lambda"] == 2.0
        saved = json.loads((tmp_path / "paper_table_synthetic.json").read_text())
        assert saved["rows"] == out["rows"] and "not the standard attack" in saved["config"]["attack"]
        runs = tmp_path / "paper_table_synthetic_runs"
        made = {p.name: json.loads(p.read_text())["made"] for p in runs.iterdir()}
        (runs / "pag-sbg_seed3407.json").unlink()  # killed before this row finished: only it runs again
        again = pt.main(argv)
        after = {p.name: json.loads(p.read_text())["made"] for p in runs.iterdir()}
        assert {k: v for k, v in after.items() if k != "pag-sbg_seed3407.json"} == \
            {k: v for k, v in made.items() if k != "pag-sbg_seed3407.json"} and again["rows"].keys() == out["rows"].keys()
        assert_cli_error(pt.main, ["--rows", "pag-sbg", "--out-dir", tmp_path / "x"], "--sbg-file")
        assert_cli_error(pt.main, ["--quick", "--dataset", "cifar100", "--out-dir", tmp_path / "x"], "--quick runs on synthetic")
        # --collect assembles what is there and never trains: a row whose result is gone stays missing.
        (runs / "vanilla_seed3407.json").unlink()
        ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "paper_table_synthetic").rglob("model.pt")}
        collected = pt.main([*argv, "--collect"])
        assert set(collected["rows"]) == {"pag-sbg", "pag-sbg-vit"} and not (runs / "vanilla_seed3407.json").exists()
        assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
        assert "Not finished yet: vanilla" in (tmp_path / "paper_table_synthetic.md").read_text()
        table = (tmp_path / "paper_table_synthetic.json").read_bytes()
        pt.main(["--quick", "--rows", "pag-sbg", "--collect", "--out-dir", str(tmp_path)])  # one row beside the table
        assert (tmp_path / "paper_table_synthetic.json").read_bytes() == table  # printed, the fuller table kept
        # The released files, evaluated as they are: names as in the release, or ROW=PATH.
        (tmp_path / "release").mkdir()
        torch.save({"module." + k: v for k, v in random_official_state("resnet18", 2).items()}, tmp_path / "release" / "rn18-c10-CM.pt")
        torch.save(random_official_state("vit", 3), tmp_path / "vit.pt")
        off = pt.main(["--quick", "--official-checkpoints", str(tmp_path / "release"), "--official", f"pag-sbg-vit={tmp_path / 'vit.pt'}",
                       "--out-dir", str(tmp_path / "off")])
        assert set(off["rows"]) == {"pag-cm", "pag-sbg-vit"} and all(r["weights"] == "official" for r in off["rows"].values())

    def test_speed_bench_writes_the_rows_the_gpu_section_needs(self, tmp_path, monkeypatch):
        """bench/pag_speed.py is run by hand on a GPU: its paths (batch-norm with chunks under bf16, as STL
        runs; ViT) must work before a GPU session spends its time on them. CPU-sized settings here."""
        bench = load_bench("pag_speed")
        monkeypatch.setattr(bench, "CPU_SETTINGS", [("resnet18", 16, 4, 3, "bf16", 2), ("vit", 16, 2, 2, "fp32", None)])
        out = tmp_path / "speed.json"
        bench.main(["--repeats", "1", "--warmup", "1", "--out", str(out)])
        result = json.loads(out.read_text())
        assert result["config"]["torch"] == torch.__version__ and "gpu" in result["config"]
        resnet, vit = result["rows"]
        for row in (resnet, vit):
            assert SPEED_ROW_KEYS <= row.keys()
            assert all(row[f"{kind}_seconds"] > 0 for kind in ("ce", "pag", "naive"))
            assert row["pag_over_naive"] == pytest.approx(row["pag_seconds"] / row["naive_seconds"])
            assert 0 < row["pag_peak_gib"] < 1 and 0 < row["naive_peak_gib"] < 1  # the CPU's profiler count
        assert (resnet["arch"], resnet["amp"], resnet["pag_chunk"], resnet["formulation"]) == ("resnet18", "bf16", 2, "replicated")
        assert (vit["pag_chunk"], vit["formulation"]) == (None, "per-column")  # no batch-norm, on a CPU
        # --memory: the paper's settings on the CPU, gradients taken as on a GPU (replicated), peak memory only.
        monkeypatch.setattr(bench, "MEMORY_SETTINGS", [("vit", 16, 2, 2, "fp32", None)])
        monkeypatch.setattr(bench, "return_freed_memory_to_the_system", lambda: None)  # not for the rest of the tests
        bench.main(["--memory", "--out", str(tmp_path / "memory.json")])
        (row,) = json.loads((tmp_path / "memory.json").read_text())["rows"]
        assert (row["arch"], row["formulation"]) == ("vit", "replicated") and 0 < row["pag_peak_gib"] < 1
        # The GPU's STL row is `train_pag.py --dataset stl` as its defaults resolve.
        stl = T.resolve_settings(train_pag.add_pag_args(T.add_common_args(cli.Parser())).parse_args(["--dataset", "stl"]),
                                 blank_images("stl10", 96), train_pag.PAG)
        stl_rows = [s for s in bench.GPU_SETTINGS if s[1] == 96]
        assert {s[4] for s in stl_rows} == {"fp32", "bf16"}
        for arch, size, batch, k, amp, chunk in stl_rows:
            assert (arch, batch, k, chunk) == (stl.arch, stl.batch_size, 10, stl.pag_chunk)
        assert {(s[0], s[4]) for s in bench.GPU_SETTINGS if s[1] == 32} == {(a, m) for a in ("resnet18", "vit") for m in ("fp32", "bf16")}

    @pytest.mark.smoke
    def test_gpu_bench_runs_every_part_with_the_committed_fashion_run(self, tmp_path, monkeypatch):
        """bench/gpu.py is run once on a GPU a session may never get again: --quick runs each part's code on the CPU.
        The memory rows are train_pag.py's defaults (STL's 4 targets per pass), a row's projection is 100 epochs of
        50,000 images, and the Fashion-MNIST run is the committed result's own command, its numbers beside it."""
        gpu = load_bench("gpu")
        raw = tmp_path / "fm" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        gen = np.random.default_rng(0)
        for prefix, n in (("train", 120), ("t10k", 40)):
            for kind, array in (("images-idx3", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                                ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
                (raw / f"{prefix}-{kind}-ubyte").write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(
                    d.to_bytes(4, "big") for d in array.shape) + array.tobytes())
        out = tmp_path / "out"
        result = gpu.main(["--quick", "--out-dir", str(out), "--data-dir", str(tmp_path / "fm")])
        assert json.loads((out / "gpu.json").read_text()) == result and set(result["seconds"]) == set(gpu.PARTS)
        assert [r["setting"] for r in result["memory"]] == [m[0] for m in gpu.MEMORY_SETTINGS]
        for row in result["memory"]:
            assert (row["settings"]["batch_size"], row["settings"]["targets_per_image"]) == (4, 2)
            assert len(row["tries"]) == 1 and row["tries"][0]["peak_gib"] is None and row["fits_v100_16gib"] is None
        stl = result["memory"][-1]
        assert stl["settings"]["pag_chunk"] == train_pag.PAG_DATASET_DEFAULTS["stl10"]["pag_chunk"] == 4
        speed = json.loads((out / "speed_cpu.json").read_text())
        assert result["speed"]["rows"] == speed["rows"] and [r["arch"] for r in speed["rows"]] == ["cnn"]
        for row in result["epochs"]:
            assert row["images"] == 16 and row["train_seconds"] > 0
            # 100 epochs: the training scaled to 50,000 images, the per-epoch check (1,000 images) as it is
            assert row["projected_hours"] == pytest.approx((100 * 50000 / 16 * row["train_seconds"] + 100 * row["check_seconds"]) / 3600)
        assert [r["row"] for r in result["epochs"]] == ["vanilla", "pag-cm", "pag-cm-vit"]
        committed = json.loads(open(gpu.FASHION_RESULT).read())
        fashion = result["fashion"]
        assert fashion["command"] == committed["settings"]["train"] and fashion["attack"] == committed["settings"]["attack"]
        assert fashion["cpu"] == {k: committed[k] for k in fashion["cpu"]}
        remade = json.loads(open(gpu.FASHION_REMADE).read())
        assert fashion["cpu_remade"] == {"commit": remade["commit"], **{k: remade["apgd"][k] for k in ("clean", "aa_l2", "aa_linf")}}
        here = fashion["here"]
        assert all(0 <= here[m] <= here["clean"] <= 1 for m in ("aa_l2", "aa_linf"))
        metrics = [json.loads(line) for line in (out / "gpu_runs" / "fashion" / "metrics.jsonl").read_text().splitlines()]
        assert here["val_acc"] == metrics[-1]["val_acc"] and len(metrics) == 1  # --quick: 1 epoch of 64 images
        assert here["train_seconds"] == round(metrics[0]["seconds"], 1)  # with its check, as the result files count it
        ckpt = torch.load(out / "gpu_runs" / "fashion" / "model.pt", weights_only=True)
        assert (ckpt["args"]["source"], ckpt["args"]["pag_coeff"], ckpt["args"]["seed"], ckpt["args"]["train_samples"]) == ("cm", 0.25, 0, 64)
        assert result["config"]["commit"] == gpu.git_commit() and result["config"]["v100_gib"] == pytest.approx(15.78, abs=0.01)
        with pytest.raises(UserError, match="needs --out-dir"):
            gpu.main(["--quick"])
        monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
        with pytest.raises(UserError, match="Fashion-MNIST is in neither"):  # checked before any part runs
            gpu.main(["--quick", "--out-dir", str(tmp_path / "o2"), "--data-dir", str(tmp_path / "none"), "--parts", "fashion"])
        assert not (tmp_path / "o2").exists()

    def test_gpu_bench_tries_smaller_chunks_until_a_v100_fits(self, monkeypatch):
        """Where a paper default does not fit 16 GiB with 1 GiB of CUDA context, the chunk goes down from k - 1
        (an out-of-memory try included) until one fits; a fitting default is tried once."""
        gpu = load_bench("gpu")
        peaks = {None: "oom", 5: 16.5, 4: 13.6}  # GiB by --pag-chunk (None: all 10 targets at once)
        calls = []

        def fake_train_on(images, method, flags):
            chunk = int(flags[flags.index("--pag-chunk") + 1]) if "--pag-chunk" in flags else None
            calls.append(chunk)
            if peaks[chunk] == "oom":
                raise torch.cuda.OutOfMemoryError("out of memory")
            return peaks[chunk], peaks[chunk] + 0.5, {"train_seconds": 2.0}
        monkeypatch.setattr(gpu, "train_on", fake_train_on)
        monkeypatch.setattr(gpu, "MEMORY_SETTINGS", [("CIFAR-10 ResNet-18", "cifar10", [])])
        (row,) = gpu.memory_part(quick=False)
        # out of memory at 10: half; 16.5 GiB at 5: aim at 5 * (15.78 - 1 - 0.17) / 16.5 = 4.4 -> 4, which fits
        unloaded = (60000 - 640 - 1000) * 3 * 32 * 32 / 2**30  # CIFAR's images not loaded here: 0.17 GiB
        assert calls == [None, 5, 4] and row["fits_v100_16gib"] is True and row["fitting_chunk"] == 4
        assert [t["peak_gib"] for t in row["tries"]] == ["out of memory", 16.5, 13.6] and row["unloaded_images_gib"] == pytest.approx(unloaded)
        assert row["tries"][-1]["needed_gib"] == pytest.approx(13.6 + unloaded + 1) and row["tries"][-1]["step_seconds"] == 0.2
        peaks[None], calls[:] = 3.0, []
        (row,) = gpu.memory_part(quick=False)
        assert calls == [None] and row["fits_v100_16gib"] is True and row["fitting_chunk"] is None

    def test_gpu_stage_carries_autoattack_code_and_fashion_mnist_only(self, tmp_path, monkeypatch):
        gpu = load_bench("gpu")
        debian = tmp_path / "debian"
        debian.mkdir()
        for name in gpu.FASHION_FILES:
            (debian / name).write_bytes(name.encode())
        monkeypatch.setattr(gpu, "CARRY", str(tmp_path / "carry"))
        monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(debian))
        gpu.main(["--stage"])
        carried = {os.path.relpath(os.path.join(d, f), tmp_path / "carry") for d, _, fs in os.walk(tmp_path / "carry") for f in fs}
        assert {f"data/FashionMNIST/raw/{n}" for n in gpu.FASHION_FILES} <= carried
        code = carried - {f"data/FashionMNIST/raw/{n}" for n in gpu.FASHION_FILES} - {"COMMIT"}
        assert (tmp_path / "carry" / "COMMIT").read_text().split()[0] == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert "pyautoattack/__init__.py" in code and all(f.startswith("pyautoattack/") and f.endswith(".py") for f in code)
        (debian / gpu.FASHION_FILES[0]).unlink()
        with pytest.raises(UserError, match="dataset-fashion-mnist"):
            gpu.main(["--stage"])

    def test_gpu_bench_keeps_the_other_parts_when_one_fails(self, tmp_path, monkeypatch):
        gpu = load_bench("gpu")

        def broken(out_dir, quick):
            raise RuntimeError("CUDA error: an illegal memory access")
        monkeypatch.setattr(gpu, "speed_part", broken)
        monkeypatch.setattr(gpu, "epochs_part", lambda quick: [{"row": "vanilla"}])
        with pytest.raises(UserError, match="speed failed .* --parts speed"):
            gpu.main(["--quick", "--out-dir", str(tmp_path), "--parts", "speed", "epochs"])
        written = json.loads((tmp_path / "gpu.json").read_text())
        assert written["speed"] == {"error": "RuntimeError: CUDA error: an illegal memory access"}
        assert written["epochs"] == [{"row": "vanilla"}] and set(written["seconds"]) == {"speed", "epochs"}
