"""Layers that do not hold the examples in their first dimension: K-FAC and the captured noise.

``kfac`` and the samplers' one-pass capture (DiagFisherNoise, KFACNoise) read a layer's rows as
the examples. A sequence-first layer (``(T, N, d)``, torch's Transformer layers without
``batch_first=True``), inputs reshaped to ``(N*T, d)`` or a layer on position features broadcast over
the batch broke that silently: K-FAC's ``A`` was ``T/N`` times too large, the captured diagonal
45% off. Such layers are now refused by ``kfac`` (naming the layer), left to the diagonal by
KFACNoise, and measured in the separate (general, exact) pass by the captures, also when the
leading size equals the batch size by coincidence (``T == N``: a forward pass on fewer examples tells).
References: per-example gradients by torch.func in float64, and the factors of the same function
written batch-first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl

DT = torch.float64


class SeqFirst(nn.Module):
    """``l1`` sees ``(T, N, 3)``; the head is batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(x.transpose(0, 1))).transpose(0, 1))


class BatchFirst(SeqFirst):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(x)))


class Flattened(SeqFirst):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return self.head(torch.tanh(self.l1(x.reshape(n * t, d))).reshape(n, t, -1))


class Broadcast(nn.Module):
    """``pos`` runs once on ``(T, 2)`` position features; its output is added to the batch."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.register_buffer("feats", torch.randn(T, 2, dtype=DT))
        self.pos = nn.Linear(2, 4)
        self.l1 = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(x) + self.pos(self.feats)))


def _data(N: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, T, 3, generator=g, dtype=DT)
    y = torch.randint(0, 5, (N, T), generator=g)
    y[0, 0] = -100
    return X, y


def _brute_empirical_diag(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """(1/N) sum_n g_n^2, g_n the gradient of example n's share of the mean loss times N."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    count = (y != -100).sum()

    def loss_n(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x[None],))[0]
        return nn.functional.cross_entropy(out, t, reduction="sum") / count

    N = X.shape[0]
    g = vmap(grad(loss_n), in_dims=(None, 0, 0))(params, X, y)
    return {k: (N * v).pow(2).sum(0) / N for k, v in g.items()}


@pytest.mark.parametrize("T", [2, 6])  # T == N: the leading size equals the batch size
@pytest.mark.parametrize("cls", [SeqFirst, Flattened, Broadcast])
def test_kfac_refuses_layers_without_the_examples_first(cls: type, T: int) -> None:
    torch.manual_seed(0)
    model = (cls(T) if cls is Broadcast else cls()).to(DT)
    X, y = _data(2, T)
    bad = "pos" if cls is Broadcast else "l1"
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"layer '{bad}' has leading sizes .*batch_first=True"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert torch.equal(rng, torch.get_rng_state())
    # leaving it out (as the error says) gives the other layers' factors, equal to those of the
    # same function written batch-first (checked against brute force in test_kfac_any_model.py)
    f = cl.kfac(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        kind="exact",
        params=lambda name, p: not name.startswith(f"{bad}."),
    )
    assert bad not in f
    if cls is not Broadcast:
        twin = BatchFirst().to(DT)
        twin.load_state_dict(model.state_dict())
        ref = cl.kfac(twin, nn.CrossEntropyLoss(), (X, y), kind="exact")
        torch.testing.assert_close(f["head"].A, ref["head"].A, rtol=1e-12, atol=0)
        torch.testing.assert_close(f["head"].G, ref["head"].G, rtol=1e-12, atol=0)


def test_kfac_batch_first_twin_unchanged_and_one_example_chunks() -> None:
    """Batch-first models are accepted whatever T (also T == N), and chunks of one example."""
    torch.manual_seed(1)
    model = BatchFirst().to(DT)
    X, y = _data(3, 3)
    whole = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    ones = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact", chunk_size=1)
    for name in ("l1", "head"):
        torch.testing.assert_close(whole[name].A, ones[name].A, rtol=1e-12, atol=0)
        torch.testing.assert_close(whole[name].G, ones[name].G, rtol=1e-12, atol=0)
    # A by its definition: (1/N) sum_n (1/T) sum_t x_nt x_nt^T
    A = torch.einsum("nti,ntj->ij", X, X) / 9
    torch.testing.assert_close(whole["l1"].A, A, rtol=1e-12, atol=0)


