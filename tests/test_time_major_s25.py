"""Review s25 (BD): time-major batches ``(T, B, ...)`` fed to sequence-first layers.

curvlab reads the first axis of every input tensor as the examples. A time-major batch (torch's
word_language_model layout) puts time there instead:

* into a sequence-first ``nn.LSTM``/``nn.TransformerEncoder`` whose output keeps that axis
  (``(T, B, V)``), the examples-apart check found the layer running along its first axis and
  raised a ``MixedExamplesError`` advising BatchNorm/LayerNorm changes; it now names the layer,
  its ``batch_first=False`` and the time-major layout first, with the way out;
* into a model that pools over time (output ``(B, C)``) with ``T == B``, the per-example passes
  fed the model one time step of every sequence and a loss shape error reported shapes the user
  never passed (``targets of shape (1,)``, advice ``y.view_as(output)``); it now says that the
  model's output does not follow the inputs' first axis.

Sequence-first layers inside batch-major models (transposed in ``forward``), whose outputs hold
the examples first, keep working and stay exact against dense float64 brute force.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab._layout import MixedExamplesError
from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer

V = 6  # vocabulary of the word LM


class WordLM(nn.Module):
    """torch's word_language_model: ids ``(T, B)`` to logits ``(T, B, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(V, 3)
        self.rnn = nn.LSTM(3, 3)
        self.dec = nn.Linear(3, V)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.rnn(self.enc(x))
        return self.dec(o)


class TimeMajorEncoder(nn.Module):
    """Features ``(T, B, 4)`` through a sequence-first TransformerEncoder, logits ``(T, B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=4, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x))


class PooledLinear(nn.Module):
    """Time-major ``(T, B, 3)`` features, pooled over time: logits ``(B, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.l1(x)).mean(0))


class PooledLSTM(nn.Module):
    """Time-major ``(T, B, 3)`` through a sequence-first LSTM, the last step's logits ``(B, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 2)
        self.head = nn.Linear(2, 5)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.rnn(x)
        return self.head(o[-1])


class BatchMajorLSTM(nn.Module):
    """Ids ``(B, T)``; a sequence-first LSTM run on the transposed embeddings (the correct use);
    ``center``: features centred over the batch after it (a real coupling)."""

    def __init__(self, center: bool = False) -> None:
        super().__init__()
        self.center = center
        self.emb = nn.Embedding(7, 3)
        self.rnn = nn.LSTM(3, 2)
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        o, _ = self.rnn(self.emb(x).transpose(0, 1))
        h = o[-1]
        if self.center:
            h = h - h.mean(0)
        return self.head(h)


class BatchMajorEncoder(nn.Module):
    """Ids ``(B, T)``; a sequence-first TransformerEncoder on the transposed embeddings, logits
    ``(B, T, 5)`` (examples first)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=4, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(self.emb(x).transpose(0, 1))
        return self.head(h.transpose(0, 1))


