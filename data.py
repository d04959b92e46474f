"""Datasets, per-sample augmentation, and the ground-truth PAG sources.

Every dataset is held in memory as tensors (images as uint8 [N, C, H, W], the
toy as float [N, 2]); the training loop indexes them directly, so a batch is
(x, y, index) and sources can look up per-sample targets by index.

Ground truth g(x, t) for the heuristic sources is r_t(x) - x (the paper, sec. 3; README):
  oi  r_t = one fixed random training image of class t
  cm  r_t = the mean training image of class t
  nn  r_t = the L2-nearest training image of class t, never x itself
  sbg precomputed score-based fields from a file (see load_sbg_file)
Only the direction of g matters (PAG compares by cosine).
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

try:
    import fcntl  # POSIX file locks (RunLock)
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

import toy_data


# ----------------------------------------------------------------------------- command lines
class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit non-zero."""


def run_cli(main):
    """Every script's entry point: a UserError (or a failed file operation) becomes one
    `error: ...` line on stderr and exit status 1, never a traceback."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # unreadable input, read-only or full disk, no network
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        sys.exit(f"error: {e.strerror or e}{where}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default in its help: the value, or the
    help's own "default: ..." where it depends on the dataset or architecture."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit status 2) and defaults shown in --help."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def fractions(text):
    """'0.5,0.75' -> [0.5, 0.75]: points of training, each strictly inside (0, 1); '' -> []."""
    try:
        values = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fractions") from None
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every fraction must be in (0, 1), got {text}")
    return values


# ----------------------------------------------------------------------------- files
def atomic_write(path, obj=None, text=None):
    """The project's one writer: torch.save(obj) or `text` to a temporary file, then rename,
    so a reader never sees half a file. A failed write (full disk, read-only folder)
    removes its temporary file and raises UserError naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if text is None:
            torch.save(obj, tmp)
        else:
            with open(tmp, "w") as f:
                f.write(text)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"could not write {path}: {reason}") from None


def write_json(obj, path):
    """JSON, atomically; NaN and infinity are refused (they are not JSON)."""
    atomic_write(path, text=json.dumps(obj, indent=2, allow_nan=False) + "\n")


