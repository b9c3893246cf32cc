"""Review s26 (DL, FX8): a dataset's or collate_fn's generator made lazily during a reading
(``self.rng = None`` until first use) is dropped again after it, as a sampler's is; the
loader's ``collate_fn`` (and one level of its attributes) is searched for generators; a
Lightning ``CombinedLoader`` and an endless ``itertools`` iterator are refused before any
reading."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvlab as cl

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore")
N = 16


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, dtype=DT, generator=g), torch.arange(N) % 3


X, Y = _xy()


def _hessian_trace(model: nn.Module, batches) -> float:
    """Dense float64 tr H of the mean cross-entropy over the batches (weighted by size)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (xs,)), ys)

    h = hessian(loss)(params)
    return float(sum(h[k][k].reshape(p.numel(), p.numel()).trace() for k, p in params.items()))


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b)
    )


# ------------------------------------------------- 1. a dataset's lazily made generator
class LazyAug(Dataset):
    """Augmentation generator made on first use (the worker-safe pattern), and a count of the
    examples read (a plain attribute that is not None: left as the reading leaves it)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = None
        self.reads = 0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        self.reads += 1
        return X[i] + torch.from_numpy(self.rng.normal(size=3)) * 0.3, Y[i]


def test_lazy_dataset_generator_dropped_after_a_reading_trace_exact():
    model = _model()
    reference = DataLoader(LazyAug(0), batch_size=4)
    expected = [_epoch(reference), _epoch(reference)]
    loader = DataLoader(LazyAug(0), batch_size=4)
    value = float(cl.trace(model, nn.CrossEntropyLoss(), loader, method="exact").value)
    assert loader.dataset.rng is None  # put back as the call found it
    assert loader.dataset.reads == N  # a counter that was not None is not put back
    # the user's loop reads what it reads without the call, bit for bit
    assert _same(_epoch(loader), expected[0])
    assert _same(_epoch(loader), expected[1])
    assert value == pytest.approx(_hessian_trace(model, expected[0]), rel=1e-10, abs=1e-12)


def test_lazy_dataset_generator_training_unchanged_and_analyze_accepts_it():
    def train(call: bool) -> torch.Tensor:
        m = _model(5)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        loader = DataLoader(LazyAug(0), batch_size=4)
        for _ in range(2):
            if call:
                cl.diag_fisher(m, nn.CrossEntropyLoss(), loader)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(train(True), train(False))
    model = _model()
    loader = DataLoader(LazyAug(0), batch_size=4)
    first = _epoch(DataLoader(LazyAug(0), batch_size=4))
    report = cl.analyze(
        model, nn.CrossEntropyLoss(), loader, quantities=["loss"], progress=False, nqm=False
    )
    xs, ys = torch.cat([x for x, _ in first]), torch.cat([y for _, y in first])
    with torch.no_grad():
        brute = float(nn.functional.cross_entropy(model(xs), ys))
    assert float(report.trajectory("loss")[0]) == pytest.approx(brute, rel=1e-12)
    assert loader.dataset.rng is None


# ------------------------------------------------- 2. the collate_fn's generators
class LazyCollate:
    """Adds noise drawn from a torch.Generator made on first call (as HF's MLM collator with
    ``seed=`` does: ``generator`` and ``_generator_pid`` are None until then)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = None
        self._generator_pid = None

    def __call__(self, examples):
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
            self._generator_pid = 1
        x = torch.stack([e[0] for e in examples])
        noise = torch.randn(x.shape, generator=self.generator, dtype=DT)
        return x + 0.3 * noise, torch.stack([e[1] for e in examples])


