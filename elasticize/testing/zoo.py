"""One tiny model per built-in rule, with its example inputs, for :func:`elasticize.testing.check_rule`.

Each entry builds in well under a second with random weights (no download). Register a model for
your own rule with :func:`zoo_model`, so the conformance suite covers it::

    @zoo_model("scaled_linear")
    def _tiny_mlp():
        return TinyMLP().eval(), (torch.randn(4, 16),)

Entries that need timm or torchvision import them when built; :func:`build` raises
``ModuleNotFoundError`` when the library is not installed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import _registry

__all__ = ["zoo_model", "build", "registered", "CHECK_OPTIONS", "TinyYOLO", "tiny_yolo"]

Entry = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
_ZOO: dict[str, Entry] = {}
#: per rule, options for :func:`~elasticize.testing.check_rule` (FlopCounterMode counts no LSTM MACs)
CHECK_OPTIONS: dict[str, dict] = {"rnn": {"check_macs": False}, "tac": {"check_macs": False}}


def zoo_model(rule: str) -> Callable[[Entry], Entry]:
    """Register ``fn() -> (model, example_inputs)`` as the tiny model of rule ``rule``.

    Raises:
        ValueError: ``rule`` already has a zoo model.
    """

    def deco(fn: Entry) -> Entry:
        if rule in _ZOO:
            raise ValueError(f"rule {rule!r} already has a zoo model ({_ZOO[rule].__name__}); a rule has one")
        _ZOO[rule] = fn
        return fn

    return deco


def registered() -> dict[str, Entry]:
    """Rule name -> its zoo model's builder."""
    return dict(_ZOO)


def build(rule: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The tiny model of ``rule`` and its example inputs, seeded.

    Raises:
        KeyError: no zoo model for ``rule`` (the message lists the rules that have one).
    """
    fn = _registry.get(_ZOO, "zoo model", rule)
    torch.manual_seed(0)
    model, inputs = fn()
    return model.eval(), inputs


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


class _Block(nn.Module):
    """Conv-BN-ReLU-Conv-BN with a residual add: ``(batch, c, h, w) -> (batch, c, h, w)``."""

    def __init__(self, c: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.n2(self.conv2(torch.relu(self.n1(self.conv1(x)))))


class _CNN(nn.Module):
    """Stem, two residual blocks, pooled linear head: ``(batch, 3, 16, 16) -> (batch, 5)``."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm(16), nn.ReLU())
        self.blocks = nn.Sequential(_Block(16, norm), _Block(16, norm))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _MLP(nn.Module):
    """Two pre-norm residual MLP blocks: ``(batch, 12) -> (batch, 4)``."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16) if norm else nn.Identity(), nn.Linear(16, 32),
                                                  nn.GELU(), nn.Linear(32, 16)) for _ in range(2))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class _Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> per-token linear: ``(batch, seq)`` ids -> ``(batch, seq, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.rnn = nn.LSTM(8, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])


class _Attention(nn.Module):
    """Linear, then a post-norm ``nn.MultiheadAttention`` block: ``(batch, seq, 8) -> (batch, seq, 6)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.out(self.norm(x + self.attn(x, x, x, need_weights=False)[0]))


@zoo_model("conv")
@zoo_model("batchnorm")
def _cnn_bn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _CNN(nn.BatchNorm2d), (_x(2, 3, 16, 16),)


@zoo_model("groupnorm")
def _cnn_gn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _CNN(lambda c: nn.GroupNorm(4, c)), (_x(2, 3, 16, 16),)


@zoo_model("instancenorm")
def _cnn_in() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _CNN(lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True)), (_x(2, 3, 16, 16),)


@zoo_model("linear")
def _mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _MLP(norm=False), (_x(4, 12),)


@zoo_model("layernorm")
def _mlp_ln() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _MLP(norm=True), (_x(4, 12),)


@zoo_model("embedding")
def _embedding() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    return model, (torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0)),)


@zoo_model("rnn")
def _tagger() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _Tagger(), (torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0)),)


@zoo_model("multihead_attention")
def _mha() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return _Attention(), (_x(2, 5, 8),)


@zoo_model("tac")
def _tac() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from ..tac import ResidualRNN

    model = nn.Sequential(nn.Linear(6, 12), ResidualRNN(12, 10, 4), ResidualRNN(12, 10, 4), nn.Linear(12, 5))
    return model, (_x(2, 7, 6),)


