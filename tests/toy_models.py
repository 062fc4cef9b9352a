"""Small models that exercise one analysis case each (importable as ``toy_models:<name>``)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ToyCNN(nn.Module):
    """stem -> 3 residual blocks -> depthwise -> 1x1 -> grouped conv -> concat of two branches -> GroupNorm -> head."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.stage = nn.Sequential(Block(c), Block(c), Block(c))
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 1, groups=4)
        self.branch_a = nn.Conv2d(2 * c, c, 1)
        self.branch_b = nn.Conv2d(2 * c, c, 1)
        self.gn = nn.GroupNorm(4, 2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def example_inputs(self):
        return (torch.randn(1, 1, 8, 8),)

    def forward(self, x):
        x = self.stage(self.stem(x))
        x = self.grouped(torch.relu(self.expand(torch.relu(self.dw(x)))))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.gn(x)
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        if x.sum() > 0:  # not traceable by torch.fx
            return self.lin(x)
        return -self.lin(x)


class WithUntraceable(nn.Module):
    """An MLP with an untraceable submodule in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.odd = DataDependent(32)
        self.fc3 = nn.Linear(32, 64)
        self.fc4 = nn.Linear(64, 4)

    def example_inputs(self):
        return (torch.randn(2, 8),)

    def forward(self, x):
        x = self.odd(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return self.fc4(torch.relu(self.fc3(x)))


class LoopOverBatch(nn.Module):
    """torch.fx cannot trace the Python loop over the batch; torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def example_inputs(self):
        return (torch.randn(3, 8),)

    def forward(self, x):
        rows = [self.fc2(torch.relu(self.fc1(x[i : i + 1]))) for i in range(x.shape[0])]
        return torch.cat(rows, 0)


class NothingElastic(nn.Module):
    """A single linear layer: its input and output are the model's, so nothing can shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def example_inputs(self):
        return (torch.randn(2, 8),)

    def forward(self, x):
        return self.fc(x)


class HardCodedReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def example_inputs(self):
        return (torch.randn(2, 8),)

    def forward(self, x):
        return self.fc2(self.fc1(x).view(-1, 32))


class TracedAttention(nn.Module):
    """Self-attention written out in user code: head size computed from a size read off the input."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(8, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))
        self.out = nn.Linear(d, 3)

    def example_inputs(self):
        return (torch.randn(2, 10, 8),)

    def attend(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, T, D))

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attend(x)
        x = x + self.ff(x)
        return self.out(x.mean(1))


