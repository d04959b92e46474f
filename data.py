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
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import files
from files import UserError


# The project's one table of defaults, per dataset (paper where it says: README "Choices") and per
# architecture. Flags left unset take these (train_baseline.resolve_settings, once per run). Weight decay follows the optimiser
# (1e-4 with SGD, 0 with Adam); augmentation (random crop, padding 4, + flip, per sample) is on where
# the table says, and "folder" (None) turns it on for images of 32 px or more (a 4-pixel shift is
# half of an 8-pixel image). Fashion-MNIST uses the recipe its benchmark measured to learn in few
# epochs (README). PAG (train_pag.py): the source of the ground truth (sbg needs a file, so cm for
# images), and pag_chunk, the targets per forward pass: fixed per dataset, never chosen from the GPU
# at hand, because under batch-norm a pass's replicas share statistics only among themselves, so the
# chunk is part of the result. STL (96 px, batch 32, k 10) all at once needs ~35 GiB, 4 per pass ~14 GiB.
# drop_last: the official image loader drops the last partial batch; the toy's public re-run keeps it (47 steps
# of 6,000 points at batch 128). dtype and threads: the toy trains and is evaluated in float64 on one thread,
# whatever OMP_NUM_THREADS says, because its training is chaotic: a last-bit difference of a float32 kernel
# (another thread count or CPU) re-draws the outcome (bench/README.md, "The 2-D toy").
# order: how a split is stored. "shuffled" (the CIFAR, STL and Fashion-MNIST files, synthetic's interleaved
# classes): a subset is its first N images. "by class" (a folder is read class by class, the toy drawn mode by
# mode): a subset is the first N of a fixed class-interleaved order (fair_order), never one class.
_PAPER = dict(arch="resnet18", batch_size=64, optimizer="sgd", lr=0.01, lr_drops=[0.5, 0.75], augment=True,
              eps_l2=0.5, eps_linf=8 / 255, source="cm", pag_chunk=None, drop_last=True, dtype="float32", threads=None,
              order="shuffled")