def load_file(path, what, map_location="cpu"):
    """torch.load that never runs code from the file (weights_only=True: tensors, numbers,
    strings and containers only). A missing, truncated or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable {what} ({first[:160]})") from None


def remove_stale_temporaries(folder, names):
    """Delete temporaries of `names` in folder left by killed writers (call while holding its lock)."""
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if any(f.startswith(n + ".tmp") for n in names):
                os.remove(os.path.join(folder, f))


class RunLock:
    """One run per directory: FOLDER/run.lock, locked (flock) while the run lives, holding its pid.
    The kernel drops the lock when its process ends, however it ends, so a killed run's file
    is simply locked again, and of runs started together exactly one gets it."""

    def __init__(self, folder):
        self.path, self.fd = os.path.join(folder, "run.lock"), None
        os.makedirs(folder, exist_ok=True)
        if fcntl is None:
            print("note: no POSIX file locks here; one run per directory is not enforced", flush=True)
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{folder} is in use by another run" + (f" (process {other})" if other else "") +
                                "; wait for it or choose another --out-dir") from None
            try:  # a run that just ended removed the file we opened: lock the one now at the path
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.remove(self.path)  # while still locked: nobody locks a file that is on its way out
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# The project's one table of defaults, per dataset (paper where it says: README "Choices") and per
# architecture. Flags left unset take these (resolve_defaults). Weight decay follows the optimiser
# (1e-4 with SGD, 0 with Adam); augmentation (random crop, padding 4, + flip, per sample) is on where
# the table says, and "folder" (None) turns it on for images of 32 px or more (a 4-pixel shift is
# half of an 8-pixel image). Fashion-MNIST uses the recipe its benchmark measured to learn in few
# epochs (README). PAG (train_pag.py): the source of the ground truth (sbg needs a file, so cm for
# images), and pag_chunk, the targets per forward pass: fixed per dataset, never chosen from the GPU
# at hand, because under batch-norm a pass's replicas share statistics only among themselves, so the
# chunk is part of the result. STL (96 px, batch 32, k 10) all at once needs ~35 GiB, 4 per pass ~14 GiB.
_PAPER = dict(arch="resnet18", batch_size=64, optimizer="sgd", lr=0.01, lr_drops=[0.5, 0.75], augment=True,
              eps_l2=0.5, eps_linf=8 / 255, source="cm", pag_chunk=None)
DATASETS = {
    "cifar10": dict(_PAPER, num_classes=10),
    "cifar100": dict(_PAPER, num_classes=100),
    "stl10": dict(_PAPER, num_classes=10, batch_size=32, pag_chunk=4),
    "fashion-mnist": dict(_PAPER, num_classes=10, arch="cnn", optimizer="adam", lr=1e-3, lr_drops=[], augment=False,
                          eps_l2=1.5, eps_linf=0.1),
    "folder": dict(_PAPER, num_classes=None, augment=None),
    "synthetic": dict(_PAPER, num_classes=10),
    "toy": dict(_PAPER, num_classes=2, arch="mlp", batch_size=128, optimizer="adam", lr_drops=[], augment=False,
                eps_l2=15.0, eps_linf=5.0, source="nn"),
}
# lambda of train_pag.py: the official configs for resnet18 and vit (whose lambda is used at 2/3 in the
# first half of training: "stabilises training at a small robustness cost"); cnn: 0.25, which trained
# every source on Fashion-MNIST (README); mlp: a public re-run's 5 on the *mean* over the toy's two
# classes, i.e. lambda * C = 5 here (lambda * C = 10 left one mode misclassified in our runs).
# For more than 10 classes the default lambda is scaled by 10 / C (pag_coeff_default): lambda * C * mean
# over k = 10 targets then equals the official code's hard-coded 10 * mean at the same lambda (README).
ARCH_DEFAULTS = {
    "resnet18": dict(pag_coeff=1.5, pag_first_half_scale=1.0),
    "vit": dict(pag_coeff=3.0, pag_first_half_scale=2 / 3),
    "cnn": dict(pag_coeff=0.25, pag_first_half_scale=1.0),
    "mlp": dict(pag_coeff=2.5, pag_first_half_scale=1.0),
}
ALIASES = {"stl": "stl10", "cifar-10": "cifar10", "cifar-100": "cifar100", "fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}
SOURCES = ("oi", "cm", "nn", "sbg")
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    "fashion-mnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`


def pag_coeff_default(arch, num_classes):
    """The default lambda of train_pag.py for `arch` on C classes: the architecture's (ARCH_DEFAULTS), times
    10 / C beyond 10 classes, so that the PAG term weighs against the CE as in the official code
    (10 * mean of 1 - cos over 10 targets): CIFAR-100 resnet18 gets 0.15 (lambda * C = 15, as CIFAR-10's)."""
    return ARCH_DEFAULTS[arch]["pag_coeff"] * min(num_classes, 10) / num_classes


def resolve_defaults(args):
    """Fill, in place, every flag of `args` left unset (None) from the dataset's row of DATASETS, then
    the architecture's row of ARCH_DEFAULTS, then the few that follow from others. The one place
    where defaults are decided, for every script."""
    args.dataset = canonical_dataset(args.dataset)
    row = DATASETS[args.dataset]

    def fill(values):
        for key, value in values.items():
            if getattr(args, key, 0) is None:
                setattr(args, key, list(value) if isinstance(value, list) else value)
    if getattr(args, "source", 0) is None and getattr(args, "sbg_file", None):
        args.source = "sbg"  # fields given: the paper's best source
    fill(row)
    if args.arch not in ARCH_DEFAULTS:
        raise UserError(f"unknown arch {args.arch!r}; choose from {', '.join(ARCH_DEFAULTS)}")
    fill({k: v for k, v in ARCH_DEFAULTS[args.arch].items() if k != "pag_coeff"})
    if row["num_classes"]:  # a folder dataset knows its classes only once loaded: train_pag.make_pag_loss
        fill({"pag_coeff": pag_coeff_default(args.arch, row["num_classes"])})
    fill({"weight_decay": 1e-4 if getattr(args, "optimizer", None) == "sgd" else 0.0, "eval_eps": row["eps_l2"],
          "adv_eps": row[f"eps_{getattr(args, 'adv_norm', 'l2')}"]})
    return args


def canonical_dataset(name):
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} (or stl)")
    return name