class FunctionalBlock(nn.Module):
    """A transformer block in functional code: fused attention (or einsums) and an MLP of bare parameter matmuls."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64, einsum: bool = False) -> None:
        super().__init__()
        self.heads, self.d, self.einsum = heads, d, einsum
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.w1 = nn.Parameter(torch.randn(d, hidden) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, d) / hidden**0.5)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, self.d // self.heads).permute(2, 0, 3, 1, 4)
        if self.einsum:
            a = torch.einsum("bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1), v)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, self.d))
            return x + torch.einsum("btf,fd->btd", torch.relu(torch.einsum("btd,df->btf", x, self.w1)), self.w2)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, self.d))
        return x + torch.relu(x @ self.w1) @ self.w2


class FunctionalTransformer(nn.Module):
    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.Sequential(*[FunctionalBlock(einsum=einsum) for _ in range(3)])
        self.out = nn.Linear(32, 3)

    def example_inputs(self):
        return (torch.randn(2, 10, 8),)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)).mean(1))


class TorchEncoder(nn.Module):
    """PyTorch's own ``nn.TransformerEncoder``, pre-norm or post-norm (the default)."""

    def __init__(self, norm_first: bool = True, layers: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.inp = nn.Linear(8, 32)
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(32) if norm_first else None,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(32, 3)

    def example_inputs(self):
        return (torch.randn(2, 10, 8),)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


class TorchSeq2Seq(nn.Module):
    """PyTorch's ``nn.Transformer`` (encoder and decoder stacks, pre-norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.tr = nn.Transformer(32, 4, 2, 3, 48, dropout=0.1, batch_first=True, norm_first=True)
        self.out = nn.Linear(32, 5)

    def example_inputs(self):
        return (torch.randn(2, 10, 8), torch.randn(2, 6, 8))

    def forward(self, src, tgt):
        return self.out(self.tr(self.inp(src), self.inp(tgt)))


@torch.fx.wrap
def window_mix(x, weight):
    """Kept whole by torch.fx (as torchvision's ``shifted_window_attention``)."""
    return x @ weight @ weight.T


class KeywordsAndWrapped(nn.Module):
    """``F.linear`` with keyword arguments (timm's BEiT) and a ``torch.fx.wrap``-ped function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.mix = nn.Parameter(torch.randn(32, 16) / 4)
        self.fc2 = nn.Linear(32, 64)
        self.fc3 = nn.Linear(64, 3)

    def example_inputs(self):
        return (torch.randn(2, 8),)

    def forward(self, x):
        h = nn.functional.linear(x, weight=self.fc1.weight, bias=self.fc1.bias)
        h = window_mix(h, self.mix)
        return self.fc3(torch.relu(self.fc2(h)))


class GatedMLP(nn.Module):
    """A SwiGLU feed-forward block in user code: one projection chunked into gate and value halves."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 2 * 48)
        self.fc2 = nn.Linear(48, 16)
        self.out = nn.Linear(16, 3)

    def example_inputs(self):
        return (torch.randn(4, 8),)

    def forward(self, x):
        x = self.inp(x)
        gate, value = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(nn.functional.silu(gate) * value)
        return self.out(x)


class SwinLikeBlock(nn.Module):
    """timm's Swin block pattern: the second branch is added to a flattened view, then reshaped back."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.norm1, self.mix = nn.LayerNorm(c), nn.Linear(c, c)
        self.norm2, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 32), nn.GELU(), nn.Linear(32, c))

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.mix(self.norm1(x))
        x = x.reshape(B, -1, C)
        x = x + self.mlp(self.norm2(x))
        return x.reshape(B, H, W, C)


class SwinLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 16)
        self.blocks = nn.Sequential(*[SwinLikeBlock() for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def example_inputs(self):
        return (torch.randn(2, 4, 4, 3),)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((1, 2)))


class LoopOverBatchCNN(nn.Module):
    """Conv + BatchNorm layers under a Python loop over the batch: only torch.export traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def example_inputs(self):
        return (torch.randn(2, 3, 8, 8),)

    def forward(self, x):
        outs = []
        for i in range(x.shape[0]):
            h = torch.relu(self.bn1(self.conv1(x[i : i + 1])))
            h = torch.relu(self.bn2(self.conv2(h)))
            outs.append(self.fc(h.mean((2, 3))))
        return torch.cat(outs, 0)


class DigitsResNet(nn.Module):
    """A small ResNet-style CNN with BatchNorm for scikit-learn's 8x8 digits (SortedNet Table 1 at small scale).

    stem (1 -> c) -> 2 residual blocks at c -> strided conv to 2c -> 2 residual blocks at 2c -> pool -> linear.
    """

    def __init__(self, c: int = 32, classes: int = 10, blocks: int | tuple[int, int] = 2) -> None:
        super().__init__()
        b1, b2 = (blocks, blocks) if isinstance(blocks, int) else blocks
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stage1 = nn.Sequential(*[Block(c) for _ in range(b1)])
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU())
        self.stage2 = nn.Sequential(*[Block(2 * c) for _ in range(b2)])
        self.fc = nn.Linear(2 * c, classes)

    def example_inputs(self):
        return (torch.randn(2, 1, 8, 8),)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class DigitsTransformer(nn.Module):
    """A pre-norm ``nn.TransformerEncoder`` over the 8 rows of a digits image (8 tokens of 8 pixels)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.enc(self.inp(x.reshape(x.shape[0], 8, 8)) + self.pos).mean(1))


def digits(seed: int = 0, test_fraction: float = 1 / 3):
    """scikit-learn's bundled digits as ``(x_train, y_train, x_test, y_test)`` tensors, ``x`` of shape (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class PosBlock(nn.Module):
    """A residual block that takes a second argument (so a dropped block is removed from its list)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x, scale):
        return x + scale * self.fc(x)


class SegmentStage(nn.Module):
    """timm Twins' pattern: a position encoding after the first block of the list, so the depth
    stage is the segment ``blocks[1:4]``, and a token-mixing ``Linear`` over ``(B, C, N)`` (ResMLP)."""

    def __init__(self, c: int = 16, tokens: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(4, c)
        self.blocks = nn.ModuleList(PosBlock(c) for _ in range(4))
        self.pos = nn.Linear(c, c)
        self.mix = nn.Linear(tokens, tokens)
        self.out = nn.Linear(c, 3)

    def example_inputs(self):
        return (torch.randn(2, 6, 4),)

    def forward(self, x):
        x = self.inp(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, 0.5)
            if i == 0:
                x = self.pos(x)
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.out(x).mean(1)


class FixedReshape(nn.Module):
    """Reads its full width from an attribute in forward, so narrower outputs cannot run (a rule that
    claims its outputs are elastic is caught by the smallest-sub-network check)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.n = 16

    def forward(self, x):
        return self.lin(x).reshape(x.shape[0], self.n)


def digit_folder(folder, n: int) -> None:
    """The first ``n`` training digits of :func:`digits` as PNGs in ``folder``, one sub-folder per class."""
    from PIL import Image

    x, y, _, _ = digits()
    for i in range(n):
        cls = folder / str(int(y[i]))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8"), mode="L").save(cls / f"{i}.png")