DATASETS = {
    "cifar10": dict(_PAPER, num_classes=10),
    "cifar100": dict(_PAPER, num_classes=100),
    "stl10": dict(_PAPER, num_classes=10, batch_size=32, pag_chunk=4),
    "fashion-mnist": dict(_PAPER, num_classes=10, arch="cnn", optimizer="adam", lr=1e-3, lr_drops=[], augment=False,
                          eps_l2=1.5, eps_linf=0.1),
    "folder": dict(_PAPER, num_classes=None, augment=None, order="by class"),
    "synthetic": dict(_PAPER, num_classes=10),
    "toy": dict(_PAPER, num_classes=2, arch="mlp", batch_size=128, optimizer="adam", lr_drops=[], augment=False,
                eps_l2=15.0, eps_linf=5.0, source="nn", drop_last=False, dtype="float64", threads=1, order="by class"),
}
# lambda of train_pag.py: the official configs for resnet18 and vit (whose lambda is used at 2/3 in the
# first half of training: "stabilises training at a small robustness cost"); cnn: 0.1 on natural images, 0.25
# on Fashion-MNIST (CNN_PAG_COEFF); mlp: the toy's public re-run puts 5 on the *sum* over its two classes
# (its notebook: 5 * sum_classes (1 - mean cos)), i.e. lambda * C = 10 here: lambda 5.
# For more than 10 classes the default lambda is scaled by 10 / C (pag_coeff_default): lambda * C * mean
# over k = 10 targets then equals the official code's hard-coded 10 * mean at the same lambda (README).
ARCH_DEFAULTS = {
    "resnet18": dict(pag_coeff=1.5, pag_first_half_scale=1.0),
    "vit": dict(pag_coeff=3.0, pag_first_half_scale=2 / 3),
    "cnn": dict(pag_coeff=0.1, pag_first_half_scale=1.0),
    "mlp": dict(pag_coeff=5.0, pag_first_half_scale=1.0),
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


# lambda of the small cnn where it is not ARCH_DEFAULTS' 0.1 (natural images: bench/cifar10.py, where the cnn at 0.2
# and 0.25 stays near chance on CIFAR-10 images): Fashion-MNIST's claims bench chose 0.25 on its validation images;
# synthetic (tests, smoke runs) keeps that value.
CNN_PAG_COEFF = {"fashion-mnist": 0.25, "synthetic": 0.25}


def pag_coeff_default(arch, num_classes, dataset=None):
    """The default lambda of train_pag.py for `arch` on C classes of `dataset`: the architecture's (ARCH_DEFAULTS,
    or CNN_PAG_COEFF's for the cnn), times 10 / C beyond 10 classes, so that the PAG term weighs against the CE as
    in the official code (10 * mean of 1 - cos over 10 targets): CIFAR-100 resnet18 gets 0.15 (lambda * C = 15)."""
    lam = CNN_PAG_COEFF.get(dataset, ARCH_DEFAULTS[arch]["pag_coeff"]) if arch == "cnn" else ARCH_DEFAULTS[arch]["pag_coeff"]
    return lam * min(num_classes, 10) / num_classes


def pag_weight(settings, num_classes, epoch):
    """What multiplies the mean (1 - cos) PAG term in an epoch (0-based): lambda (settings.pag_coeff, by
    default pag_coeff_default) x C, as the official code's sum over classes, x pag_first_half_scale in the
    first half of training (the ViT's 2/3)."""
    scale = settings.pag_first_half_scale if epoch < settings.epochs / 2 else 1.0
    return settings.pag_coeff * num_classes * scale


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
    sha256: dict = None  # {"train", "test"}: content hash of each whole split as loaded (content_sha256)

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
    """Stored batch -> model input: uint8 pixels to [0, 1] float32; float points (the toy's float64) unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x if x.is_floating_point() else x.float()


# ----------------------------------------------------------------------------- loading
def get_data(name, data_dir="data", download=False, train_samples=None, test_samples=None, image_size=None,
             data_seed=None, val_samples=None):
    """Load a dataset as a `Data` of in-memory tensors.

    train_samples / test_samples keep N images of each split (subset_indices): the first N where
    the files are stored shuffled (CIFAR, STL, Fashion-MNIST), a fair sample of every class where
    they are stored class by class (folder, toy); the same for every seed and every script.
    val_samples: hold out N training images as a validation split, never trained on: a fixed
    random subset (seed 0, the same for every run and script), taken before train_samples, which
    then keeps N of the remaining images.
    The returned Data's `sha256` names the content of each whole split as loaded (images and
    labels), so a checkpoint can refuse a folder whose files or labels changed since.
    data_seed: which draw of the toy (default 0); the toy is the only dataset that is drawn.
    """
    name = canonical_dataset(name)
    if data_seed is not None and name != "toy":
        raise UserError(f"--data-seed picks a draw of the toy; {name} is not drawn")
    if name == "toy":
        train_x, train_y, test_x, test_y = make_toy(seed=data_seed or 0, dtype=torch.float64)
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
    for split, labels in (("training", train_y), ("test", test_y)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"{name}: a {split} label is {int(labels.max() if labels.max() >= num_classes else labels.min())}, "
                            f"outside 0..{num_classes - 1}")
    sha256 = {"train": content_sha256(train_x, train_y), "test": content_sha256(test_x, test_y)}
    val_x = val_y = None
    if val_samples is not None:
        if val_samples >= len(train_y):
            raise UserError(f"--val-samples {val_samples} leaves no training images of {name}'s {len(train_y)}")
        held_out = torch.zeros(len(train_y), dtype=torch.bool)
        held_out[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:val_samples]] = True
        val_x, val_y = train_x[held_out], train_y[held_out].long()
        train_x, train_y = train_x[~held_out], train_y[~held_out]
    if train_samples is not None:
        keep = subset_indices(name, train_y, train_samples)
        train_x, train_y = train_x[keep], train_y[keep]
    if test_samples is not None:
        keep = subset_indices(name, test_y, test_samples)
        test_x, test_y = test_x[keep], test_y[keep]
    classes = tuple(classes) if name == "folder" else CLASS_NAMES.get(name)
    return Data(name, train_x, train_y.long(), test_x, test_y.long(), num_classes, classes, val_x, val_y, sha256)


def content_sha256(x, y):
    """sha256 of a split's images (or points) and labels, as stored: what it is, whatever its path."""
    h = hashlib.sha256()
    for t in (x, y.long()):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fair_order(labels):
    """A fixed order of a split stored class by class in which every prefix is a fair sample of the
    classes: each class's images in a fixed random order (seed 0), interleaved so that the first n hold
    every class in proportion to its size (within one image). Stable: the same labels, the same order."""
    labels = labels.cpu().long()
    gen = torch.Generator().manual_seed(0)
    rank = torch.empty(len(labels), dtype=torch.float64)
    sizes = labels.bincount()
    for c in range(len(sizes)):
        members = (labels == c).nonzero().squeeze(1)
        rank[members[torch.randperm(len(members), generator=gen)]] = torch.arange(len(members), dtype=torch.float64)
    key = (rank + 0.5) / sizes[labels].double()  # where an image falls in its class, from 0 to 1
    by_class = torch.argsort(labels, stable=True)  # ties (classes of one size) go in class order
    return by_class[torch.argsort(key[by_class], stable=True)]