@dataclass
class Data:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W] images, or float [N, D] points
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    classes: tuple = None  # class names, where known
    val_x: torch.Tensor = None  # the validation split held out of the training images (--val-samples), or None
    val_y: torch.Tensor = None

    def class_name(self, k):
        return self.classes[k] if self.classes else f"class {k}"

    @property
    def is_image(self):
        return self.train_x.dim() == 4

    @property
    def box(self):
        """The valid input range attacks must stay in: pixels [0, 1]; the toy is unbounded."""
        return (0.0, 1.0) if self.is_image else None

    @property
    def input_shape(self):
        return tuple(self.train_x.shape[1:])

    def split(self, name):
        """(x, y) of "train", "val" or "test"."""
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def to(self, device):
        for k in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        return self


def to_float(x):
    """Stored batch -> model input: uint8 pixels to [0, 1] floats; floats unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- loading
def get_data(name, data_dir="data", download=False, train_samples=None, test_samples=None, image_size=None,
             data_seed=None, val_samples=None):
    """Load a dataset as a `Data` of in-memory tensors.

    train_samples / test_samples keep the *first* N images of each split (the
    files' own order, which is shuffled for CIFAR, STL and Fashion-MNIST), so a
    subset is the same for every seed and every script.
    val_samples: hold out N training images as a validation split, never trained on: a fixed
    random subset (seed 0, the same for every run and script; the toy and folder datasets are
    sorted by class, so the last N would be one class), taken before train_samples, which then
    keeps the first N of the remaining images in their order.
    data_seed: which draw of the toy (default 0); the toy is the only dataset that is drawn.
    """
    name = canonical_dataset(name)
    if data_seed is not None and name != "toy":
        raise UserError(f"--data-seed picks a draw of the toy; {name} is not drawn")
    if name == "toy":
        train_x, train_y, test_x, test_y = toy_data.make_toy(seed=data_seed or 0)
        num_classes = 2
    elif name == "synthetic":
        train_x, train_y, test_x, test_y = make_synthetic(image_size or 32)
        num_classes = 10
    elif name == "folder":
        train_x, train_y, test_x, test_y, classes = load_folder(data_dir, image_size)
        num_classes = len(classes)
    elif name == "fashion-mnist":
        train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, download)
        num_classes = 10
    else:
        train_x, train_y, test_x, test_y = load_torchvision(name, data_dir, download)
        num_classes = DATASETS[name]["num_classes"]
    val_x = val_y = None
    if val_samples is not None:
        if val_samples >= len(train_y):
            raise UserError(f"--val-samples {val_samples} leaves no training images of {name}'s {len(train_y)}")
        held_out = torch.zeros(len(train_y), dtype=torch.bool)
        held_out[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:val_samples]] = True
        val_x, val_y = train_x[held_out], train_y[held_out].long()
        train_x, train_y = train_x[~held_out], train_y[~held_out]
    if train_samples is not None:
        train_x, train_y = train_x[:train_samples], train_y[:train_samples]
    if test_samples is not None:
        test_x, test_y = test_x[:test_samples], test_y[:test_samples]
    classes = tuple(classes) if name == "folder" else CLASS_NAMES.get(name)
    return Data(name, train_x, train_y.long(), test_x, test_y.long(), num_classes, classes, val_x, val_y)


def load_torchvision(name, root, download):
    import torchvision.datasets as tvd

    try:
        if name == "stl10":
            tr, te = (tvd.STL10(root, split=s, download=download) for s in ("train", "test"))
            return torch.from_numpy(tr.data), torch.from_numpy(tr.labels), torch.from_numpy(te.data), torch.from_numpy(te.labels)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = (cls(root, train=t, download=download) for t in (True, False))
    except OSError as e:  # urllib's URLError is an OSError: no network
        raise UserError(f"{name}: could not reach the network to download it ({getattr(e, 'reason', e)})") from None
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        if download:
            raise UserError(f"{name}: could not download into {root}: {e}") from None
        raise UserError(f"{name} not found under {os.path.abspath(root)}; pass --download to fetch it (or --data-dir)") from None
    as_chw = lambda d: torch.from_numpy(d).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return as_chw(tr.data), torch.tensor(tr.targets), as_chw(te.data), torch.tensor(te.targets)


def read_idx(path):
    """Read an idx file (the MNIST format), gzipped or not, as a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root, download):
    """Fashion-MNIST from torchvision's folder, else Debian's package, else a download."""
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in (os.path.join(root, "FashionMNIST", "raw"), DEBIAN_FASHION_MNIST):
        for suffix in ("", ".gz"):
            paths = [os.path.join(folder, f + suffix) for f in files]
            if all(os.path.exists(p) for p in paths):
                arrays = [torch.from_numpy(read_idx(p).copy()) for p in paths]
                return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]
    if not download:
        raise UserError(f"fashion-mnist not found under {os.path.abspath(root)}/FashionMNIST/raw or {DEBIAN_FASHION_MNIST} "
                        "(apt-get install dataset-fashion-mnist); pass --download to fetch it")
    import torchvision.datasets as tvd

    try:
        tr, te = (tvd.FashionMNIST(root, train=t, download=True) for t in (True, False))
    except OSError as e:
        raise UserError(f"fashion-mnist: could not reach the network to download it ({getattr(e, 'reason', e)})") from None
    return tr.data[:, None], tr.targets, te.data[:, None], te.targets


