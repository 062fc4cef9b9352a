"""Small recurrent models for the RNN and TAC tests (importable as ``rnn_models:<name>``)."""

from __future__ import annotations

import torch
from torch import nn

from elasticize.tac import ResidualRNN

_RNN = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class TokenTagger(nn.Module):
    """Embedding -> multi-layer (bi)RNN -> Linear head per token: tokens ``(batch, seq)`` -> ``(batch, seq, classes)``."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24, layers: int = 2, classes: int = 7,
                 kind: str = "lstm", bidirectional: bool = True, batch_first: bool = True, proj_size: int = 0) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim)
        extra = {"proj_size": proj_size} if proj_size else {}
        self.rnn = _RNN[kind](dim, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                              **extra)
        out = (proj_size or hidden) * (2 if bidirectional else 1)
        self.head = nn.Linear(out, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        y = self.rnn(h)[0]
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)

    def example_inputs(self) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, self.emb.num_embeddings, (2, 9), generator=g),)


class ResRNNStack(nn.Module):
    """Linear -> stack of Subnetwork-to-go residual RNN layers (TAC width, prefix depth) -> Linear.

    Input ``(batch, seq, in_dim)``, output ``(batch, seq, out_dim)``.
    """

    def __init__(self, in_dim: int = 6, dim: int = 12, hidden: int = 10, depth: int = 4, modules: int = 4,
                 out_dim: int = 5, reweight: str = "tac") -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.layers = nn.Sequential(*[ResidualRNN(dim, hidden, modules, reweight=reweight) for _ in range(depth)])
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(self.inp(x)))

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 7, self.inp.in_features, generator=torch.Generator().manual_seed(0)),)


class _LSTMBlock(nn.Module):
    """``x + Linear(BLSTM(LayerNorm(x)))`` with a 2-layer LSTM: RNN layers nested inside a residual block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.rnn(self.norm(x))[0])


class NestedLSTMStack(nn.Module):
    """Linear -> 3 residual blocks, each with a 2-layer BLSTM -> Linear: ``(batch, seq, 6) -> (batch, seq, 4)``."""

    def __init__(self, dim: int = 8, hidden: int = 6, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.blocks = nn.Sequential(*[_LSTMBlock(dim, hidden) for _ in range(blocks)])
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0)),)