def subset_indices(name, labels, n):
    """Which n images of a split a subset keeps (data.DATASETS "order"): the first n of shuffled files, the
    first n of fair_order for files stored class by class; the whole split, in its order, if n covers it."""
    if n >= len(labels):
        return torch.arange(len(labels))
    if DATASETS[name]["order"] == "by class":
        return fair_order(labels)[:n]
    return torch.arange(n)


def class_counts_text(labels, num_classes, classes=None, limit=10):
    """How many images of each class a split holds, for a run's first line and attack.py's table: "100 per
    class" when equal, the range when within 10% (or beyond `limit` classes), else each class's count."""
    counts = labels.cpu().long().bincount(minlength=num_classes).tolist()
    if len(set(counts)) == 1:
        return f"{counts[0]} per class"
    if num_classes > limit or max(counts) - min(counts) <= 0.1 * max(counts):  # nearly balanced: the range says it
        return f"{min(counts)}-{max(counts)} per class"
    names = classes or [str(c) for c in range(num_classes)]
    return "per class " + ", ".join(f"{n} {c}" for c, n in zip(names, counts))


# The paper's 2-D toy: two classes on the line x2 = 2*x1, three modes each (toy_data.py draws it).
TOY_CENTRES = ((-50.0, -10.0, 30.0), (-30.0, 10.0, 50.0))  # x1 centres of class 0, class 1
TOY_SLOPE = 2.0