@zoo_model("timm_attention")
def _timm_vit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5), \
        (_x(2, 3, 32, 32),)


@zoo_model("timm_window_attention")
def _timm_swin() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                           num_classes=5), (_x(2, 3, 32, 32),)


@zoo_model("torchvision_window_attention")
def _torchvision_swin() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from torchvision.models import swin_transformer as tv

    return tv.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              num_classes=5), (_x(2, 3, 40, 40),)


@zoo_model("timm_beit_attention")
def _timm_beit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                use_rel_pos_bias=True), (_x(2, 3, 32, 32),)


@zoo_model("timm_eva_attention")
def _timm_eva() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from timm.models.eva import Eva

    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5), (_x(2, 3, 32, 32),)


# -- a YOLO-style detector (YOLOv8's blocks: Conv-BN-SiLU, C2f, SPPF, an FPN/PAN neck), not a rule's model --
class _ConvBNSiLU(nn.Sequential):
    """``Conv2d(k, stride s, bias off) -> BatchNorm2d -> SiLU``: ``(batch, c1, h, w) -> (batch, c2, h / s, w / s)``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class _Bottleneck(nn.Module):
    """Two 3x3 convolutions with a residual add (``shortcut``): ``(batch, c, h, w) -> (batch, c, h, w)``."""

    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = _ConvBNSiLU(c, c, 3), _ConvBNSiLU(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 convolution split in two halves, ``n`` bottlenecks on the second, every piece
    concatenated: ``(batch, c1, h, w) -> (batch, c2, h, w)``.

    Ultralytics' ``C2f.forward`` writes ``list(x.chunk(2, 1))``, which iterates a tensor of unknown length
    (``torch.fx`` cannot trace it: the block is kept whole), and its ``forward_split`` splits in sizes read
    from ``self.c`` (which a sub-network would not follow); this unpacks the two chunks.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _ConvBNSiLU(c1, 2 * self.c)
        self.cv2 = _ConvBNSiLU((2 + n) * self.c, c2)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        y = [a, b]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools concatenated: ``(batch, c1, h, w) -> (batch, c2, h, w)``."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _ConvBNSiLU(c1, c1 // 2), _ConvBNSiLU(2 * c1, c2)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class TinyYOLO(nn.Module):
    """A YOLOv8-style detector, small: backbone (Conv-BN-SiLU, C2f, SPPF), an FPN/PAN neck concatenating upsampled
    and downsampled maps with C2f after each join, and a 1x1 head per level.

    ``(batch, 3, h, w) -> (batch, outputs, h*w/64 + h*w/256 + h*w/1024)``: each level's predictions, flattened
    and concatenated (``h`` and ``w`` multiples of 32).
    """

    def __init__(self, c: int = 8, outputs: int = 6) -> None:
        super().__init__()
        self.b1 = nn.Sequential(_ConvBNSiLU(3, c, 3, 2), _ConvBNSiLU(c, 2 * c, 3, 2), _C2f(2 * c, 2 * c, 1, True),
                                _ConvBNSiLU(2 * c, 4 * c, 3, 2), _C2f(4 * c, 4 * c, 2, True))  # P3, stride 8
        self.b2 = nn.Sequential(_ConvBNSiLU(4 * c, 8 * c, 3, 2), _C2f(8 * c, 8 * c, 1, True))  # P4, stride 16
        self.b3 = nn.Sequential(_ConvBNSiLU(8 * c, 8 * c, 3, 2), _C2f(8 * c, 8 * c, 1, True), _SPPF(8 * c, 8 * c))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4, self.td3 = _C2f(16 * c, 8 * c), _C2f(12 * c, 4 * c)  # top-down (FPN)
        self.down3, self.down4 = _ConvBNSiLU(4 * c, 4 * c, 3, 2), _ConvBNSiLU(8 * c, 8 * c, 3, 2)
        self.bu4, self.bu5 = _C2f(12 * c, 8 * c), _C2f(16 * c, 8 * c)  # bottom-up (PAN)
        self.heads = nn.ModuleList(nn.Conv2d(ch, outputs, 1) for ch in (4 * c, 8 * c, 8 * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b1(x)
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return torch.cat([h(f).flatten(2) for h, f in zip(self.heads, (n3, n4, n5))], 2)


def tiny_yolo() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """:class:`TinyYOLO` (width 8) and a ``(2, 3, 64, 64)`` example batch."""
    return TinyYOLO().eval(), (_x(2, 3, 64, 64),)
