"""A zoo of tiny float64 models beyond MLP/CNN: GPT layouts, dict inputs, tied weights, norms.

``make_case("tiny_gpt-mean-three")`` builds the case ``"<entry>-<reduction>-<batching>"``
deterministically: a model, a loss and the same ``N = 8`` examples either as one batch
(``"one"``) or as three uneven batches of sizes (3, 1, 4) (``"three"``). ``CASES`` lists every
combination. Every model has fewer than ~700 trainable parameters so that dense references of the
whole Hessian are cheap (tests/bruteforce.py).

Unlike tests/problems.py the inputs may be dicts (``model(**inputs)``), outputs may be HuggingFace
``CausalLMOutput`` objects (``.logits``), cross-entropy may be in the GPT layout ``(B, T, C)`` with
``(B, T)`` targets or torch's ``(B, C, ...)`` layout, and targets may contain ``ignore_index``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100
N = 8
BATCHINGS = {"one": (N,), "three": (3, 1, 4)}
REDUCTIONS = ("mean", "sum")
DTYPE = torch.float64


# --------------------------------------------------------------------------------------- models


class Block(nn.Module):
    """nanoGPT's pre-LayerNorm block: causal self-attention and an MLP, both residual."""

    def __init__(self, d: int, n_head: int, hidden: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LN, head tied to the token embedding."""

    def __init__(
        self, vocab: int = 11, length: int = 5, d: int = 8, n_head: int = 2, n_layer: int = 1
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, n_head, hidden=d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: named_parameters() lists it once, as tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


class ResBasicBlock(nn.Module):
    """torchvision's BasicBlock (in-place ReLU, ``out += identity``) followed by a linear head."""

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)  # the same ReLU module twice, as in torchvision
        return self.fc(self.flatten(self.pool(out)))


class TemperatureClassifier(nn.Module):
    """A parameter owned by the model itself (not by a layer): logits = lin(x) / temperature."""

    def __init__(self, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, classes)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) / self.temperature


class SharedLinear(nn.Module):
    """One square weight used by two Linear layers (each with its own bias)."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.act = nn.Tanh()
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.b(self.act(self.a(x)))))


class TwiceLinear(nn.Module):
    """One module called twice in a forward."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.act = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.act(self.lin(x)))