def make_toy(seed=0, train_per_mode=1000, test_per_mode=100, dtype=torch.float32):
    """Return (train_x, train_y, test_x, test_y); x [N, 2] of dtype, y long [N].

    Train and test come from one generator so a seed fixes both; the test set
    is balanced (test_per_mode points from each of the six modes). The draws are
    made in float64 and then cast, so a dtype changes only the precision.
    """
    gen = torch.Generator().manual_seed(seed)

    def sample(per_mode):
        xs, ys = [], []
        for label, centres in enumerate(TOY_CENTRES):
            for c in centres:
                x1 = (c + torch.randn(per_mode, generator=gen, dtype=torch.float64)).to(dtype)
                xs.append(torch.stack([x1, TOY_SLOPE * x1], dim=1))
                ys.append(torch.full((per_mode,), label, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = sample(train_per_mode)
    test_x, test_y = sample(test_per_mode)
    return train_x, train_y, test_x, test_y


def load_torchvision(name, root, download):
    """CIFAR-10/100 or STL-10 from torchvision's folder under root, downloaded there (with torchvision's
    progress) when missing and allowed. A failed download leaves no folder it made; without downloads the
    error says which archive to fetch and where to unpack it."""
    import torchvision.datasets as tvd

    cls = {"stl10": tvd.STL10, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    fetch = f"fetch {cls.url} and unpack it in {os.path.abspath(root)} (it holds {cls.base_folder}/)"
    made = files.first_missing_folder(root)
    try:
        if name == "stl10":
            tr, te = (tvd.STL10(root, split=s, download=download) for s in ("train", "test"))
            return torch.from_numpy(tr.data), torch.from_numpy(tr.labels), torch.from_numpy(te.data), torch.from_numpy(te.labels)
        tr, te = (cls(root, train=t, download=download) for t in (True, False))
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError: no network; RuntimeError: not found / corrupt
        files.remove_made_folder(made)
        if not download:
            raise UserError(f"{name} not found under {os.path.abspath(root)} and downloads are off (--no-download): "
                            f"{fetch}, or set --data-dir") from None
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        raise UserError(f"{name}: could not download it ({reason}); {fetch}, then run again") from None
    as_chw = lambda d: torch.from_numpy(d).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return as_chw(tr.data), torch.tensor(tr.targets), as_chw(te.data), torch.tensor(te.targets)


def load_fashion_mnist(root, download):
    """Fashion-MNIST from torchvision's folder, else Debian's package, else a download."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in (os.path.join(root, "FashionMNIST", "raw"), DEBIAN_FASHION_MNIST):
        for suffix in ("", ".gz"):
            paths = [os.path.join(folder, f + suffix) for f in names]
            if all(os.path.exists(p) for p in paths):
                print(f"fashion-mnist: reading {folder}", flush=True)
                arrays = [torch.from_numpy(files.read_idx(p).copy()) for p in paths]
                for images, labels, ip, lp in ((arrays[0], arrays[1], paths[0], paths[1]), (arrays[2], arrays[3], paths[2], paths[3])):
                    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                        raise UserError(f"{ip} holds {tuple(images.shape)} images but {lp} {tuple(labels.shape)} labels: "
                                        "one label per 2-D image is needed")
                return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]
    where = (f"{os.path.abspath(root)}/FashionMNIST/raw or {DEBIAN_FASHION_MNIST} (apt-get install "
             "dataset-fashion-mnist: Debian's package, offline)")
    if not download:
        raise UserError(f"fashion-mnist not found under {where} and downloads are off (--no-download)")
    import torchvision.datasets as tvd

    made = files.first_missing_folder(root)
    try:
        tr, te = (tvd.FashionMNIST(root, train=t, download=True) for t in (True, False))
    except (OSError, RuntimeError) as e:
        files.remove_made_folder(made)
        raise UserError(f"fashion-mnist: could not download it ({getattr(e, 'reason', None) or e}); put its four "
                        f"idx files under {where}") from None
    return tr.data[:, None], tr.targets, te.data[:, None], te.targets


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def scan_folder(path):
    """ImageFolder's layout, read safely: ([(file, class index)], class names). Class folders are the
    sorted subfolders of path; images anywhere below them, following links to folders but never into
    one twice (a link loop) nor into the split or another class, each a regular file (a FIFO would
    hang the read)."""
    try:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    except OSError as e:
        raise UserError(f"cannot list {path} ({e.strerror})") from None
    samples = []
    # Never entered through a link: the split folder and the class folders (images would change class).
    reals = [os.path.realpath(os.path.join(path, c)) for c in classes]
    for i, real in enumerate(reals):  # two class names for one folder: every image would be in both
        if real == os.path.realpath(path):
            raise UserError(f"class folder {os.path.join(path, classes[i])} is a link to its own split folder")
        if real in reals[:i]:
            other = classes[reals.index(real)]
            raise UserError(f"class folders {os.path.join(path, other)} and {os.path.join(path, classes[i])} are one "
                            "folder (a link): its images would have two labels")
    reserved = {os.path.realpath(path), *reals}
    for label, name in enumerate(classes):
        top, seen, found = os.path.join(path, name), set(), []
        for folder, subfolders, names in os.walk(top, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen or (folder != top and real in reserved):
                subfolders[:] = []  # a link back to where we have been (a loop), or into another class
                continue
            seen.add(real)
            subfolders.sort()
            for f in sorted(names):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    found.append(files.regular_file(os.path.join(folder, f), "image"))
        if not found:
            raise UserError(f"class folder {os.path.join(path, name)} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        samples += [(f, label) for f in found]
    return samples, classes


def decode_image(file, channels):
    """One image as an 8-bit PIL image of `channels` (1: "L", 3: "RGB"), its values decoded faithfully
    to [0, 1] first: 8-bit modes as PIL converts them (a grey image in a colour set is repeated over
    the channels), 16-bit as v / 65535, 32-bit integers the same if within 0..65535 (PIL reads some
    16-bit files so), floats as they are if within [0, 1]; anything else is refused, naming the file."""
    from PIL import Image

    img = Image.open(file)
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
                raise UserError(f"image {file} is a float image with values outside [0, 1]; convert it to 8 or 16 bits")
        elif arr.min() < 0 or arr.max() > 65535:
            raise UserError(f"image {file} holds 32-bit integers outside 0..65535; convert it to 8 or 16 bits")
        else:
            arr = arr / 65535
        img = Image.fromarray(np.round(arr * 255).astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


def load_folder(root, image_size):
    """Bring your own data: root/train/<class>/*.png and root/test/<class>/*.png.

    Every image is decoded faithfully to [0, 1] (decode_image) with one channel count for the whole
    set (3 if any image has colour, else 1). Refused, naming the culprit: fewer than two classes,
    a class folder without images, an image that cannot be read or is too large to decode, images
    of different sizes without --image-size, train and test class folders that differ."""
    from PIL import Image, UnidentifiedImageError

    splits = []
    for split in ("train", "test"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"folder dataset needs {os.path.abspath(path)} (ImageFolder layout: {split}/<class>/<image>); set --data-dir")
        samples, classes = scan_folder(path)
        if len(classes) < 2:
            raise UserError(f"{path} holds {len(classes)} class folder(s); a classifier needs at least 2")
        splits.append((samples, classes))
    if splits[0][1] != splits[1][1]:
        raise UserError(f"train and test class folders differ under {root}: {splits[0][1]} vs {splits[1][1]}")

    def read(file, how):
        try:
            return how(file)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            reason = "too large to decode safely" if isinstance(e, Image.DecompressionBombError) else type(e).__name__
            raise UserError(f"cannot read image {file} ({reason})") from None

    def header_mode(file):
        with Image.open(file) as img:
            return img.mode
    channels = 3 if any(read(f, header_mode) not in GRAY_MODES for samples, _ in splits for f, _ in samples) else 1
    out = []
    for samples, _ in splits:
        xs, ys = [], []
        for file, label in samples:
            img = read(file, lambda f: decode_image(f, channels))
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
            xs.append(torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()))
            ys.append(label)
        if len({x.shape for x in xs}) > 1:
            raise UserError(f"images under {root} differ in size; pass --image-size N to resize them")
        out += [torch.stack(xs), torch.tensor(ys)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise UserError(f"train images are {tuple(out[0].shape[1:])} but test images {tuple(out[2].shape[1:])}; pass --image-size N")
    return (*out, splits[0][1])


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
    if os.path.lexists(path):
        table = files.load_file(path, "nearest-neighbour cache")
        y = data.train_y.cpu()
        valid = torch.is_tensor(table) and table.layout == torch.strided and table.dtype == torch.long \
            and tuple(table.shape) == (n, c) and table.min() >= 0 and table.max() < n \
            and bool((y[table] == torch.arange(c)).all()) \
            and not bool(((table == torch.arange(n)[:, None]) & (y.bincount(minlength=c) > 1)).any())  # itself: only if alone
        if valid:  # and a sample of rows searched again: the table holds nearest neighbours, not just any
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:16]
            x = to_float(data.train_x.cpu()).flatten(1)
            fresh = nearest_of_class(data.train_x.cpu()[rows], data.train_x.cpu(), y, c, query_idx=rows)
            dist = lambda idx: (x[idx] - x[rows][:, None]).norm(dim=2)  # noqa: E731
            valid = bool(torch.allclose(dist(table[rows]), dist(fresh), atol=1e-4))
        if not valid:
            raise UserError(f"{path} is not a valid nearest-neighbour table for these {n} images; delete it")
        return table.to(data.train_x.device)
    files.atomic_write(path + ".probe", text="")  # fail now, not after the search, if the folder is not writable
    os.remove(path + ".probe")
    print(f"computing nearest neighbours of {n} training images (cached at {path})", flush=True)
    nn_idx = nearest_of_class(data.train_x, data.train_x, data.train_y, c, query_idx=torch.arange(n, device=data.train_x.device))
    files.atomic_write(path, nn_idx.cpu())
    return nn_idx


def make_source(name, data, cache_dir="cache", seed=0, sbg_file=None, split="train"):
    """Return gt_grad(x, target_classes, idx=None) -> [B, k, *input_shape] for images of `split`.

    x: un-augmented inputs [B, ...] in model space; target_classes [B, k];
    idx: their indices in data's `split` images ("train" or "test"): needed by `sbg`,
    whose file holds fields for that split's images; for training images it lets `nn`
    use the cached neighbours and exclude the image itself. Every representative comes
    from the training images; for other images (or without idx) `nn` searches them on the fly.
    """
    empty = (data.train_y.bincount(minlength=data.num_classes) == 0).nonzero().flatten().tolist()
    if empty and name in ("oi", "cm", "nn"):
        raise UserError(f"the {name} source needs training images of every class; none of class(es) {empty} "
                        f"among {len(data.train_y)} (more --train-samples)")
    if name == "oi":
        reps = to_float(data.train_x[one_image_per_class(data.train_y, data.num_classes, torch.Generator().manual_seed(seed))])
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "cm":
        reps = class_means(data.train_x, data.train_y, data.num_classes)
        return lambda x, target_classes, idx=None: reps[target_classes] - x[:, None]
    if name == "nn":
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
    obj = files.load_file(path, "sbg fields file")
    _, labels_here = data.split(split)
    n, c = len(labels_here), data.num_classes
    expected = (n, c, *data.input_shape)
    if isinstance(obj, dict) and obj.get("kind") == "sbg-fields":  # ours
        files.require(obj, {"fields": torch.Tensor, "dataset": str, "n": int, "labels": torch.Tensor,
                            "split": lambda v: v in ("train", "test")}, path, "sbg fields file")
        val_here = None if data.val_y is None else len(data.val_y)
        n_file, file_split = obj["n"], obj.get("split", "train")
        fits = file_split == split and obj["dataset"] == data.name and (
            n_file == n and obj.get("val_samples") == val_here and torch.equal(obj["labels"], labels_here.cpu())
            if split == "train" else n_file >= n and torch.equal(obj["labels"][:n], labels_here.cpu()))
        if not fits:
            raise UserError(f"{path} was exported for {n_file} {obj['dataset']} {file_split} images (train-samples "
                            f"{obj.get('train_samples')}, val-samples {obj.get('val_samples')}), not for these {n} "
                            f"{data.name} {split} images")
        files.require(obj, {"classes": lambda v: v is None or isinstance(v, list) and all(isinstance(c, str) for c in v)}
                      if "classes" in obj else {}, path, "sbg fields file")
        if obj["fields"].layout != torch.strided:
            raise UserError(f"{path}: its fields are a {obj['fields'].layout} tensor, not a dense one")
        if obj.get("classes") is not None and data.classes is not None and list(obj["classes"]) != list(data.classes):
            raise UserError(f"{path} holds fields for the classes {list(obj['classes'])}, in this order; the data's are "
                            f"{list(data.classes)}")
        fields = obj["fields"][:n]
    elif split != "train":
        raise UserError(f"{path}: the official release holds fields for training images only")
    else:  # the official release
        pair = isinstance(obj, (tuple, list)) and len(obj) == 2 and torch.is_tensor(obj[1]) and obj[1].dim() == 1
        images_and_fields, labels = obj if pair else (obj, None)
        if not (torch.is_tensor(images_and_fields) and images_and_fields.is_floating_point()
                and images_and_fields.layout == torch.strided
                and tuple(images_and_fields.shape) == (n, 1 + c, *data.input_shape)):
            got = f"{images_and_fields.dtype} {tuple(images_and_fields.shape)}" if torch.is_tensor(images_and_fields) \
                else type(obj).__name__
            raise UserError(f"{path}: expected an sbg.py export or an official tensor of shape {(n, 1 + c, *data.input_shape)}, got {got}")
        images = (images_and_fields[:, 0].float() + 1) / 2
        if (images - to_float(data.train_x.cpu())).abs().amax() > 1.5 / 255 or \
                (labels is not None and not torch.equal(labels.long(), data.train_y.cpu())):
            raise UserError(f"{path}: its images or labels are not this run's {n} {data.name} training images in order")
        fields = images_and_fields[:, 1:]
    if tuple(fields.shape) != expected or fields.dtype not in (torch.float16, torch.float32, torch.bfloat16, torch.float64) \
            or fields.layout != torch.strided:
        raise UserError(f"{path}: expected dense float fields of shape {expected}, got {fields.dtype} {tuple(fields.shape)}")
    if not bool(torch.isfinite(fields).all()):
        raise UserError(f"{path} holds fields that are not finite (exported from a diverged denoiser?)")
    images, _ = data.split(split)
    check_field_content(fields, images[:n].cpu(), data.train_x.cpu(), data.train_y.cpu(), c, path)
    return fields


def best_order(scores):
    """A class order that scores higher than the identity where one exists: pairwise swaps from the
    identity while they gain (scores[t, u]: how well the field in slot t fits class u)."""
    order, gained = list(range(len(scores))), True
    while gained:
        gained = False
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                gain = scores[a, order[b]] + scores[b, order[a]] - scores[a, order[a]] - scores[b, order[b]]
                if gain > 1e-9:
                    order[a], order[b], gained = order[b], order[a], True
    return order


def check_field_content(fields, images, train_x, train_y, num_classes, path, sample=256):
    """Refuse fields that pass every schema but would train nonsense:
    - zero fields, or fields too small for the cosine's eps (the PAG term is then a constant): counted, per class;
    - fields whose classes are in another order than the dataset's, where a cheap statistic can see it:
      on a fixed sample of the images, S[t, u] = mean cos(field of slot t minus the image's mean field,
      class u's mean training image minus the mean of the class means). Fields that encode their classes
      strongly (the best class order scores >= 0.35 above a random order's) must have each slot fit its own
      class: a reordering that lifts a slot's fit by more than max(0.15, 0.3 x that signal) is refused.
      Measured on Fashion-MNIST: the committed denoiser's test fields have signal 0.47 with the identity the
      best order, and a swap of two classes lifts them by 0.26 and 0.40 (refused); a 1-epoch denoiser's
      fields (signal 0.24) and a 1-epoch one on synthetic data (0.11) are too weak to be checked this way.
      (`sbg.py export` files also name their classes, checked exactly in load_sbg_file.)"""
    norms = torch.cat([fields[s: s + 1024].float().flatten(2).norm(dim=2) for s in range(0, len(fields), 1024)])  # [N, C]
    # Zero for the cosine: below its own eps (1e-12, for gradients of norm ~1), or a millionth of the file's typical field.
    zero = (norms < 1e-12) | (norms < 1e-6 * norms.median())
    if bool(zero.any()):
        per_class = zero.sum(0).tolist()
        named = ", ".join(f"class {t}: {k}" + (" (all)" if k == len(fields) else "") for t, k in enumerate(per_class) if k)
        raise UserError(f"{path}: {int(zero.sum())} of {zero.numel()} fields are zero or nearly ({named} of {len(fields)} "
                        "images); such a field has no direction to align with")
    pick = torch.randperm(len(fields), generator=torch.Generator().manual_seed(0))[:max(16, min(sample, 25_600 // num_classes))]
    f = fields[pick].float().flatten(2)
    f = F.normalize(f - f.mean(1, keepdim=True), dim=2)  # [n, C, P]: what sets each class's field apart
    means = class_means(train_x, train_y, num_classes).flatten(1)
    toward = F.normalize(means - means.mean(0), dim=1)  # [C, P]
    scores = torch.einsum("icp,up->icu", f, toward).mean(0)  # [C, C]
    order = best_order(scores)
    best = scores[torch.arange(num_classes), torch.tensor(order)].mean().item()
    signal = best - scores.mean().item()
    if signal < 0.35:
        return
    lifts = {t: (scores[t, u] - scores[t, t]).item() for t, u in enumerate(order) if u != t}
    bad = {t: lift for t, lift in lifts.items() if lift > max(0.15, 0.3 * signal)}
    if bad:
        shown = ", ".join(f"slot {t} fits class {order[t]} (+{lift:.2f})" for t, lift in list(bad.items())[:4])
        raise UserError(f"{path}: its fields look like classes in another order than the dataset's ({shown}; "
                        "the cosine of each field with the way toward the class means): check the file's class order")
