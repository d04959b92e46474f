"""Every architecture of the project, and one `build_model` that makes them.

Image models take pixels in [0, 1] and normalise inside themselves, so attacks,
AutoAttack and the PAG gradients all live in pixel space with a [0, 1] box.
Normalisation maps [0, 1] to [-1, 1] (mean 0.5, std 0.5 per channel): the
official PAG-ROB code and its score-based targets use that range, and a fixed
map keeps checkpoints independent of dataset statistics.

Everything here must support double back-propagation (PAG differentiates an
input-gradient with respect to the weights), which is why the ViT spells its
attention out instead of calling a fused kernel (flash attention on CUDA has
no double backward).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("resnet18", "vit", "cnn", "mlp")


PIXEL_MEAN = PIXEL_STD = 0.5  # the official code's normalisation: (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]


class Normalize(nn.Module):
    """[0, 1] pixels -> [-1, 1], the first layer of every image model (so a pixel of PIXEL_MEAN is the
    model's 0: the value the official code's crop pads with)."""

    def forward(self, x):
        return (x - PIXEL_MEAN) / PIXEL_STD


# ----------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool): the official models/resnet.py's function, with its
    parameter names (conv1, bn1, layer1..layer4, linear), so its checkpoints load as they are.

    Adaptive average pooling (as the official code) runs the same network on 28, 64 or 96 px inputs.
    """

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ----------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """The official MultiHeadSelfAttention: softmax(Q K^T / sqrt(dim)) V per head.

    The scale is sqrt of the WIDTH (384), not of the per-head size (32) of Vaswani et al.:
    that is the official models/vit_layers.py (sqrt_d = feats ** 0.5), so it is the paper's
    model; its attention logits are sqrt(12) = 3.5x softer than the textbook scale's.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, math.sqrt(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # Spelled out, not a fused kernel: double-differentiable on every backend.
        att = torch.softmax(q @ k.transpose(-2, -1) / self.scale, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-norm block of the official TransformerEncoder (names la1, msa, la2, mlp as there)."""

    def __init__(self, dim, mlp_dim, heads):
        super().__init__()
        self.la1 = nn.LayerNorm(dim)
        self.msa = Attention(dim, heads)
        self.la2 = nn.LayerNorm(dim)
        # ViT-CIFAR (the repository the paper used) puts a GELU after *both* MLP layers. The
        # Identity layers stand where its dropout (p = 0) is, so the linears keep its indices 0 and 3.
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Identity(), nn.Linear(mlp_dim, dim), nn.GELU(),
                                 nn.Identity())

    def forward(self, x):
        x = x + self.msa(self.la1(x))
        return x + self.mlp(self.la2(x))


class ViT(nn.Module):
    """The official ViT (ViT-CIFAR): an 8x8 grid of patches plus a class token, 7 pre-norm layers,
    width 384, 12 heads; parameter names as in the official models/ViT.py (emb, cls_token,
    pos_emb, enc, fc), so its checkpoints load as they are.

    The patch size follows the image size (4 px at 32, 12 px at 96), so every size gives
    65 tokens; only the patch embedding grows with the patch.
    """

    def __init__(self, num_classes=10, in_channels=3, image_size=32, grid=8, depth=7, dim=384, mlp_dim=384, heads=12):
        super().__init__()
        if image_size % grid:
            raise ValueError(f"vit needs an image size divisible by {grid}, got {image_size}")
        self.normalize = Normalize()
        self.patch = image_size // grid
        self.emb = nn.Linear(in_channels * self.patch ** 2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.enc = nn.Sequential(*[EncoderLayer(dim, mlp_dim, heads) for _ in range(depth)])
        self.fc = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        x = self.normalize(x)
        b, c, p = x.shape[0], x.shape[1], self.patch
        # [B, C, H, W] -> [B, gh, gw, p, p, C] -> [B, gh*gw, p*p*C]: each patch flattened as
        # (row, column, channel), the official _to_words order, which its `emb` weights expect.
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(b, -1, p * p * c)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.emb(patches)], dim=1) + self.pos_emb
        return self.fc(self.enc(tokens)[:, 0])


# ----------------------------------------------------------------------------- small models
class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head: Fashion-MNIST in minutes on 2 CPU cores."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(self.normalize(x)))


class Standardize(nn.Module):
    """(x - mean) / std per coordinate, mean and std fixed from the training points (buffers, saved with the
    weights), so that attacks and radii stay in raw coordinates. Identity until set."""

    def __init__(self, in_features):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    def forward(self, x):
        return (x - self.mean) / self.std


def mlp(num_classes=2, in_features=2, hidden=32, standardize=False):
    """The toy's classifier, 2 -> 32 -> ReLU -> C, on raw coordinates (no normalisation, as the paper and its
    public re-run), or on standardised ones (standardize=True: a Standardize layer first)."""
    layers = [nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*([Standardize(in_features)] if standardize else []), *layers)


