"""The benchmark workloads W1-W3 of shared/BENCHMARKS.md, built deterministically."""

from __future__ import annotations

import torch
from torch import nn


def w1_mlp_digits(
    batch: int = 256,
) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W1: scikit-learn digits, standardised and shuffled (seed 0); MLP 64-128-128-10.

    Standardised with the population standard deviation (``correction=0``), as BENCHMARKS.md's
    reference eigenvalues (and ``bench_estimators.py``) have it; constant pixels stay 0.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0, correction=0).clamp_min(1e-8)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model, nn.CrossEntropyLoss(), (X[:batch], y[:batch])


def cifar_like(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The W2/W3 data: ``randn(n, 3, 32, 32)`` and ``randint(0, 10, (n,))`` from one generator (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return X, y


def _cnn(c1: int, c2: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 8 * 8, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def w2_model() -> nn.Module:
    """The W2 CNN, built right after ``torch.manual_seed(1)``."""
    torch.manual_seed(1)
    return _cnn(16, 32, 64)


def w2_cnn(batch: int = 128) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W2: CIFAR-like random data; Conv16-Conv32-Linear64 CNN (136,874 parameters)."""
    X, y = cifar_like()
    return w2_model(), nn.CrossEntropyLoss(), (X[:batch], y[:batch])


def w3_cnn_wide(batch: int = 256) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W3: as W2 with 32/64 channels and hidden 256 (1,070,794 parameters)."""
    X, y = cifar_like()
    torch.manual_seed(1)
    return _cnn(32, 64, 256), nn.CrossEntropyLoss(), (X[:batch], y[:batch])


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: causal SDPA attention and a GELU MLP, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """nanoGPT-style decoder of W4: token + position embeddings, pre-LN blocks, tied head.

    ``forward(idx)`` maps token indices ``(B, T)`` to logits ``(B, T, vocab)``.
    """

    def __init__(
        self, vocab: int = 256, length: int = 32, d: int = 64, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def w4_tokens(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The W4 data: inputs ``[:, :-1]`` and next-token targets with the last 4 positions -100."""
    seq = torch.randint(0, 256, (n, 33), generator=torch.Generator().manual_seed(0))
    X, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, -4:] = -100
    return X, y


def w4_gpt(batch: int = 16) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W4: the tiny GPT (118,528 parameters) on random tokens, GPT-layout cross-entropy."""
    X, y = w4_tokens()
    torch.manual_seed(1)
    model = TinyGPT()
    return model, nn.CrossEntropyLoss(ignore_index=-100), (X[:batch], y[:batch])