def _model(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).double().eval()


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_example_grads(model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor) -> Tensor:
    """Dense float64 brute force: each example's loss gradient by plain autograd on its slice
    of the true batch axis (the first), flattened in ``named_parameters`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1])
        if out.ndim == 3:  # GPT layout: logits (B, T, C), targets (B, T)
            loss = loss_fn(out.reshape(-1, out.shape[-1]), Y[i : i + 1].reshape(-1))
        else:
            loss = loss_fn(out, Y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _flat(model: nn.Module, d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


# ------------------------------------------------------------------ finding 1: time-major layers
def _word_lm_batch() -> tuple[Tensor, Tensor]:
    g = _gen()
    return torch.randint(0, V, (5, 4), generator=g), torch.randint(0, V, (5, 4), generator=g)


def _assert_names_time_major(message: str, name: str, kind: str) -> None:
    assert f"module '{name}' ({kind}, batch_first=False)" in message, message
    assert "time-major" in message and "as time" in message, message
    assert "curvlab reads the first axis of every tensor as the examples" in message, message
    assert "batch_first=True" in message and "transpose(0, 1)" in message, message
    # the cause comes first, and no norm-layer advice for a model without batch statistics
    assert message.startswith("the batch is most likely time-major"), message
    assert "BatchNorm" not in message and "LayerNorm" not in message, message


QUANTITIES = {
    "gradient_stats": lambda m, lf, d: cl.gradient_stats(m, lf, d),
    "diag_fisher": lambda m, lf, d: cl.diag_fisher(m, lf, d),
    "diag_fisher_exact": lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="exact"),
    "fisher_norms": lambda m, lf, d: cl.fisher_norms(m, lf, d),
    "kfac": lambda m, lf, d: cl.kfac(m, lf, d),
}


@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_word_lm_time_major_names_the_layout(quantity: str) -> None:
    model = _model(WordLM)
    X, Y = _word_lm_batch()
    with pytest.raises(MixedExamplesError) as info:
        QUANTITIES[quantity](model, nn.CrossEntropyLoss(), (X, Y))
    _assert_names_time_major(str(info.value), "rnn", "LSTM")
    assert "input, of shape (5, 4, 3)" in str(info.value)


@pytest.mark.parametrize("sampler", [DiagFisherNoise, KFACNoise])
def test_word_lm_time_major_noise_names_the_layout(sampler: type) -> None:
    """The PyTorch example's own training step: the loss on ``out.view(-1, V)``."""
    model = _model(WordLM)
    X, Y = _word_lm_batch()
    loss_fn = nn.CrossEntropyLoss()
    opt = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        sampler("empirical", scale=1.0),
        model,
        loss_fn,
        seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(X).view(-1, V), Y.view(-1))
        loss.backward()
        return loss

    with pytest.raises(MixedExamplesError) as info:
        opt.step(closure)
    _assert_names_time_major(str(info.value), "rnn", "LSTM")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_time_major_transformer_names_the_layout() -> None:
    model = _model(TimeMajorEncoder)
    g = _gen()
    X = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)  # (T=5, B=3, d=4)
    Y = torch.randint(0, 3, (5, 3), generator=g)
    with pytest.raises(MixedExamplesError) as info:
        cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, Y))
    message = str(info.value)
    # the encoder layer (torch's fast path) or its attention, whichever runs the time axis
    assert (
        "module 'enc.layers.0' (TransformerEncoderLayer, batch_first=False)" in message
        or "module 'enc.layers.0.self_attn' (MultiheadAttention, batch_first=False)" in message
    ), message
    assert message.startswith("the batch is most likely time-major"), message


def test_coupling_beside_a_correct_seq_first_layer_keeps_its_message() -> None:
    """A sequence-first LSTM used correctly (``B == T``, so its input's first axis has the
    batch's size) beside a real coupling: the coupling is named, not the layout."""
    model = _model(BatchMajorLSTM, True)
    g = _gen()
    X, Y = torch.randint(0, 7, (4, 4), generator=g), torch.randint(0, 3, (4,), generator=g)
    with pytest.raises(MixedExamplesError) as info:
        cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, Y))
    message = str(info.value)
    assert message.startswith("the model mixes the examples of a batch"), message
    assert "time-major" not in message and "batch_first" not in message, message