def test_kfac_layers_sharing_a_weight_with_own_biases_give_no_bias_block() -> None:
    """G of a shared weight sums all its layers; it is not either layer's bias block."""
    torch.manual_seed(2)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))

    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    f = cl.kfac(Shared().to(DT), nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert not f["a"].has_bias and f["a"].bias_block() is None and "b" not in f
    assert f["head"].has_bias
    g = cl.kfac(Twice().to(DT), nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert g["a"].has_bias  # one bias used by both calls: G is its factor


@pytest.mark.parametrize("cls", [SeqFirst, Flattened])
@pytest.mark.parametrize("T", [2, 6])
def test_captured_diagonal_noise_state_on_misplaced_layers(cls: type, T: int) -> None:
    """DiagFisherNoise measured inside the step equals the brute-force empirical diagonal."""
    torch.manual_seed(3)
    model, loss = cls().to(DT), nn.CrossEntropyLoss()
    X, y = _data(2, T)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(
        opt, cl.noise.DiagFisherNoise("empirical", scale=1.0), model, loss, seed=0
    )
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        for _ in range(2):
            noisy.zero_grad()
            with noisy.capture():
                loss(model(X).reshape(-1, 5), y.reshape(-1)).backward()
            noisy.step()
    finally:
        handle.remove()
    ref = _brute_empirical_diag(model, X, y)
    assert set(noisy._state) == set(ref)
    for k in ref:
        torch.testing.assert_close(noisy._state[k], ref[k], rtol=1e-10, atol=1e-14)


def test_captured_diagonal_noise_probes_once_per_signature() -> None:
    """A batch-first model keeps its one-pass capture; the layout check runs once."""
    torch.manual_seed(4)
    model, loss = BatchFirst().to(DT), nn.CrossEntropyLoss()
    X, y = _data(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(
        opt, cl.noise.DiagFisherNoise("empirical", scale=1.0), model, loss, seed=0
    )
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        for _ in range(3):
            noisy.zero_grad()
            with noisy.capture():
                loss(model(X).reshape(-1, 5), y.reshape(-1)).backward()
            noisy.step()
    finally:
        handle.remove()
    # the step's forward, the layout probe (2 examples) and the mixed-examples check's passes (1
    # and 2 examples, review s24) once, with the watched one-example pass with gradient (review
    # s26: a forward that differentiates only with gradient), then the steps alone
    assert calls == [3, 2, 1, 1, 2, 3, 3]
    ref = _brute_empirical_diag(model, X, y)
    for k in ref:
        torch.testing.assert_close(noisy._state[k], ref[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("T", [2, 6])
def test_kfac_noise_gives_misplaced_layers_the_diagonal(T: int) -> None:
    """KFACNoise: the sequence-first layer gets the brute-force diagonal, the head K-FAC; the
    capture and the separate pass agree."""
    torch.manual_seed(5)
    model, loss = SeqFirst().to(DT), nn.CrossEntropyLoss()
    X, y = _data(2, T)

    def state(capture: bool) -> dict:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        noisy = cl.noise.NoisyOptimizer(
            opt, cl.noise.KFACNoise("empirical", scale=1.0), model, loss, seed=0
        )
        noisy.zero_grad()
        if capture:
            with noisy.capture():
                loss(model(X).reshape(-1, 5), y.reshape(-1)).backward()
            noisy.step()
        else:
            loss(model(X).reshape(-1, 5), y.reshape(-1)).backward()
            noisy.step(inputs=X, targets=y)
        return noisy._state

    ref = _brute_empirical_diag(model, X, y)
    twin = BatchFirst().to(DT)
    twin.load_state_dict(model.state_dict())
    head = cl.kfac(twin, loss, (X, y), kind="empirical")["head"]
    for st in (state(True), state(False)):
        assert set(st) == {"head", "__diagonal__"}
        assert set(st["__diagonal__"]) == {"l1.weight", "l1.bias"}
        for k, v in st["__diagonal__"].items():
            torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-14)
        B, C = st["head"]["B"], st["head"]["C"]
        torch.testing.assert_close(B @ B.T, head.G, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(C.T @ C, head.A, rtol=1e-8, atol=1e-12)


class Normalised(nn.Module):
    """A model called with a mask beside its inputs, with a running input normaliser (buffers
    that every forward updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=DT))
        self.register_buffer("mean", torch.zeros(3, dtype=DT))
        self.l1 = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.count += 1
            self.mean += (x.mean((0, 1)) - self.mean) / self.count
        return self.head(torch.tanh(self.l1(x - self.mean))) * mask[..., None]


def test_the_layout_check_replays_the_call_and_leaves_buffers_alone() -> None:
    """The probe replays the step's call (a mask argument cut alike) and puts every buffer back:
    the step's exact capture, and the buffers as after the training forward alone."""
    torch.manual_seed(11)
    X, y = _data(3, 3)
    mask = torch.ones(3, 3, dtype=DT)
    states = []
    for with_noise in (False, True):
        model, loss = Normalised().to(DT), nn.CrossEntropyLoss()
        if with_noise:
            noisy = cl.noise.NoisyOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0),
                cl.noise.DiagFisherNoise("empirical", scale=1.0),
                model,
                loss,
                seed=0,
            )
            with noisy.capture():
                loss(model(X, mask).reshape(-1, 5), y.reshape(-1)).backward()
            noisy.step()
            assert set(noisy._state) == {"l1.weight", "l1.bias", "head.weight", "head.bias"}
        else:
            loss(model(X, mask).reshape(-1, 5), y.reshape(-1)).backward()
        states.append({k: v.clone() for k, v in model.named_buffers()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
