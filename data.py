"""Datasets and per-sample augmentation (the ground-truth sources are sources.py's).

Every dataset is held in memory as tensors (images as uint8 [N, C, H, W], the toy as float [N, 2]); the
training loop indexes them directly, so a batch is (x, y, index) and sources can look up per-sample targets
by index. Subsets of data stored class by class are fair samples of its classes (subset_indices), and each
split is named by its content (Data.sha256), so a checkpoint can refuse data that changed since.
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import files
from files import UserError


# Facts about each dataset (the flags' defaults are the scripts': train_baseline.TRAINING_DEFAULTS, train_pag's).
# eps_l2, eps_linf: the radii a model of it is attacked at by default (the paper's for CIFAR and STL).
# drop_last: the official image loader drops the last partial batch; the toy's public re-run keeps it (47 steps
# of 6,000 points at batch 128). dtype and threads: the toy trains and is evaluated in float64 on one thread,
# whatever OMP_NUM_THREADS says, because its training is chaotic: a last-bit difference of a float32 kernel
# (another thread count or CPU) re-draws the outcome (bench/NOTES.md, "The 2-D toy: how it runs").
# order: how a split is stored. "shuffled" (the CIFAR, STL and Fashion-MNIST files, synthetic's interleaved
# classes): a subset is its first N images. "by class" (a folder is read class by class, the toy drawn mode by
# mode): a subset is the first N of a fixed class-interleaved order (fair_order), never one class.
_IMAGES = dict(eps_l2=0.5, eps_linf=8 / 255, drop_last=True, dtype="float32", threads=None, order="shuffled")
DATASETS = {
    "cifar10": dict(_IMAGES, num_classes=10),
    "cifar100": dict(_IMAGES, num_classes=100),
    "stl10": dict(_IMAGES, num_classes=10),
    "fashion-mnist": dict(_IMAGES, num_classes=10, eps_l2=1.5, eps_linf=0.1),
    "folder": dict(_IMAGES, num_classes=None, order="by class"),
    "synthetic": dict(_IMAGES, num_classes=10),
    "toy": dict(_IMAGES, num_classes=2, eps_l2=15.0, eps_linf=5.0, drop_last=False, dtype="float64", threads=1, order="by class"),
}
ALIASES = {"stl": "stl10", "cifar-10": "cifar10", "cifar-100": "cifar100", "fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    "fashion-mnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`


def dataset_dtype(name):
    """The precision a dataset's models train and are evaluated in (data.DATASETS: float64 for the toy)."""
    return getattr(torch, DATASETS[name]["dtype"])


def use_dataset_precision(name):
    """The toy's one thread (data.DATASETS "threads"): the same numbers whatever OMP_NUM_THREADS says."""
    if DATASETS[name]["threads"]:
        torch.set_num_threads(DATASETS[name]["threads"])


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
    sha256: dict = None  # {"train", "test"}: content hash of each whole split as loaded (content_sha256), and
    # "train_used": of the training images and labels a run trains on (after --val-samples and --train-samples)
    origin: str = None  # where it was read from (a folder's path), for messages

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
    sha256["train_used"] = content_sha256(train_x, train_y)
    return Data(name, train_x, train_y.long(), test_x, test_y.long(), num_classes, classes, val_x, val_y, sha256,
                os.path.abspath(data_dir) if name == "folder" else None)


def content_sha256(x, y):
    """sha256 of a split's images (or points) and labels, as stored: what it is, whatever its path."""
    h = hashlib.sha256()
    for t in (x, y.long()):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fair_order(labels):
    """A fixed order of a split stored class by class in which every prefix is a fair sample of the
    classes: each class's images in a fixed random order (seed 0), interleaved by where an image falls in its
    class, so that the first n hold every class in proportion to its size: within one image when the classes
    are of one size, within 0.5 + C * p / 2 images for a class of share p in general (C classes). Stable: the
    same labels, the same order."""
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
    if not classes:
        return "per class " + ", ".join(map(str, counts)) + f" (classes 0-{num_classes - 1})"
    return "per class " + ", ".join(f"{n} {c}" for c, n in zip(classes, counts))


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