def build_model(arch, num_classes, in_channels, image_size, standardize=False):
    """Build `arch` for inputs [B, in_channels, image_size, image_size].

    For `mlp` the input is a flat vector [B, in_channels] (the toy's 2-D points)
    and image_size is ignored; standardize puts a Standardize layer first (mlp only).
    """
    if standardize and arch != "mlp":
        raise ValueError("standardize is for the mlp on points; image models normalise inside already")
    if arch == "resnet18":
        return ResNet18(num_classes, in_channels)
    if arch == "vit":
        return ViT(num_classes, in_channels, image_size)
    if arch == "cnn":
        if image_size is not None and image_size < 4:  # a 1-pixel map cannot be pooled again
            raise ValueError(f"the cnn halves its images twice (max-pooling): it needs at least 4 px, got {image_size}")
        return SmallCNN(num_classes, in_channels)
    if arch == "mlp":
        return mlp(num_classes, in_channels, standardize=standardize)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------- the authors' released checkpoints
def official_state_dict(obj):
    """The state dict inside an official PAG-ROB file: torch.save(model.state_dict()) of a DataParallel
    model (keys "module.…"), also without that prefix or wrapped as {"state_dict": …} / {"model": …}."""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "model_state_dict", "net"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ValueError("not a state dict of tensors (nor one wrapped as {'state_dict': ...})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def from_official(obj, image_size=32):
    """The project's model computing the function of an official checkpoint (ResNet-18 or ViT, the
    architecture recognised from the keys), for [0, 1] pixels: the official models take [-1, 1]
    images (their code normalises with mean = std = 0.5), ours normalise inside, so the converted
    model is evaluated in pixel space like every other. Parameter names are the official ones and
    the ViT flattens patches in the official (row, column, channel) order, so the weights load as
    they are. Every key and shape is checked (nothing dropped, nothing left at its random
    initialisation) and every value must be finite: else ValueError. Depends only on torch.
    image_size: the ResNet's input side (its weights do not fix it); a ViT's follows from its patch."""
    state = official_state_dict(obj)

    def size(key, dim, ndim):
        """state[key].shape[dim], the tensor checked to have ndim dimensions (a missing key: ValueError)."""
        if key not in state:
            raise ValueError(f"missing {key!r}, which the official {arch} has")
        if state[key].dim() != ndim:
            raise ValueError(f"{key} is {tuple(state[key].shape)}, the official {arch} has a {ndim}-D tensor there")
        return state[key].shape[dim]
    if "linear.weight" in state and "layer1.0.conv1.weight" in state:
        arch = "resnet18"
        num_classes, in_channels = size("linear.weight", 0, 2), size("conv1.weight", 1, 4)
    elif "emb.weight" in state and "enc.0.msa.q.weight" in state:
        arch = "vit"
        num_classes, in_channels = size("fc.1.weight", 0, 2), 3  # the official ViT has 3 channels
        patch = math.isqrt(size("emb.weight", 1, 2) // 3)
        if patch * patch * 3 != state["emb.weight"].shape[1]:
            raise ValueError(f"emb.weight of shape {tuple(state['emb.weight'].shape)} is no patch embedding of 3-channel patches")
        image_size = 8 * patch
    else:
        raise ValueError(f"neither the official ResNet-18 nor the official ViT (keys such as {sorted(state)[:3]})")
    model = build_model(arch, num_classes, in_channels, image_size)
    problem = weights_problem(model, state, same_dtype=False)
    if problem:
        raise ValueError(f"this is not the official {arch}'s: {problem}")
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def weights_problem(model, state, same_dtype=True):
    """What keeps the state dict `state` from being `model`'s weights, as one phrase, or None: exactly its
    keys, each a dense tensor of its shape and dtype (same_dtype=False: any real dtype of the same kind, to be
    converted), every floating value finite (in the model's dtype). The one check of weights: loading a
    checkpoint or an official file, and a training epoch's end (divergence)."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return "the weights do not fit the model: " + ", ".join(
            ([f"missing {len(missing)} (e.g. {missing[0]!r})"] if missing else []) +
            ([f"unexpected {len(extra)} (e.g. {extra[0]!r})"] if extra else []))
    for key, want in expected.items():
        got = state[key]
        if not torch.is_tensor(got) or got.layout != torch.strided:
            return f"weight {key!r} is not a dense tensor"
        fits = got.dtype == want.dtype if same_dtype else \
            got.is_floating_point() == want.is_floating_point() and not got.is_complex()
        if tuple(got.shape) != tuple(want.shape) or not fits:
            return f"weight {key!r} is {got.dtype} {tuple(got.shape)}, the model needs {want.dtype} {tuple(want.shape)}"
    floats = [v.to(expected[k].dtype) for k, v in state.items() if v.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
        bad = next(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v.to(expected[k].dtype)).all()))
        return f"weights are not finite (e.g. {bad!r}; a diverged run?)"
    return None