class SeqMLP(nn.Module):
    """(B, T, d_in) -> (B, T, d_out), a two-layer MLP on every position."""

    def __init__(self, d_in: int = 3, hidden: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EmbeddingClassifier(nn.Module):
    """nn.Embedding -> mean over the tokens -> Linear."""

    def __init__(self, vocab: int = 7, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.emb(idx).mean(dim=1))


# --------------------------------------------------------------------------------------- helpers


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


@torch.no_grad()
def _perturb_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Move norm affine parameters and BatchNorm running statistics off their trivial init."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm | nn.RMSNorm | nn.BatchNorm2d):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + 0.3 * _randn(gen, *m.weight.shape))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.2 * _randn(gen, *m.bias.shape))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * _randn(gen, m.num_features))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen, dtype=DTYPE))


def _init(ctor: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ctor().to(DTYPE)


def _ignore(targets: Tensor, counts: list[int]) -> Tensor:
    """Set the last ``counts[n]`` positions of sequence ``n`` to ``IGNORE``."""
    targets = targets.clone()
    for n, c in enumerate(counts):
        if c:
            targets[n, targets.shape[1] - c :] = IGNORE
    return targets


# Ignored positions per sequence (T = 5 for the GPTs, 4 for the sequence models): varied, and the
# single-example batch of the "three" batching (index 3) has all but one position ignored.
GPT_IGNORED = [0, 1, 2, 4, 1, 3, 0, 2]
SEQ_IGNORED = [0, 1, 2, 3, 0, 1, 2, 0]

Built = tuple[nn.Module, type[nn.Module], dict[str, Any], Any, Tensor]
# (model, loss class, loss kwargs, all inputs, all targets)


def _tiny_gpt(gen: torch.Generator) -> Built:
    model = _init(TinyGPT, 1)
    with torch.no_grad():
        model.tok.weight.mul_(0.7)
    _perturb_norms(model, gen)
    idx = torch.randint(0, 11, (N, 6), generator=gen)
    targets = _ignore(idx[:, 1:], GPT_IGNORED)
    return model, nn.CrossEntropyLoss, {}, idx[:, :-1].contiguous(), targets


def _hf_gpt2(gen: torch.Generator) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        n_inner=8,  # keeps the model at ~650 parameters (default would be 4 * n_embd)
        vocab_size=13,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.3,  # the default 0.02 makes every softmax almost uniform
        bos_token_id=0,
        eos_token_id=0,
    )
    # The default attention ("sdpa") works here, in plain forwards and under torch.func's jacrev /
    # hessian transforms used by the brute-force references; "eager" is not needed.
    model = _init(lambda: GPT2LMHeadModel(config), 2).eval()
    _perturb_norms(model, gen)
    T = 6
    ids = torch.randint(1, 13, (N, T + 1), generator=gen)
    lengths = torch.tensor([7, 5, 6, 3, 7, 4, 7, 6])  # real tokens in ids (incl. the shifted one)
    mask = (torch.arange(T + 1)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding token 0 at the end
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = IGNORE  # no next token past the end, and padding
    inputs = {"input_ids": ids[:, :T].contiguous(), "attention_mask": mask[:, :T].contiguous()}
    return model, nn.CrossEntropyLoss, {}, inputs, targets


def _resblock(gen: torch.Generator) -> Built:
    model = _init(ResBasicBlock, 3)
    _perturb_norms(model, gen)
    model.eval()
    X = _randn(gen, N, 2, 4, 4)
    return model, nn.CrossEntropyLoss, {}, X, torch.randint(0, 3, (N,), generator=gen)


def _ln_mlp(gen: torch.Generator) -> Built:
    model = _init(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), 4
    )
    _perturb_norms(model, gen)
    model[0].bias.requires_grad_(False)  # a frozen parameter: not part of any result
    X = _randn(gen, N, 4)
    return model, nn.CrossEntropyLoss, {}, X, torch.randint(0, 3, (N,), generator=gen)


def _rms_mlp(gen: torch.Generator) -> Built:
    model = _init(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.GELU(), nn.Linear(6, 3)), 5
    )
    _perturb_norms(model, gen)
    X = _randn(gen, N, 4)
    return model, nn.MSELoss, {}, X, _randn(gen, N, 3)


def _temperature(gen: torch.Generator) -> Built:
    model = _init(TemperatureClassifier, 6)
    X = _randn(gen, N, 4)
    return model, nn.CrossEntropyLoss, {}, X, torch.randint(0, 3, (N,), generator=gen)


def _shared_linear(gen: torch.Generator) -> Built:
    model = _init(SharedLinear, 7)
    X = _randn(gen, N, 4)
    return model, nn.CrossEntropyLoss, {}, X, torch.randint(0, 3, (N,), generator=gen)


def _twice_linear(gen: torch.Generator) -> Built:
    model = _init(TwiceLinear, 8)
    X = _randn(gen, N, 4)
    return model, nn.CrossEntropyLoss, {}, X, torch.randint(0, 4, (N,), generator=gen)


def _multilabel_bce(gen: torch.Generator) -> Built:
    model = _init(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), 9)
    X = _randn(gen, N, 4)
    y = torch.randint(0, 2, (N, 3), generator=gen).to(DTYPE)
    return model, nn.BCEWithLogitsLoss, {}, X, y


def _seq_ce_gpt(gen: torch.Generator) -> Built:
    """Logits (B, T=4, C=3), targets (B, T) with ignored positions (T != C: unambiguous)."""
    model = _init(lambda: SeqMLP(3, 4, 3), 10)
    X = _randn(gen, N, 4, 3)
    y = _ignore(torch.randint(0, 3, (N, 4), generator=gen), SEQ_IGNORED)
    return model, nn.CrossEntropyLoss, {}, X, y


def _seq_ce_torch(gen: torch.Generator) -> Built:
    """torch's layout: logits (B, C=3, T=4), targets (B, T) with ignored positions."""
    model = _init(
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 3, 1)), 11
    )
    X = _randn(gen, N, 2, 4)
    y = _ignore(torch.randint(0, 3, (N, 4), generator=gen), SEQ_IGNORED)
    return model, nn.CrossEntropyLoss, {}, X, y


def _seq_mse(gen: torch.Generator) -> Built:
    model = _init(lambda: SeqMLP(3, 4, 2), 12)
    return model, nn.MSELoss, {}, _randn(gen, N, 4, 3), _randn(gen, N, 4, 2)


