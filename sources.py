"""The ground-truth perceptually aligned gradients: g(x, t) for an image x and a target class t (the paper, sec. 3).

For the heuristic sources g(x, t) = r_t(x) - x:
  oi  r_t = one fixed random training image of class t
  cm  r_t = the mean training image of class t
  nn  r_t = the L2-nearest training image of class t, never x itself
  sbg precomputed score-based fields from a file (sbg.py export, or the official release: load_sbg_file)
Only the direction of g matters (PAG compares by cosine). make_source gives any of them as one function.
"""
import hashlib
import os

import torch
import torch.nn.functional as F

import files
from data import to_float
from files import UserError

SOURCES = ("oi", "cm", "nn", "sbg")


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
        fields, sha256 = load_sbg_file(sbg_file, data, split, with_sha256=True)

        def gt_sbg(x, target_classes, idx=None):
            if idx is None:
                raise UserError(f"the sbg source needs the images' indices in the {split} split")
            return fields[idx.cpu()[:, None], target_classes.cpu()].to(target_classes.device, torch.float32)
        gt_sbg.file_sha256 = sha256  # of the bytes the fields were loaded from (a checkpoint records it)
        return gt_sbg
    raise UserError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")


def load_sbg_file(path, data, split="train", with_sha256=False):
    """Score-based fields [N, C, *input_shape] for exactly data's training set, or for its (first N)
    test images with split="test" (float16 is fine).

    Reads `sbg.py export` files (checked by split, dataset, count, held-out validation images and
    labels) and the official PAG-ROB release (training images only): a tensor (N, 1+C, channels,
    H, W) holding each image (in [-1, 1]) and then one field per class, alone or as (tensor,
    labels). For the latter, the images themselves are compared with ours, so another order or
    subset is refused. with_sha256: (fields, sha256 of the bytes they were loaded from).
    """
    obj, sha256 = files.load_file(path, "sbg fields file", with_sha256=True)
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
    return (fields, sha256) if with_sha256 else fields


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
