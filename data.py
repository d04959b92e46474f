"""Datasets, per-sample augmentation, and the ground-truth PAG sources.

Every dataset is held in memory as tensors (images as uint8 [N, C, H, W], the
toy as float [N, 2]); the training loop indexes them directly, so a batch is
(x, y, index) and sources can look up per-sample targets by index.

Ground truth g(x, t) for the heuristic sources is r_t(x) - x (PAPER.md §3):
  oi  r_t = one fixed random training image of class t
  cm  r_t = the mean training image of class t
  nn  r_t = the L2-nearest training image of class t, never x itself
  sbg precomputed score-based fields from a file (see load_sbg_file)
Only the direction of g matters (PAG compares by cosine).
"""
import gzip
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import toy_data


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit non-zero."""


def run_cli(main):
    """Every script's entry point: a UserError becomes `error: ...` on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")


# Per-dataset defaults (paper where it says; PAPER.md §4, §5). Flags left unset take these.
DATASETS = {
    "cifar10": dict(num_classes=10, arch="resnet18", batch_size=64, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=0.5, eps_linf=8 / 255),
    "cifar100": dict(num_classes=100, arch="resnet18", batch_size=64, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=0.5, eps_linf=8 / 255),
    "stl10": dict(num_classes=10, arch="resnet18", batch_size=32, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=0.5, eps_linf=8 / 255),
    "fashion-mnist": dict(num_classes=10, arch="cnn", batch_size=64, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=1.5, eps_linf=0.1),
    "folder": dict(num_classes=None, arch="resnet18", batch_size=64, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=0.5, eps_linf=8 / 255),
    "synthetic": dict(num_classes=10, arch="resnet18", batch_size=64, optimizer="sgd", lr_drops="0.5,0.75", eps_l2=0.5, eps_linf=8 / 255),
    "toy": dict(num_classes=2, arch="mlp", batch_size=128, optimizer="adam", lr_drops="", eps_l2=15.0, eps_linf=5.0),
}
ALIASES = {"stl": "stl10", "cifar-10": "cifar10", "cifar-100": "cifar100", "fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}
SOURCES = ("oi", "cm", "nn", "sbg")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`


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

    def to(self, device):
        for k in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device))
        return self


def to_float(x):
    """Stored batch -> model input: uint8 pixels to [0, 1] floats; floats unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- loading
def get_data(name, data_dir="data", download=False, train_samples=None, test_samples=None, image_size=None,
             data_seed=None):
    """Load a dataset as a `Data` of in-memory tensors.

    train_samples / test_samples keep the *first* N images of each split (the
    files' own order, which is shuffled for CIFAR, STL and Fashion-MNIST), so a
    subset is the same for every seed and every script.
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
        train_x, train_y, test_x, test_y, num_classes = load_folder(data_dir, image_size)
    elif name == "fashion-mnist":
        train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, download)
        num_classes = 10
    else:
        train_x, train_y, test_x, test_y = load_torchvision(name, data_dir, download)
        num_classes = DATASETS[name]["num_classes"]
    for n, what in ((train_samples, "--train-samples"), (test_samples, "--eval-samples")):
        if n is not None and n < 1:
            raise UserError(f"{what} must be at least 1, got {n}")
    if train_samples is not None:
        train_x, train_y = train_x[:train_samples], train_y[:train_samples]
    if test_samples is not None:
        test_x, test_y = test_x[:test_samples], test_y[:test_samples]
    return Data(name, train_x, train_y.long(), test_x, test_y.long(), num_classes)


def load_torchvision(name, root, download):
    import torchvision.datasets as tvd

    try:
        if name == "stl10":
            tr, te = (tvd.STL10(root, split=s, download=download) for s in ("train", "test"))
            return torch.from_numpy(tr.data), torch.from_numpy(tr.labels), torch.from_numpy(te.data), torch.from_numpy(te.labels)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = (cls(root, train=t, download=download) for t in (True, False))
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

    tr, te = (tvd.FashionMNIST(root, train=t, download=True) for t in (True, False))
    return tr.data[:, None], tr.targets, te.data[:, None], te.targets


def load_folder(root, image_size):
    """Bring your own data: root/train/<class>/*.png and root/test/<class>/*.png."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    splits = []
    for split in ("train", "test"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"folder dataset needs {os.path.abspath(path)} (ImageFolder layout: {split}/<class>/<image>); set --data-dir")
        splits.append(ImageFolder(path, loader=Image.open))
    if splits[0].classes != splits[1].classes:
        raise UserError(f"train and test class folders differ under {root}: {splits[0].classes} vs {splits[1].classes}")
    mode = "L" if splits[0][0][0].mode in ("L", "1", "I;16") else "RGB"
    out = []
    for ds in splits:
        xs, ys = [], []
        for img, label in ds:
            img = img.convert(mode)
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
    return (*out, len(splits[0].classes))


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


def crop_flip(t, offsets, flips, padding=4):
    """Apply per-sample zero-padded crop and horizontal flip to t [B, ..., H, W].

    All leading dims after the batch (channels, or k target fields x channels)
    get the sample's own crop/flip, so an image and its ground-truth fields
    always move together. Both operations are linear, so cropping r_t - x
    equals cropped r_t minus cropped x.
    """
    b, h, w = t.shape[0], t.shape[-2], t.shape[-1]
    dev = t.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    padded = F.pad(t.reshape(b, -1, h, w), (padding,) * 4)
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
            raise UserError(f"class {t} has no training images; the nn source needs at least one (two for itself)")
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
    """nearest_of_class for the whole training set, cached on disk by content hash."""
    h = hashlib.sha1(data.train_x.cpu().numpy().tobytes())
    h.update(data.train_y.cpu().numpy().tobytes())
    path = os.path.join(cache_dir, f"nn-{data.name}-{len(data.train_y)}-{h.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        return torch.load(path, map_location=data.train_x.device)
    n = len(data.train_y)
    print(f"computing nearest neighbours of {n} training images (cached at {path})", flush=True)
    nn_idx = nearest_of_class(data.train_x, data.train_x, data.train_y, data.num_classes,
                              query_idx=torch.arange(n, device=data.train_x.device))
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(nn_idx.cpu(), path)
    return nn_idx


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_source(name, data, cache_dir="cache", seed=0, sbg_file=None):
    """Return gt_grad(x, target_classes, idx=None) -> [B, k, *input_shape].

    x: un-augmented inputs [B, ...] in model space; target_classes [B, k];
    idx: their indices in data.train_x when they are training images (needed by
    `sbg`; lets `nn` use the cached neighbours and exclude the image itself).
    Without idx (e.g. test images), `nn` searches the training set on the fly.
    """
    if name == "oi":
        reps = to_float(data.train_x[one_image_per_class(data.train_y, data.num_classes, torch.Generator().manual_seed(seed))])
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "cm":
        reps = class_means(data.train_x, data.train_y, data.num_classes)
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "nn":
        nn_idx = cached_nearest(data, cache_dir)

        def gt_nn(x, target_classes, idx=None):
            table = nn_idx[idx] if idx is not None else nearest_of_class(x, data.train_x, data.train_y, data.num_classes)
            return to_float(data.train_x[table.gather(1, target_classes)]) - x[:, None]
        return gt_nn
    if name == "sbg":
        if sbg_file is None:
            raise UserError("--source sbg needs --sbg-file (precomputed score-based fields)")
        fields = load_sbg_file(sbg_file, data)

        def gt_sbg(x, target_classes, idx=None):
            if idx is None:
                raise UserError("the sbg source has fields for training images only")
            return fields[idx.cpu()[:, None], target_classes.cpu()].to(target_classes.device, torch.float32)
        return gt_sbg
    raise UserError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")


def load_sbg_file(path, data):
    """Score-based fields [N, C, *input_shape] for exactly data's training set (float16 is fine).

    Reads `sbg.py export` files (checked by dataset, count and labels) and the official
    PAG-ROB release: a tensor (N, 1+C, channels, H, W) holding each image (in [-1, 1])
    and then one field per class, alone or as (tensor, labels). For the latter, the
    images themselves are compared with ours, so another order or subset is refused.
    """
    if not os.path.exists(path):
        raise UserError(f"sbg file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"{path} is not a readable torch file ({type(e).__name__})") from None
    n, c = len(data.train_y), data.num_classes
    expected = (n, c, *data.input_shape)
    if isinstance(obj, dict) and obj.get("kind") == "sbg-fields":  # ours
        if obj["dataset"] != data.name or obj["n"] != n or not torch.equal(obj["labels"], data.train_y.cpu()):
            raise UserError(f"{path} was exported for {obj['dataset']} ({obj['n']} images, train-samples "
                            f"{obj.get('train_samples')}), not for these {n} {data.name} training images")
        fields = obj["fields"]
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