class EagerCollate(LazyCollate):
    """The same with its generator made in ``__init__``."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(seed)


class PairCollate:
    """A wrapper holding the collator one level down."""

    def __init__(self, inner) -> None:
        self.c = inner

    def __call__(self, examples):
        return self.c(examples)


@pytest.mark.parametrize(
    "make",
    [LazyCollate, EagerCollate, lambda s: PairCollate(LazyCollate(s))],
    ids=["lazy", "eager", "wrapped-lazy"],
)
def test_collate_fn_generator_kept_trace_exact(make):
    model = _model()
    ds = TensorDataset(X, Y)
    reference = DataLoader(ds, batch_size=4, collate_fn=make(0))
    expected = [_epoch(reference), _epoch(reference)]
    loader = DataLoader(ds, batch_size=4, collate_fn=make(0))
    got = [_epoch(loader)]
    value = float(cl.trace(model, nn.CrossEntropyLoss(), loader, method="exact").value)
    got.append(_epoch(loader))  # the next epoch: as without the call
    assert _same(got[0], expected[0]) and _same(got[1], expected[1])
    assert value == pytest.approx(_hessian_trace(model, expected[1]), rel=1e-10, abs=1e-12)
    fresh = DataLoader(ds, batch_size=4, collate_fn=make(0))
    report = cl.analyze(
        model, nn.CrossEntropyLoss(), fresh, quantities=["loss"], progress=False, nqm=False
    )
    xs, ys = torch.cat([x for x, _ in expected[0]]), torch.cat([y for _, y in expected[0]])
    with torch.no_grad():
        brute = float(nn.functional.cross_entropy(model(xs), ys))
    assert float(report.trajectory("loss")[0]) == pytest.approx(brute, rel=1e-12)


def test_hf_mlm_collator_with_seed_next_epoch_unchanged():
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[MASK]": 1, "[UNK]": 2, **{f"w{i}": i + 3 for i in range(5)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(
            tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
        ),
        pad_token="[PAD]",
        mask_token="[MASK]",
        unk_token="[UNK]",
    )
    V = len(tok)
    g = torch.Generator().manual_seed(0)
    ds = [{"input_ids": torch.randint(3, V, (6,), generator=g).tolist()} for _ in range(8)]

    class MLMPairs(DataCollatorForLanguageModeling):
        def __call__(self, examples):
            b = super().__call__(examples)
            return {"input_ids": b["input_ids"]}, b["labels"]

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(V, 3)
            self.lin = nn.Linear(3, V)

        def forward(self, input_ids):
            return self.lin(torch.tanh(self.e(input_ids)))

    torch.manual_seed(0)
    model = M().to(DT)
    lf = cl.classes_last(nn.CrossEntropyLoss())

    def labels(loader):
        return [b[1].clone() for b in loader]

    def make():
        return DataLoader(ds, batch_size=4, collate_fn=MLMPairs(tok, mlm_probability=0.5, seed=0))

    reference = make()
    expected = [labels(reference), labels(reference)]
    loader = make()
    cl.diag_fisher(model, lf, loader)
    e1 = labels(loader)
    cl.gradient_stats(model, lf, loader)
    e2 = labels(loader)
    assert all(torch.equal(a, b) for a, b in zip(e1, expected[0]))
    assert all(torch.equal(a, b) for a, b in zip(e2, expected[1]))
    cl.analyze(
        model, lf, make(), quantities=["loss"], progress=False, nqm=False
    )  # no ReadingsDifferError


# ------------------------------------------------- 3. Lightning's CombinedLoader
@pytest.mark.parametrize("mode", ["max_size_cycle", "min_size", "max_size", "sequential"])
def test_combined_loader_refused_before_reading(mode):
    pytest.importorskip("lightning")
    from lightning.pytorch.utilities import CombinedLoader

    ga = torch.Generator().manual_seed(1)
    la = DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True, generator=ga)
    combined = CombinedLoader({"a": la}, mode=mode)
    model = _model()
    own, glob = ga.get_state(), torch.get_rng_state()
    with pytest.raises(TypeError, match=r"CombinedLoader") as info:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), combined)
    message = str(info.value)
    assert ".iterables['a']" in message and "b[0]['a']" in message
    assert torch.equal(own, ga.get_state()) and torch.equal(glob, torch.get_rng_state())
    # the way out the message gives: the loader itself
    assert cl.diag_fisher(_model(), nn.CrossEntropyLoss(), combined.iterables["a"]) is not None


# ------------------------------------------------- 4. endless itertools iterators
@pytest.mark.parametrize(
    "endless",
    [
        lambda b: itertools.cycle([b]),
        lambda b: itertools.repeat(b),
        lambda b: itertools.count(),
    ],
    ids=["cycle", "repeat", "count"],
)
def test_endless_itertools_refused_naming_islice(endless):
    batch = (X[:4], Y[:4])
    with pytest.raises(TypeError, match=r"itertools\.islice"):
        cl.diag_fisher(_model(), nn.CrossEntropyLoss(), endless(batch))
    with pytest.raises(TypeError, match=r"itertools\.islice"):
        cl.trace(_model(), nn.CrossEntropyLoss(), endless(batch), num_probes=2, seed=0)


def test_finite_repeat_and_islice_of_cycle_still_read():
    model = _model()
    batches = [(X[:8], Y[:8]), (X[8:], Y[8:])]
    brute = _hessian_trace(model, batches)
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    sliced = itertools.islice(itertools.cycle(loader), 2)  # the way out the error names
    got = float(cl.trace(model, nn.CrossEntropyLoss(), sliced, method="exact").value)
    assert got == pytest.approx(brute, rel=1e-10)
    rep = itertools.repeat(batches[0], 3)  # finite: three times one batch
    value = float(cl.trace(model, nn.CrossEntropyLoss(), rep, method="exact").value)
    assert value == pytest.approx(_hessian_trace(model, [batches[0]]), rel=1e-10)


class _BoundAug:
    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(0)

    def collate(self, items):  # noqa: ANN001, ANN201
        xb = torch.stack([a for a, _ in items])
        yb = torch.stack([b for _, b in items])
        return xb + 0.1 * torch.randn(xb.shape, generator=self.g, dtype=xb.dtype), yb


def _partial_collate(items, generator):  # noqa: ANN001, ANN201
    xb = torch.stack([a for a, _ in items])
    yb = torch.stack([b for _, b in items])
    return xb + 0.1 * torch.randn(xb.shape, generator=generator, dtype=xb.dtype), yb


def _dict_collate(items, rngs):  # noqa: ANN001, ANN201
    return _partial_collate(items, rngs["x"])


@pytest.mark.parametrize("kind", ["bound", "partial", "partial_of_bound", "partial_dict"])
def test_bound_method_and_partial_collate_generators_kept(kind: str) -> None:
    """Review s26 (RX6-1): a bound method's object and a partial's generator argument are
    searched like a callable collator's attributes: a call leaves the next epoch unchanged, and
    its value is the brute force's on the batches that epoch reads."""
    import functools

    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    ds = torch.utils.data.TensorDataset(X, y)

    def make() -> torch.utils.data.DataLoader:
        if kind == "bound":
            fn = _BoundAug().collate
        elif kind == "partial_of_bound":  # RX8-2: unwrapped to the bound method's object
            fn = functools.partial(_BoundAug().collate)
        elif kind == "partial_dict":  # RX8-2: a generator inside a container argument
            rngs = {"x": torch.Generator().manual_seed(0)}
            fn = functools.partial(_dict_collate, rngs=rngs)
        else:
            fn = functools.partial(_partial_collate, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=fn)

    expected = [(xb.clone(), yb.clone()) for xb, yb in make()]
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    loader = make()
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), loader, kind="empirical")
    after = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after, expected))
    # brute force: (1/N) sum_n g_n^2 over the batches the epoch reads
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    per = [
        torch.func.vmap(torch.func.grad(loss), (None, 0, 0))(params, xb, yb) for xb, yb in expected
    ]
    for k in params:
        want = torch.cat([p[k] for p in per]).square().mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-14)