def _seq_bce(gen: torch.Generator) -> Built:
    model = _init(lambda: SeqMLP(3, 4, 2), 13)
    y = torch.randint(0, 2, (N, 4, 2), generator=gen).to(DTYPE)
    return model, nn.BCEWithLogitsLoss, {}, _randn(gen, N, 4, 3), y


def _pixel_net(out: int, seed: int) -> nn.Module:
    return _init(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, out, 1)),
        seed,
    )


def _pixel_ce(gen: torch.Generator) -> Built:
    """Logits (B, C=4, H=3, W=2), targets (B, H, W)."""
    model = _pixel_net(4, 14)
    y = torch.randint(0, 4, (N, 3, 2), generator=gen)
    return model, nn.CrossEntropyLoss, {}, _randn(gen, N, 2, 3, 2), y


def _pixel_mse(gen: torch.Generator) -> Built:
    model = _pixel_net(2, 15)
    return model, nn.MSELoss, {}, _randn(gen, N, 2, 3, 2), _randn(gen, N, 2, 3, 2)


def _pixel_bce(gen: torch.Generator) -> Built:
    model = _pixel_net(2, 16)
    y = torch.randint(0, 2, (N, 2, 3, 2), generator=gen).to(DTYPE)
    return model, nn.BCEWithLogitsLoss, {}, _randn(gen, N, 2, 3, 2), y


def _embedding_clf(gen: torch.Generator) -> Built:
    model = _init(EmbeddingClassifier, 17)
    idx = torch.randint(0, 7, (N, 5), generator=gen)
    return model, nn.CrossEntropyLoss, {}, idx, torch.randint(0, 3, (N,), generator=gen)


ENTRIES: dict[str, Callable[[torch.Generator], Built]] = {
    "tiny_gpt": _tiny_gpt,
    "hf_gpt2": _hf_gpt2,
    "resblock": _resblock,
    "ln_mlp": _ln_mlp,
    "rms_mlp": _rms_mlp,
    "temperature": _temperature,
    "shared_linear": _shared_linear,
    "twice_linear": _twice_linear,
    "multilabel_bce": _multilabel_bce,
    "seq_ce_gpt": _seq_ce_gpt,
    "seq_ce_torch": _seq_ce_torch,
    "seq_mse": _seq_mse,
    "seq_bce": _seq_bce,
    "pixel_ce": _pixel_ce,
    "pixel_mse": _pixel_mse,
    "pixel_bce": _pixel_bce,
    "embedding_clf": _embedding_clf,
}


# ------------------------------------------------------------------------------------------ cases


def split_inputs(inputs: Any, sizes: tuple[int, ...]) -> list[Any]:
    """Split a Tensor or a dict of tensors along the first dimension."""
    if isinstance(inputs, Mapping):
        parts = {k: v.split(list(sizes)) for k, v in inputs.items()}
        return [{k: parts[k][i] for k in inputs} for i in range(len(sizes))]
    return list(inputs.split(list(sizes)))


@dataclass
class Case:
    """One test case: a model, a loss and its batches (``data`` is what curvlab is given)."""

    name: str
    entry: str
    reduction: str
    batching: str
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Any, Tensor]] = field(repr=False)

    @property
    def data(self) -> Any:
        """One batch as a tuple ``(inputs, targets)``, several as a list of such tuples."""
        return self.batches[0] if len(self.batches) == 1 else list(self.batches)


def build(entry: str, reduction: str, sizes: tuple[int, ...]) -> tuple[nn.Module, nn.Module, list]:
    """Entry ``entry``'s builder: (model, loss_fn, list of batches), deterministic."""
    gen = torch.Generator().manual_seed(1234)
    model, loss_cls, kwargs, inputs, targets = ENTRIES[entry](gen)
    loss_fn = loss_cls(reduction=reduction, **kwargs)
    batches = list(zip(split_inputs(inputs, sizes), targets.split(list(sizes))))
    return model, loss_fn, batches


def make_case(name: str) -> Case:
    """Build ``"<entry>-<reduction>-<batching>"``; "one" and "three" hold the same examples."""
    entry, reduction, batching = name.split("-")
    model, loss_fn, batches = build(entry, reduction, BATCHINGS[batching])
    return Case(name, entry, reduction, batching, model, loss_fn, batches)


CASES = ["-".join(c) for c in itertools.product(ENTRIES, REDUCTIONS, BATCHINGS)]