@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_seq_first_lstm_inside_batch_major_model_stays_exact(B: int, T: int) -> None:
    model = _model(BatchMajorLSTM)
    g = _gen(B)
    X, Y = torch.randint(0, 7, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    G = _per_example_grads(model, loss_fn, X, Y)
    fisher = cl.diag_fisher(model, loss_fn, (X, Y))
    torch.testing.assert_close(_flat(model, fisher), (G**2).mean(0), rtol=1e-10, atol=1e-14)
    stats = cl.gradient_stats(model, loss_fn, (X, Y))
    torch.testing.assert_close(_flat(model, stats.mean), G.mean(0), rtol=1e-10, atol=1e-14)
    variance = G.var(0, unbiased=False)
    torch.testing.assert_close(_flat(model, stats.variance), variance, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("B,T", [(3, 3), (2, 4)])
def test_seq_first_encoder_inside_batch_major_model_stays_exact(B: int, T: int) -> None:
    model = _model(BatchMajorEncoder)
    g = _gen(B + T)
    X, Y = torch.randint(0, 7, (B, T), generator=g), torch.randint(0, 5, (B, T), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    G = _per_example_grads(model, loss_fn, X, Y)
    stats = cl.gradient_stats(model, loss_fn, (X, Y))
    torch.testing.assert_close(_flat(model, stats.mean), G.mean(0), rtol=1e-9, atol=1e-13)
    variance = G.var(0, unbiased=False)
    torch.testing.assert_close(_flat(model, stats.variance), variance, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------- finding 2: outputs that do not follow
def _pooled_batch(n: int, mse: bool) -> tuple[Tensor, Tensor]:
    g = _gen(n)
    X = torch.randn(n, n, 3, generator=g, dtype=torch.float64)  # (T, B, d) with T == B
    Y = (
        torch.randn(n, 5, generator=g, dtype=torch.float64)
        if mse
        else torch.randint(0, 5, (n,), generator=g)
    )
    return X, Y


def _assert_names_the_output(message: str, n: int, k: int) -> None:
    assert f"the model's output has {n} rows for {n} examples and {n} for {k}" in message, message
    assert "its first axis is not the inputs' first axis" in message, message
    assert "time-major" in message and "batch_first=True" in message, message
    assert "curvlab reads the first axis of every input tensor as the examples" in message
    assert "output follows the inputs' first axis" in message, message
    # not the shapes of one sliced "example" (the user passed (n, 5) and (n,))
    assert "(1,)" not in message and "(1, 5)" not in message and "view_as" not in message


@pytest.mark.parametrize("quantity", list(QUANTITIES))
@pytest.mark.parametrize("cls", [PooledLinear, PooledLSTM])
def test_pooled_time_major_output_is_named(cls: type[nn.Module], quantity: str) -> None:
    model = _model(cls)
    X, Y = _pooled_batch(4, mse=False)
    with pytest.raises(ValueError) as info:
        QUANTITIES[quantity](model, nn.CrossEntropyLoss(), (X, Y))
    assert not isinstance(info.value, MixedExamplesError)
    _assert_names_the_output(str(info.value), 4, 2)
    if cls is PooledLSTM:  # the sequence-first layer reading time first is named
        assert "module 'rnn' (LSTM, batch_first=False)" in str(info.value)


def test_pooled_time_major_output_is_named_for_mse_and_two_examples() -> None:
    model = _model(PooledLinear)
    X, Y = _pooled_batch(4, mse=True)
    with pytest.raises(ValueError) as info:
        cl.diag_fisher(model, nn.MSELoss(), (X, Y))
    _assert_names_the_output(str(info.value), 4, 2)
    X, Y = _pooled_batch(2, mse=False)
    with pytest.raises(ValueError) as info:
        cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, Y))
    _assert_names_the_output(str(info.value), 2, 1)


def test_pooled_time_major_noise_capture_is_named() -> None:
    model = _model(PooledLSTM)
    X, Y = _pooled_batch(4, mse=False)
    loss_fn = nn.CrossEntropyLoss()
    opt = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        DiagFisherNoise("empirical", scale=1.0),
        model,
        loss_fn,
        seed=0,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        return loss

    with pytest.raises(ValueError) as info:
        opt.step(closure)
    _assert_names_the_output(str(info.value), 4, 2)


def test_pooled_time_major_whole_batch_trace_still_runs() -> None:
    """The whole batch's loss does not split it into examples: ``trace`` stays exact."""
    model = _model(PooledLinear)
    X, Y = _pooled_batch(4, mse=False)
    loss_fn = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of(flat: Tensor) -> Tensor:
        out, start = {}, 0
        for n in names:
            k = params[n].numel()
            out[n] = flat[start : start + k].reshape(params[n].shape)
            start += k
        return loss_fn(torch.func.functional_call(model, out, (X,)), Y)

    H = torch.autograd.functional.hessian(loss_of, theta)
    result = cl.trace(model, loss_fn, (X, Y), matrix="hessian", method="exact")
    assert abs(float(result.value) - float(H.diagonal().sum())) < 1e-10


def test_pooled_time_major_kfac_of_the_first_layer_alone_is_refused() -> None:
    """With the batch-major head left out, ``kfac`` took the time steps for the examples: the
    ``approx="reduce"`` factors (each example's mean input, its summed output gradient) grouped
    the wrong rows (weight block trace 0.1007 for 0.1637 of the same model run batch-major)."""
    model = _model(PooledLinear)
    X, Y = _pooled_batch(4, mse=False)
    with pytest.raises(ValueError) as info:
        cl.kfac(
            model,
            nn.CrossEntropyLoss(),
            (X, Y),
            params=lambda name, p: name.startswith("l1."),
            approx="reduce",
        )
    _assert_names_the_output(str(info.value), 4, 2)


def test_time_major_finding_survives_the_ranks_gather() -> None:
    """Under torch.distributed the finding is pickled to the other ranks and noted with the
    rank that found it: it stays a time-major one."""
    import pickle

    from curvlab._layout import LikelyTimeMajor, _noted, finding_error, shareable

    found = LikelyTimeMajor("module 'rnn' (LSTM) mixes them", "module 'rnn' (LSTM, ...) reads")
    theirs = pickle.loads(pickle.dumps(shareable(found)))
    noted = _noted(theirs, " (on rank 1's first chunk; every rank raises this error)")
    assert isinstance(noted, LikelyTimeMajor)
    message = str(finding_error(noted))
    assert message.startswith("the batch is most likely time-major (T, B, ...): module 'rnn'")
    assert "on rank 1's first chunk" in message, message
