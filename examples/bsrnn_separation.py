"""A small band-split RNN (BSRNN) that separates one voice from a two-voice mixture, trained as Subnetwork-to-go.

The model follows the structure of Subnetwork-to-go's BSRNN (Luo et al., arXiv 2312.03464,
Section 3; BSRNN: Luo & Yu, arXiv 2209.15174) at a size that trains on a CPU in minutes:

* band split: the mixture's STFT is cut into ``K`` sub-bands; each band's real and imaginary
  parts go through its own GroupNorm (one group: over the band's bins and all frames, so
  frame energies survive) + Linear to ``N`` features, giving ``(batch, K, T, N)``;
* sequence modelling: ``D`` residual RNN layers (:class:`elasticize.tac.ResidualRNN`: norm,
  bidirectional LSTM, ``W`` parallel FC modules with TAC reweighting, residual add), running
  alternately along time and along the bands;
* mask estimation: per band an MLP with a GLU output gives a complex mask; the masked
  spectrum goes back to a waveform with the inverse STFT.

Training recipe (Subnetwork-to-go, Section 2.3), run by elasticize's sorted trainer
(:class:`elasticize.train.Trainer`, strategy ``"subnetwork-to-go"``): every update sums the loss
of the full network and of one sub-network drawn uniformly (depth ``d <= D``, width ``w <= W``,
the same ``w`` in every layer: one draw per dimension); the loss (:class:`SeparationLoss`) is
the L1 distance of the waveforms plus the L1 distance of the real and imaginary STFT parts
(BSRNN's joint time- and frequency-domain loss); Adam with a cosine learning-rate schedule
(the trainer's ``scheduler=``) and gradient clipping at norm 5 (``max_grad_norm=``). A
stand-alone model of one size is the same trainer with strategy ``"full"``.

Data: speech synthesised offline with the Debian ``espeak-ng`` package (install once with
``apt-get install -y espeak-ng``), reading sentences of the docstrings of Python's standard
library (``examples/docstrings.py``, every sentence of every module, kept when it is 6 to 22
words of plain words and punctuation). The target talker is espeak-ng's ``en-us+m3`` voice. Mixtures are 1 s at
8 kHz: by default the target in coloured Gaussian noise at an SNR drawn from [-5, 5] dB
(enhancement, which a model this small learns within a few hundred CPU updates); with
``--interference voice`` the interferer is the ``en-gb+f3`` voice reading another sentence at a
target-to-interferer ratio drawn from [-2.5, 2.5] dB (separation; needs far more updates).
Held-out mixtures use sentences that no training mixture uses. The synthesised corpus is
cached as a safetensors file (``--cache``).

Run (about 6 minutes on one CPU thread)::

    apt-get install -y espeak-ng
    python examples/bsrnn_separation.py --steps 300

It prints the SI-SDR (scale-invariant signal-to-distortion ratio, dB; Le Roux et al. 2019) of
several depth x width sub-networks of the one trained model on the held-out mixtures, with
their MACs per second of audio.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import random
import re
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from elasticize.tac import ResidualRNN

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstrings import stdlib_sentences  # noqa: E402

SAMPLE_RATE = 8000
TARGET_VOICE, OTHER_VOICE = "en-us+m3", "en-gb+f3"
_SPEAKABLE = re.compile(r"[A-Za-z ,.;:'()-]+[.!?]")


# ----------------------------------------------------------------------------- data
def speakable_sentences(min_words: int = 6, max_words: int = 22) -> list[str]:
    """Every stdlib docstring sentence (``examples/docstrings.py``) that espeak-ng reads as prose.

    Kept: ``min_words`` to ``max_words`` words of letters and punctuation only (no code, digits
    or symbols). Distinct, in the fixed shuffled order of :func:`docstrings.stdlib_sentences`.
    """
    return [s for s in stdlib_sentences(every_sentence=True, modules="all", min_words=min_words)
            if len(s.split()) <= max_words and _SPEAKABLE.fullmatch(s)]


def synthesize(text: str, voice: str) -> torch.Tensor:
    """``text`` spoken by espeak-ng ``voice``: mono waveform at :data:`SAMPLE_RATE`, shape ``(samples,)``, peak 1.

    Raises:
        RuntimeError: espeak-ng is not installed (``apt-get install -y espeak-ng``) or failed.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed; install it with `apt-get install -y espeak-ng`")
    res = subprocess.run([exe, "-v", voice, "--stdout"], input=text.encode(), capture_output=True, check=False)
    if res.returncode != 0 or len(res.stdout) < 64:
        raise RuntimeError(f"espeak-ng failed: {res.stderr.decode(errors='replace')[:200]}")
    with wave.open(io.BytesIO(res.stdout)) as w:
        rate, raw = w.getframerate(), w.readframes(w.getnframes())
    x = torch.frombuffer(bytearray(raw), dtype=torch.int16).float() / 32768.0
    from scipy.signal import resample_poly  # scipy comes with scikit-learn

    g = math.gcd(SAMPLE_RATE, rate)
    y = torch.from_numpy(resample_poly(x.numpy(), SAMPLE_RATE // g, rate // g)).float()
    return y / y.abs().max().clamp_min(1e-4)


def load_corpus(cache: Path, n_sentences: int = 400) -> dict[str, list[torch.Tensor]]:
    """Synthesised utterances, ``{"target": [...], "other": [...]}``, cached as one safetensors file.

    The first 85% of the sentences are for training, the rest held out (index-aligned in both voices).
    """
    from safetensors.torch import load_file, save_file

    sentences = speakable_sentences()
    if len(sentences) < n_sentences:
        raise ValueError(f"only {len(sentences)} sentences found; ask for fewer")
    sentences = sentences[:n_sentences]
    key = hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:10]  # another Python's stdlib: another corpus
    path = cache / f"espeak_{SAMPLE_RATE}_{n_sentences}_{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return {v: [t[f"{v}.{i}"] for i in range(n_sentences)] for v in ("target", "other")}
    out = {"target": [synthesize(s, TARGET_VOICE) for s in sentences[:n_sentences]],
           "other": [synthesize(s, OTHER_VOICE) for s in sentences[:n_sentences]]}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({f"{v}.{i}": t.contiguous() for v, ts in out.items() for i, t in enumerate(ts)}, str(tmp))
    tmp.replace(path)
    return out


def _crop(x: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    if x.numel() <= n:
        return F.pad(x, (0, n - x.numel()))
    s = rng.randrange(0, x.numel() - n)
    return x[s:s + n]


def coloured_noise(n: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise through a one-pole low-pass with a random pole in [0, 0.95): white to brown-ish, ``(n,)``."""
    from scipy.signal import lfilter

    white = torch.randn(n, generator=gen)
    a = 0.95 * torch.rand((), generator=gen).item()
    return torch.from_numpy(lfilter([1.0], [1.0, -a], white.numpy())).float()


def mixtures(corpus: dict[str, list[torch.Tensor]], split: str, count: int, *, seconds: float = 1.0,
             interference: str = "noise", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` mixtures ``(count, samples)`` and their target speech ``(count, samples)``.

    ``interference="voice"``: the other talker reading another sentence, target-to-interferer
    ratio uniform in [-2.5, 2.5] dB (separation). ``"noise"``: coloured Gaussian noise, SNR
    uniform in [-5, 5] dB (enhancement; learns within a few hundred CPU updates).

    Raises:
        ValueError: unknown ``interference``.
    """
    if interference not in ("voice", "noise"):
        raise ValueError(f"interference must be 'voice' or 'noise', not {interference!r}")
    gen = torch.Generator().manual_seed(seed)
    n_all = len(corpus["target"])
    cut = int(0.85 * n_all)
    idx = list(range(cut)) if split == "train" else list(range(cut, n_all))
    rng = random.Random(seed)
    n = int(seconds * SAMPLE_RATE)
    mix, tgt = [], []
    for _ in range(count):
        i, j = rng.sample(idx, 2)
        s = _crop(corpus["target"][i], n, rng)
        if interference == "voice":
            o, ratio_db = _crop(corpus["other"][j], n, rng), rng.uniform(-2.5, 2.5)
        else:
            o, ratio_db = coloured_noise(n, gen), rng.uniform(-5.0, 5.0)
        o = o * (s.norm() / o.norm().clamp_min(1e-6)) * 10 ** (-ratio_db / 20)
        m = s + o
        scale = 0.9 / m.abs().max().clamp_min(1e-6)
        mix.append(m * scale)
        tgt.append(s * scale)
    return torch.stack(mix), torch.stack(tgt)


def loader(mix: torch.Tensor, tgt: torch.Tensor, batch: int, *, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """``(mixture, target)`` mini-batches of ``(batch, samples)`` each; reshuffled every epoch when ``shuffle``."""
    return DataLoader(TensorDataset(mix, tgt), batch_size=batch, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- model
class BSRNN(nn.Module):
    """Band-split RNN with Subnetwork-to-go's dynamic depth and TAC width.

    Args:
        n_fft, hop: STFT size and hop in samples (Hann window).
        bands: sub-band widths in frequency bins; they must sum to ``n_fft // 2 + 1``.
        features: ``N``, features per band.
        hidden: LSTM hidden size per direction in each residual RNN layer.
        depth: ``D``, residual RNN layers (alternating time and band modelling).
        modules: ``W``, parallel FC modules per layer.
        reweight: ``"tac"`` or ``"mean"`` (the "without TAC" ablation).

    Shapes:
        input: mixture ``(batch, samples)``; output: estimated target ``(batch, samples)``.

    Raises:
        ValueError: the band widths do not cover the spectrum.
    """

    def __init__(self, n_fft: int = 256, hop: int = 64, bands: Sequence[int] = (4, 4, 4, 4, 8, 8, 8, 16, 32, 41),
                 features: int = 16, hidden: int = 16, depth: int = 12, modules: int = 16, reweight: str = "tac") -> None:
        super().__init__()
        if sum(bands) != n_fft // 2 + 1:
            raise ValueError(f"band widths sum to {sum(bands)}, need n_fft // 2 + 1 = {n_fft // 2 + 1}")
        self.n_fft, self.hop, self.bands = n_fft, hop, tuple(bands)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.split_norm = nn.ModuleList(nn.GroupNorm(1, 2 * b) for b in bands)
        self.split_fc = nn.ModuleList(nn.Linear(2 * b, features) for b in bands)
        self.layers = nn.Sequential(*[ResidualRNN(features, hidden, modules, seq_dim=-2 if i % 2 == 0 else -3,
                                                  reweight=reweight) for i in range(depth)])
        self.mask = nn.ModuleList(nn.Sequential(nn.LayerNorm(features), nn.Linear(features, 2 * features), nn.Tanh(),
                                                nn.Linear(2 * features, 4 * b), nn.GLU(dim=-1)) for b in bands)

    def stft(self, wav: torch.Tensor) -> torch.Tensor:
        """Complex STFT ``(batch, bins, frames)``."""
        return torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.view_as_real(self.stft(wav))  # (B, F, T, 2)
        feats = []
        start = 0
        for b, norm, fc in zip(self.bands, self.split_norm, self.split_fc):
            sub = spec[:, start:start + b].permute(0, 3, 1, 2).flatten(1, 2)  # (B, 2b, T)
            feats.append(fc(norm(sub).transpose(1, 2)))  # normalised over the band and time, as BSRNN
            start += b
        h = self.layers(torch.stack(feats, 1))  # (B, K, T, N)
        masks = [est(h[:, k]).unflatten(-1, (b, 2)) for k, (b, est) in enumerate(zip(self.bands, self.mask))]
        m = torch.view_as_complex(torch.cat(masks, 2).permute(0, 2, 1, 3).contiguous())  # (B, F, T)
        est = m * torch.view_as_complex(spec.contiguous())
        return torch.istft(est, self.n_fft, self.hop, window=self.window, length=wav.shape[-1])

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(1, SAMPLE_RATE, generator=torch.Generator().manual_seed(0)),)


# ----------------------------------------------------------------------------- loss, metric, training
class SeparationLoss(nn.Module):
    """BSRNN's joint loss: L1 of the waveforms plus L1 of the STFT's real and imaginary parts.

    ``(est, ref)``, both ``(batch, samples)`` -> scalar; the trainer's ``loss_fn``.

    Args:
        n_fft, hop: the STFT of the frequency-domain term (Hann window), in samples.
    """

    def __init__(self, n_fft: int = 256, hop: int = 64) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def spec(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True))

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (est - ref).abs().mean() + (self.spec(est) - self.spec(ref)).abs().mean()


def si_sdr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SDR in dB per signal, ``(batch, samples) -> (batch,)`` (Le Roux et al., ICASSP 2019)."""
    est, ref = est - est.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True).clamp_min(1e-8) * ref
    return 10 * torch.log10(proj.pow(2).sum(-1).clamp_min(1e-8) / (est - proj).pow(2).sum(-1).clamp_min(1e-8))


def si_sdr_metric(est: torch.Tensor, ref: Any, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`si_sdr` as a trainer metric (``Trainer.measure(..., metric=si_sdr_metric)``); higher is better."""
    return si_sdr(est, ref)


def subnet(em, depth: int, width: int) -> dict:
    """Sub-network configuration: the first ``depth`` residual RNN layers, ``width`` modules in each."""
    return {"depth": {"layers": depth}, "modules": {g: width for g in em.space.modules}}


def make_trainer(em, data: DataLoader, steps: int, *, strategy: str = "subnetwork-to-go", lr: float = 1e-2,
                 seed: int = 0, distribution: Mapping[str, Sequence[float]] | None = None):
    """The sorted trainer for ``steps`` updates: Adam, cosine schedule, clipping at 5, :class:`SeparationLoss`.

    ``strategy="subnetwork-to-go"`` is Subnetwork-to-go's recipe (full network + one random
    sub-network per update); ``"full"`` trains the model alone, as a stand-alone model.
    ``distribution`` is the sampler's probabilities per dimension (default uniform).
    """
    from elasticize.train import Trainer

    model = em.model
    opt = torch.optim.Adam([p for p in em.parameters() if p.requires_grad], lr=lr)
    return Trainer(em, data, optimizer=opt, loss_fn=SeparationLoss(model.n_fft, model.hop), strategy=strategy,
                   seed=seed, distribution=distribution, distill=False, max_grad_norm=5.0,
                   scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))


def log_every(n: int):
    """A ``train_steps`` progress callback printing the mean loss of each pass every ``n`` updates."""
    def show(rec: dict) -> None:
        if rec["step"] % n == 0:
            print(f"  step {rec['step']}: " + " ".join(f"{k} {v:.4f}" for k, v in rec["losses"].items()), flush=True)
    return show


@torch.no_grad()
def evaluate(model: nn.Module, mix: torch.Tensor, ref: torch.Tensor, batch: int = 16) -> float:
    """Mean SI-SDR (dB) of a plain model (e.g. an extracted sub-network) on held-out mixtures."""
    model.eval()
    return torch.cat([si_sdr(model(mix[i:i + batch]), ref[i:i + batch]) for i in range(0, mix.shape[0], batch)]).mean().item()


def build(*, depth: int = 12, modules: int = 16, reweight: str = "tac", seed: int = 0, **kw: Any):
    """A fresh BSRNN (``kw``: more :class:`BSRNN` arguments), elastic over depth and modules (Subnetwork-to-go's two dimensions)."""
    import elasticize

    torch.manual_seed(seed)
    model = BSRNN(depth=depth, modules=modules, reweight=reweight, **kw)
    return elasticize.elasticize(model, dims=("depth", "modules"), sort=None)


def standalone(depth: int, modules: int, *, seed: int = 0, **kw: Any):
    """A fresh BSRNN of one size, to train alone with strategy ``"full"``.

    The trainer takes an :class:`~elasticize.ElasticModel`; strategy ``"full"`` trains only its
    largest sub-network, the model itself. Width joins the dimensions only so that the plan
    is never empty (a model with ``D = 1, W = 1`` has no depth or modules choice).
    """
    import elasticize

    torch.manual_seed(seed)
    model = BSRNN(depth=depth, modules=modules, **kw)
    return elasticize.elasticize(model, dims=("depth", "modules", "width"), sort=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "elasticize-examples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--interference", choices=["noise", "voice"], default="noise")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.cache)
    train_mix, train_ref = mixtures(corpus, "train", 2000, interference=args.interference, seed=0)
    test_mix, test_ref = mixtures(corpus, "test", 64, interference=args.interference, seed=1)
    test = list(loader(test_mix, test_ref, 16, shuffle=False))
    em = build()
    print(f"BSRNN: {sum(p.numel() for p in em.parameters()):,} parameters; MACs per second of audio "
          f"{em.macs(subnet(em, 1, 1)) / 1e6:.1f}M (d=1, w=1) to {em.macs(None) / 1e6:.1f}M (full)")
    print(f"unprocessed mixtures: SI-SDR {si_sdr(test_mix, test_ref).mean():.2f} dB")
    tr = make_trainer(em, loader(train_mix, train_ref, args.batch), args.steps)
    t0 = time.perf_counter()
    tr.train_steps(args.steps, progress=log_every(50))
    print(f"trained {args.steps} updates (full + one random sub-network each) in {time.perf_counter() - t0:.0f} s")
    for d in (12, 6, 3, 1):
        for w in (16, 8, 4, 1):
            score = tr.measure(test, subnet(em, d, w), metric=si_sdr_metric)
            print(f"  depth {d} width {w}: SI-SDR {score:5.2f} dB, {em.macs(subnet(em, d, w)) / 1e6:6.1f}M MACs")


if __name__ == "__main__":
    main()