def load_folder(root, image_size):
    """Bring your own data: root/train/<class>/*.png and root/test/<class>/*.png.

    Refused, naming the culprit: fewer than two classes, a class folder without images,
    an image that cannot be read, images of different sizes without --image-size."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    splits = []
    for split in ("train", "test"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"folder dataset needs {os.path.abspath(path)} (ImageFolder layout: {split}/<class>/<image>); set --data-dir")
        try:
            splits.append(ImageFolder(path, loader=Image.open))
        except FileNotFoundError as e:  # a class folder without images (or no class folders at all)
            raise UserError(f"{path}: {e}") from None
        if len(splits[-1].classes) < 2:
            raise UserError(f"{path} holds {len(splits[-1].classes)} class folder(s); a classifier needs at least 2")
    if splits[0].classes != splits[1].classes:
        raise UserError(f"train and test class folders differ under {root}: {splits[0].classes} vs {splits[1].classes}")
    out, mode = [], None
    for ds in splits:
        xs, ys = [], []
        for file, label in ds.samples:
            try:
                with Image.open(file) as img:
                    mode = mode or ("L" if img.mode in ("L", "1", "I;16") else "RGB")
                    img = img.convert(mode)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {file} ({type(e).__name__})") from None
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
            xs.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()))
            ys.append(label)
        if len({x.shape for x in xs}) > 1:
            raise UserError(f"images under {root} differ in size; pass --image-size N to resize them")
        out += [torch.stack(xs), torch.tensor(ys)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise UserError(f"train images are {tuple(out[0].shape[1:])} but test images {tuple(out[2].shape[1:])}; pass --image-size N")
    return (*out, splits[0].classes)


def make_synthetic(image_size=32, n_train=1024, n_test=512):
    """Small random CIFAR-shaped data (only when asked for: tests and smoke runs).

    Each class is a smooth random pattern plus pixel noise, so models can learn
    it and attacks have something to break. Always the same (seed 0).
    """
    gen = torch.Generator().manual_seed(0)
    protos = F.interpolate(torch.rand(10, 3, 4, 4, generator=gen), size=image_size, mode="bilinear", align_corners=False)

    def sample(n):
        y = torch.arange(n) % 10
        x = protos[y] + 0.15 * torch.randn(n, 3, image_size, image_size, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return (*sample(n_train), *sample(n_test))


# ----------------------------------------------------------------------------- augmentation
def draw_crop_flip(batch_size, padding, generator):
    """Draw one random crop offset (2 ints in [0, 2*padding]) and one flip bit per sample."""
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator)
    flips = torch.rand(batch_size, generator=generator) < 0.5
    return offsets, flips


def crop_flip(t, offsets, flips, padding=4, fill=0.0):
    """Apply per-sample padded crop (border value `fill`) and horizontal flip to t [B, ..., H, W].

    All leading dims after the batch (channels, or k target fields x channels)
    get the sample's own crop/flip, so an image and its ground-truth fields
    always move together. Images pad with the pixel that is the model's 0
    (models.PIXEL_MEAN, mid-grey: the official code crops in [-1, 1] with zero
    padding); fields, differences of two images, pad with 0. Then cropping
    r_t - x equals cropped r_t minus cropped x.
    """
    b, h, w = t.shape[0], t.shape[-2], t.shape[-1]
    dev = t.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    padded = F.pad(t.reshape(b, -1, h, w), (padding,) * 4, value=fill)
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    # Advanced indices on dims 0, 2, 3 around a slice: the result is [B, H, W, K].
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).reshape(t.shape)


# ----------------------------------------------------------------------------- ground-truth sources
def class_means(x, y, num_classes):
    """[C, ...] mean image of each class (float, [0, 1] for images)."""
    x = to_float(x)
    return torch.stack([x[y == t].mean(0) for t in range(num_classes)])


def one_image_per_class(y, num_classes, generator):
    """[C] index of one random training image per class (the OI source)."""
    return torch.stack([(y == t).nonzero().squeeze(1)[torch.randint(int((y == t).sum()), (1,), generator=generator)][0]
                        for t in range(num_classes)])


def nearest_of_class(queries, train_x, train_y, num_classes, query_idx=None, chunk=2048):
    """[Q, C] index of the L2-nearest training image of each class, in chunks.

    query_idx: the queries' own indices in train_x when they are training images,
    so that an image is never its own neighbour. Distances are |q|^2 - 2 q.r + |r|^2
    on [chunk, n_class] blocks: no N x N matrix is ever formed. float32 for
    images (values in [0, 1]); float64 for float data such as the toy, whose
    coordinates (up to ~200) would lose near-ties to float32 rounding.
    """
    dtype = torch.float32 if train_x.dtype == torch.uint8 else torch.float64
    q_all = to_float(queries).flatten(1).to(dtype)
    out = torch.empty(len(q_all), num_classes, dtype=torch.long, device=q_all.device)
    for t in range(num_classes):
        members = (train_y == t).nonzero().squeeze(1)
        if len(members) == 0:
            raise ValueError(f"class {t} has no training images; the nn source needs at least one")
        ref = to_float(train_x[members]).flatten(1).to(dtype)
        ref_sq = (ref * ref).sum(1)
        pos_in_class = None
        if query_idx is not None:  # position of each query within this class's members, or -1
            pos_in_class = torch.full((len(train_y),), -1, dtype=torch.long, device=members.device)
            pos_in_class[members] = torch.arange(len(members), device=members.device)
        for s in range(0, len(q_all), chunk):
            q = q_all[s: s + chunk]
            d = (q * q).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq
            if pos_in_class is not None:
                pos = pos_in_class[query_idx[s: s + chunk]]
                rows = (pos >= 0).nonzero().squeeze(1)
                d[rows, pos[rows]] = float("inf")
            out[s: s + chunk, t] = members[d.argmin(1)]
    return out


def cached_nearest(data, cache_dir):
    """nearest_of_class for the whole training set, cached on disk by content hash.

    A cached table is checked before use (shape, range, and every neighbour of the right
    class); a corrupt one is refused, naming the file to delete."""
    h = hashlib.sha1(data.train_x.cpu().numpy().tobytes())
    h.update(data.train_y.cpu().numpy().tobytes())
    n, c = len(data.train_y), data.num_classes
    path = os.path.join(cache_dir, f"nn-{data.name}-{n}-{h.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        table = load_file(path, "nearest-neighbour cache")
        y = data.train_y.cpu()
        if not (torch.is_tensor(table) and table.dtype == torch.long and tuple(table.shape) == (n, c)
                and table.min() >= 0 and table.max() < n and (y[table] == torch.arange(c)).all()):
            raise UserError(f"{path} is not a valid nearest-neighbour table for these {n} images; delete it")
        return table.to(data.train_x.device)
    atomic_write(path + ".probe", text="")  # fail now, not after the search, if the folder is not writable
    os.remove(path + ".probe")
    print(f"computing nearest neighbours of {n} training images (cached at {path})", flush=True)
    nn_idx = nearest_of_class(data.train_x, data.train_x, data.train_y, c, query_idx=torch.arange(n, device=data.train_x.device))
    atomic_write(path, nn_idx.cpu())
    return nn_idx


def make_source(name, data, cache_dir="cache", seed=0, sbg_file=None, split="train"):
    """Return gt_grad(x, target_classes, idx=None) -> [B, k, *input_shape] for images of `split`.

    x: un-augmented inputs [B, ...] in model space; target_classes [B, k];
    idx: their indices in data's `split` images ("train" or "test"): needed by `sbg`,
    whose file holds fields for that split's images; for training images it lets `nn`
    use the cached neighbours and exclude the image itself. Every representative comes
    from the training images; for other images (or without idx) `nn` searches them on the fly.
    """
    if name == "oi":
        reps = to_float(data.train_x[one_image_per_class(data.train_y, data.num_classes, torch.Generator().manual_seed(seed))])
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "cm":
        reps = class_means(data.train_x, data.train_y, data.num_classes)
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "nn":
        empty = (data.train_y.bincount(minlength=data.num_classes) == 0).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"the nn source needs training images of every class; none of class(es) {empty}")
        nn_idx = cached_nearest(data, cache_dir) if split == "train" else None

        def gt_nn(x, target_classes, idx=None):
            own = idx is not None and split == "train"
            table = nn_idx[idx] if own else nearest_of_class(x, data.train_x, data.train_y, data.num_classes)
            return to_float(data.train_x[table.gather(1, target_classes)]) - x[:, None]
        return gt_nn
    if name == "sbg":
        if sbg_file is None:
            raise UserError("--source sbg needs --sbg-file (precomputed score-based fields)")
        fields = load_sbg_file(sbg_file, data, split)

        def gt_sbg(x, target_classes, idx=None):
            if idx is None:
                raise UserError(f"the sbg source needs the images' indices in the {split} split")
            return fields[idx.cpu()[:, None], target_classes.cpu()].to(target_classes.device, torch.float32)
        return gt_sbg
    raise UserError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")


def load_sbg_file(path, data, split="train"):
    """Score-based fields [N, C, *input_shape] for exactly data's training set, or for its (first N)
    test images with split="test" (float16 is fine).

    Reads `sbg.py export` files (checked by split, dataset, count, held-out validation images and
    labels) and the official PAG-ROB release (training images only): a tensor (N, 1+C, channels,
    H, W) holding each image (in [-1, 1]) and then one field per class, alone or as (tensor,
    labels). For the latter, the images themselves are compared with ours, so another order or
    subset is refused.
    """
    obj = load_file(path, "sbg fields file")
    _, labels_here = data.split(split)
    n, c = len(labels_here), data.num_classes
    expected = (n, c, *data.input_shape)
    if isinstance(obj, dict) and obj.get("kind") == "sbg-fields":  # ours
        val_here = None if data.val_y is None else len(data.val_y)
        n_file, file_split = obj["n"], obj.get("split", "train")
        fits = file_split == split and obj["dataset"] == data.name and (
            n_file == n and obj.get("val_samples") == val_here and torch.equal(obj["labels"], labels_here.cpu())
            if split == "train" else n_file >= n and torch.equal(obj["labels"][:n], labels_here.cpu()))
        if not fits:
            raise UserError(f"{path} was exported for {n_file} {obj['dataset']} {file_split} images (train-samples "
                            f"{obj.get('train_samples')}, val-samples {obj.get('val_samples')}), not for these {n} "
                            f"{data.name} {split} images")
        fields = obj["fields"][:n]
    elif split != "train":
        raise UserError(f"{path}: the official release holds fields for training images only")
    else:  # the official release
        images_and_fields, labels = (obj[0], obj[1]) if isinstance(obj, (tuple, list)) else (obj, None)
        if not torch.is_tensor(images_and_fields) or tuple(images_and_fields.shape) != (n, 1 + c, *data.input_shape):
            got = tuple(images_and_fields.shape) if torch.is_tensor(images_and_fields) else type(obj).__name__
            raise UserError(f"{path}: expected an sbg.py export or an official tensor of shape {(n, 1 + c, *data.input_shape)}, got {got}")
        images = (images_and_fields[:, 0].float() + 1) / 2
        if (images - to_float(data.train_x.cpu())).abs().amax() > 1.5 / 255 or \
                (labels is not None and not torch.equal(torch.as_tensor(labels).long(), data.train_y.cpu())):
            raise UserError(f"{path}: its images or labels are not this run's {n} {data.name} training images in order")
        fields = images_and_fields[:, 1:]
    if tuple(fields.shape) != expected:
        raise UserError(f"{path}: expected fields of shape {expected}, got {tuple(fields.shape)}")
    return fields
