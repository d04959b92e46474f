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


class Normalize(nn.Module):
    """[0, 1] pixels -> [-1, 1], the first layer of every image model."""

    def forward(self, x):
        return (x - 0.5) / 0.5


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
    """CIFAR ResNet-18 (3x3 stem, no max-pool), as in the official code.

    Adaptive average pooling instead of a fixed 4x4 pool lets the same network
    run on 28, 64 or 96 px inputs; on 32 px it is the same operation.
    """

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ----------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # Explicit softmax(QK^T / sqrt(d_head)) V: double-differentiable on every backend.
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim, mlp_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        # ViT-CIFAR (the repository the paper used) puts a GELU after *both* MLP
        # layers; kept so that trained behaviour matches the paper's model.
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim), nn.GELU())

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-CIFAR: an 8x8 grid of patches plus a class token, pre-norm encoder.

    The patch size follows the image size (4 px at 32, 12 px at 96), so every
    size gives 65 tokens; only the patch embedding grows with the patch.
    """

    def __init__(self, num_classes=10, in_channels=3, image_size=32, grid=8, depth=7, dim=384, mlp_dim=384, heads=12):
        super().__init__()
        if image_size % grid:
            raise ValueError(f"vit needs an image size divisible by {grid}, got {image_size}")
        self.normalize = Normalize()
        self.patch = image_size // grid
        self.embed = nn.Linear(in_channels * self.patch ** 2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.layers = nn.Sequential(*[EncoderLayer(dim, mlp_dim, heads) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        x = self.normalize(x)
        b, c, p = x.shape[0], x.shape[1], self.patch
        # [B, C, H, W] -> [B, gh, gw, C, p, p] -> [B, gh*gw, C*p*p]
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos_embed
        return self.head(self.layers(tokens)[:, 0])


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


def mlp(num_classes=2, in_features=2, hidden=32):
    """The toy's classifier, 2 -> 32 -> ReLU -> C, on raw coordinates (no normalisation)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def build_model(arch, num_classes, in_channels, image_size):
    """Build `arch` for inputs [B, in_channels, image_size, image_size].

    For `mlp` the input is a flat vector [B, in_channels] (the toy's 2-D points)
    and image_size is ignored.
    """
    if arch == "resnet18":
        return ResNet18(num_classes, in_channels)
    if arch == "vit":
        return ViT(num_classes, in_channels, image_size)
    if arch == "cnn":
        return SmallCNN(num_classes, in_channels)
    if arch == "mlp":
        return mlp(num_classes, in_channels)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
