"""Operators refuse products after parameter or buffer values changed in place through ``.data``
(review s19, F#1).

``p.data.add_(...)`` moves neither the parameter's version counter nor its storage: products of
an operator over several batches (which run the forward pass again) silently came out at the new
values (a Hessian product 0.40 away from the built matrix). The promise (docs/estimators.md): an
operator refers to the model as it was built, and products are refused after any parameter or
buffer it reads changes, in place, through ``.data`` or by replacement.

Brute force: the dense float64 Hessian / GGN of the whole data's loss by ``torch.func``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab.operators._state import ModelStateError

EPS = torch.finfo(torch.float64).eps


def _setup(seed: int = 0, act: type[nn.Module] = nn.Tanh):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).double()
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, X, y


def _flat_call(model: nn.Module, names: list[str]):
    """``f(flat, X) -> output`` over the parameters ``names`` (the others as they are now)."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [fixed[n].shape for n in names]

    def call(flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        params, i = dict(fixed), 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return functional_call(model, params, (X,))

    flat = torch.cat([fixed[n].reshape(-1) for n in names])
    return call, flat


def dense_hessian(model: nn.Module, X, y, names: list[str] | None = None) -> torch.Tensor:
    names = names or [n for n, _ in model.named_parameters()]
    call, flat = _flat_call(model, names)
    return hessian(lambda f: nn.functional.cross_entropy(call(f, X), y))(flat)


def dense_ggn(model: nn.Module, X, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    call, flat = _flat_call(model, names)
    J = jacrev(lambda f: call(f, X))(flat)  # (N, C, D)
    out = call(flat, X).detach()
    L = hessian(lambda o: nn.functional.cross_entropy(o, y))(out)  # (N, C, N, C)
    return torch.einsum("nci,ncmd,mdj->ij", J, L, J)


def _tol(A: torch.Tensor, v: torch.Tensor) -> float:
    """Rounding of ``A v`` summed over ``D`` products of float64 entries (autograd's order), with
    a factor of 64 for the per-example sums behind each entry."""
    return 64 * A.shape[0] * EPS * float((A.abs() @ v.abs()).max())


def _vec(n: int) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


WAYS = {
    "add_": lambda p: p.data.add_(0.5),
    "copy_": lambda p: p.data.copy_(p.detach() * 0.5 + 0.1),
    "clamp_": lambda p: p.data.clamp_(-0.05, 0.05),  # WGAN clipping
    "mul_": lambda p: p.data.mul_(0.9).add_(0.1 * torch.ones_like(p)),  # an EMA step
}


@pytest.mark.parametrize("way", list(WAYS))
def test_several_batches_refuse_after_data_change(way):
    model, X, y = _setup()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    H0 = dense_hessian(model, X, y)
    v = _vec(H0.shape[0])
    assert (op.matvec(v) - H0 @ v).abs().max() <= _tol(H0, v)
    w = model[0].weight
    version = w._version
    WAYS[way](w)
    assert w._version == version  # .data: autograd's counter did not move
    with pytest.raises(ModelStateError, match=r"'0\.weight'.*through \.data"):
        op.matvec(v)  # was: H(new parameters) v, silently
    with pytest.raises(ModelStateError, match="every later one"):
        op.matvec(v)  # for good


def test_kept_graph_refuses_after_data_change():
    """One batch: the graph kept at construction shares the parameters' storage; the operator
    refuses rather than apply a matrix neither the built one nor the new one."""
    model, X, y = _setup()
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), (X, y), matrix="hessian")
    assert op.keep_graph
    H0 = dense_hessian(model, X, y)
    v = _vec(H0.shape[0])
    assert (op.matvec(v) - H0 @ v).abs().max() <= _tol(H0, v)
    model[2].bias.data.copy_(torch.tensor([0.3, -0.3], dtype=torch.float64))
    with pytest.raises(ModelStateError, match=r"'2\.bias'"):
        op.matvec(v)


def test_outside_params_sgd_step_through_data_refused():
    """A hand-written SGD step on the backbone of a params= head: the head's Hessian depends on
    the backbone, which the forward passes read."""
    model, X, y = _setup()
    head = ["2.weight", "2.bias"]
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian", params=head)
    H0 = dense_hessian(model, X, y, head)
    v = _vec(H0.shape[0])
    assert (op.matvec(v) - H0 @ v).abs().max() <= _tol(H0, v)
    nn.functional.cross_entropy(model(X), y).backward()
    for p in model[0].parameters():
        p.data.add_(-0.5 * p.grad)
    H1 = dense_hessian(model, X, y, head)
    assert (H1 @ v - H0 @ v).abs().max() > 1e3 * _tol(H0, v)  # the step changes the matrix
    with pytest.raises(ModelStateError, match=r"'0\.bias'.*'0\.weight'.*outside"):
        op.matvec(v)


class _Scaled(nn.Module):
    """A layer whose forward reads a float buffer (not one curvlab runs on copies of)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * self.scale


def test_buffer_changed_through_data_refused():
    torch.manual_seed(0)
    model = _Scaled().double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    H0 = dense_hessian(model, X, y)
    v = _vec(H0.shape[0])
    assert (op.matvec(v) - H0 @ v).abs().max() <= _tol(H0, v)
    model.scale.data.mul_(2.0)
    with pytest.raises(ModelStateError, match=r"buffers.*'scale'"):
        op.matvec(v)


def test_forward_mode_products_refuse_after_data_change():
    """GGN of a Hardsigmoid model: J v in forward mode runs the forward at every product, also
    with the one batch's graph kept."""
    model, X, y = _setup(act=nn.Hardsigmoid)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), (X, y), matrix="ggn")
    G0 = dense_ggn(model, X, y)
    v = _vec(G0.shape[0])
    assert (op.matvec(v) - G0 @ v).abs().max() <= _tol(G0, v)
    assert op._forward_passes()
    model[0].weight.data.add_(0.5)
    with pytest.raises(ModelStateError, match=r"'0\.weight'"):
        op.matvec(v)


@pytest.mark.parametrize(
    "change",
    [
        # the signs + - - + of a 2x2 weight flipped: the plain and the position-weighted sums of
        # the float64 bits as int64 both stay (each sign bit is 2^63)
        lambda w: w.data.neg_(),
        lambda w: w.data.copy_(w.detach().flip(0)),  # rows swapped: the sums stay
        lambda w: w.data.view(-1)[3].copy_(torch.nextafter(w[1, 1].detach(), w.new_tensor(9.0))),
    ],
    ids=["signs", "rows", "one_ulp"],
)
def test_changes_that_keep_sums_are_seen(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.5, 0.25], [0.75, -0.125]]))
    X = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0])
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    v = _vec(op.shape[0])
    op.matvec(v)
    change(model[0].weight)
    with pytest.raises(ModelStateError, match=r"'0\.weight'"):
        op.matvec(v)


def test_same_values_through_data_accepted():
    """No false refusal: values written back unchanged through .data (a no-op clamp, a copy of
    themselves, SAM's restore), and products after the number of threads changed (the check
    sums integers: its result does not depend on the order of the additions)."""
    model, X, y = _setup()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    H0 = dense_hessian(model, X, y)
    v = _vec(H0.shape[0])
    w = model[0].weight
    saved = w.detach().clone()
    w.data.clamp_(-100.0, 100.0)
    w.data.copy_(saved)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        for _ in range(2):
            assert (op.matvec(v) - H0 @ v).abs().max() <= _tol(H0, v)
    finally:
        torch.set_num_threads(threads)


def test_max_norm_embedding_still_accepted():
    """The forward renormalises an Embedding(max_norm=...) weight in place (curvlab puts the
    values back): its bits are unchanged, so products go on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[0].weight.mul_(0.1)  # no row renormalised (its version still moves at each pass)
    X = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])
    y = torch.tensor([0, 1, 1, 0])
    op = cl.curvature_operator(
        model, nn.CrossEntropyLoss(), [(X[:2], y[:2]), (X[2:], y[2:])], matrix="hessian"
    )
    v = _vec(op.shape[0])
    first = op.matvec(v)
    assert torch.equal(op.matvec(v), first)
    model[2].weight.data.add_(1.0)
    with pytest.raises(ModelStateError, match=r"'2\.weight'"):
        op.matvec(v)


def test_every_dtype_and_a_chunked_tensor_seen():
    """The record behind the check, tensor by tensor: a change of one entry through .data of a
    buffer of each kind of element (1-, 2-, 4-, 8- and 16-byte, non-contiguous, one of more
    entries than a chunk, changed in its second chunk) is named, and nothing else is."""
    from curvlab.operators._state import _BITS_CHUNK, ModelState

    g = torch.Generator().manual_seed(0)
    m = nn.Module()
    bufs = {
        "flag": torch.tensor([True, False, True]),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "tw": torch.randn(3, 4, generator=g).t(),  # non-contiguous
        "count": torch.tensor([7, 2**40], dtype=torch.int64),
        "cplx": torch.randn(3, dtype=torch.complex128, generator=g),
        "big": torch.randn(_BITS_CHUNK + 7, generator=g),
    }
    for name, b in bufs.items():
        m.register_buffer(name, b)
    state = ModelState(m, copied=[])
    assert not any(bool(f) for f in state.values_moved())
    for name, b in bufs.items():
        i = -1 if name == "big" else 1
        old = b.data.reshape(-1)[i].clone() if b.is_contiguous() else b.data[1, 1].clone()
        target = b.data.view(-1) if b.is_contiguous() else b.data[1]
        j = i if b.is_contiguous() else 1
        target[j] = ~old if b.dtype == torch.bool else old + 1
        assert any(bool(f) for f in state.values_moved()), name
        assert state.values_changed().changed == [name]
        target[j] = old  # the bits back: no change
        assert not any(bool(f) for f in state.values_moved()), name


# --------------------------------------------------------------------------- review s19, O2
# The fingerprint above cost 1.4-2 s per product on GPT-2 small on a CPU (25-45% of a Hessian
# product): its word path reads the bytes as int64 words (two int64 matrix-vector products), and
# the estimators compare it before their first product and after their last only.

_M64 = (1 << 64) - 1


def _reference_word_sums(t: torch.Tensor) -> list[int]:
    """The CPU fingerprint by its definition, in Python integers modulo 2^64 (the weights are
    the package's; the sums are not): words from byte 0 and from byte 4, rows of 1024 words
    weighted by column then by row, and the bytes in no word's low half."""
    from curvlab.operators._state import _WORDS_PER_ROW, BitWeights

    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    raw = flat.contiguous().view(torch.uint8).numpy().tobytes()
    w = BitWeights("cpu")
    n = len(raw)
    whole, shifted = n // 8, max(0, (n - 4) // 8)
    u = [int(x) & _M64 for x in w.rows(max(whole, shifted) // _WORDS_PER_ROW + 1).tolist()]
    out = []
    for start, count, cols in ((0, whole, w.columns[0]), (4, shifted, w.columns[1])):
        c = [int(x) & _M64 for x in cols.tolist()]
        acc = 0
        for i in range(count):
            word = int.from_bytes(raw[start + 8 * i : start + 8 * i + 8], "little", signed=False)
            r, col = divmod(i, _WORDS_PER_ROW)
            acc += u[r] * c[col] * word
        out.append(acc & _M64)
    tail = raw[max(0, 8 * whole - 4, 8 * shifted) :]
    chunk = [int(x) & _M64 for x in w.chunk(len(tail))[0].tolist()]
    out.append(sum(b * chunk[i] for i, b in enumerate(tail)) & _M64)
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(2 * 1024 + 3, generator=g),  # float32: two full rows and a part
        lambda g: torch.randn(1030, generator=g, dtype=torch.float64)[1:],  # 8-byte, offset 8
        lambda g: torch.randn(2051, generator=g)[1:],  # storage offset 4 bytes: unaligned words
        lambda g: torch.randn(37, generator=g).to(torch.bfloat16)[1:],  # offset 2, 72 bytes
        lambda g: torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8)[3:],  # 10 bytes
        lambda g: torch.randn(5, generator=g, dtype=torch.complex64),
        lambda g: torch.tensor([True]),  # 1 byte: the tail only
    ],
    ids=["f32", "f64_offset", "f32_unaligned", "bf16", "uint8", "complex", "one_byte"],
)
def test_word_fingerprint_is_exact_and_thread_independent(make):
    """The word path's sums are the exact sums modulo 2^64 (Python integers), whatever the
    number of threads (no false refusal): any order of the additions gives them."""
    from curvlab.operators._state import bit_sums

    t = make(torch.Generator().manual_seed(0))
    want = _reference_word_sums(t)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = [int(x) & _M64 for x in bit_sums(t).tolist()]
            assert got == want
    finally:
        torch.set_num_threads(threads)


def test_word_fingerprint_sees_every_byte_and_sign_pairs():
    """Every single-byte change, at every storage offset and length up to 40 bytes, changes the
    fingerprint; so do flipped sign bits in pairs, which a plain sum of int64 words modulo 2^64
    sees only through its parity (two float32 signs in the words' top halves, or two float64
    signs: the sum of the word changes, 2^63 + 2^63, is 0)."""
    from curvlab.operators._state import BitWeights, bit_sums

    w = BitWeights("cpu")
    base = torch.arange(48, dtype=torch.uint8) * 37 + 11
    for offset in range(8):
        for n in range(1, 41):
            t = base.clone()[offset : offset + n]
            before = bit_sums(t, w)
            for i in range(n):
                t[i] ^= 1 << (i % 8)
                assert not torch.equal(bit_sums(t, w), before), (offset, n, i)
                t[i] ^= 1 << (i % 8)
            assert torch.equal(bit_sums(t, w), before)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    naive = x.view(torch.int64).sum()
    before = bit_sums(x, w)
    x[1::2][:2].neg_()  # the signs of entries 1 and 3: the top bits of words 0 and 1
    assert torch.equal(x.view(torch.int64).sum(), naive)  # a plain sum misses it
    assert not torch.equal(bit_sums(x, w), before)
    d = torch.randn(1024, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = bit_sums(d, w)
    d.neg_()  # every sign bit, 1024 of them
    assert not torch.equal(bit_sums(d, w), before)


def test_integer_path_still_exact_and_sensitive():
    """The integer path (CUDA's) on a CPU tensor: one entry of a chunked tensor changed in its
    second chunk changes it; the bits put back give the same sums."""
    from curvlab.operators._state import _BITS_CHUNK, BitWeights, _bits, _sum_bits

    w = BitWeights("cpu").chunk(_BITS_CHUNK)
    t = torch.randn(_BITS_CHUNK + 5, generator=torch.Generator().manual_seed(0))
    before = _sum_bits(_bits(t), w)
    t[-2] = -t[-2]
    assert not torch.equal(_sum_bits(_bits(t), w), before)
    t[-2] = -t[-2]
    assert torch.equal(_sum_bits(_bits(t), w), before)


class _Counting:
    """Counts ModelState.values_moved calls (one fingerprint of every tensor each)."""

    def __init__(self, monkeypatch) -> None:
        from curvlab.operators._state import ModelState

        self.calls = 0
        original = ModelState.values_moved

        def counted(state):
            self.calls += 1
            return original(state)

        monkeypatch.setattr(ModelState, "values_moved", counted)


def test_estimators_fingerprint_twice_per_run(monkeypatch):
    """An estimator's run compares the values before its first product and after its last, not
    at each of its products (eigenvalues(k=1): 10 products; trace: 10 probes one at a time;
    SLQ: 2 x 10 products), and its results stay exact (brute force). A run of one product
    compares once."""
    model, X, y = _setup()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    H = dense_hessian(model, X, y)
    count = _Counting(monkeypatch)
    res = cl.eigenvalues(model, nn.CrossEntropyLoss(), batches, k=1, tol=1e-10)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(res.values[0] - top) <= 1e-8 * abs(top)
    assert res.num_matvecs >= 5 and count.calls == 2
    count.calls = 0
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    tr = cl.estimators.hutchinson(op, num_probes=10, batch_size=1)
    assert tr.num_matvecs == 10 and count.calls == 2
    count.calls = 0
    exact = cl.estimators.exact_trace(op, batch_size=1)
    assert abs(exact.value - float(H.trace())) <= 64 * H.shape[0] * EPS * float(H.abs().sum())
    assert count.calls == 2
    count.calls = 0
    cl.estimators.slq(op, num_steps=10, num_probes=2)
    assert count.calls == 2
    count.calls = 0
    cl.estimators.hutchinson(op, num_probes=10, batch_size=10)  # one product of 10 columns
    assert count.calls == 1
    count.calls = 0
    v = _vec(op.shape[0])
    for _ in range(3):  # the user's own products: compared one by one
        op.matvec(v)
    assert count.calls == 3


class _ShrinksItself(nn.Module):
    """A model whose forward pass scales its last weight through .data at every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.shrink = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shrink:
            self.net[2].weight.data.mul_(0.5)
        return self.net(x)


def test_forward_changing_values_refused_at_the_end_of_a_run():
    """Inside an estimator's run the products are not compared one by one: a forward that
    changes values through .data is refused at the end (no result returned), for good."""
    torch.manual_seed(0)
    model = _ShrinksItself().double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    model.shrink = True  # (a plain attribute of the model's own: ModelStructure sees it)
    op._state.structure.after_own_passes()
    with pytest.raises(ModelStateError, match=r"'net\.2\.weight'.*end of hutchinson"):
        cl.estimators.hutchinson(op, num_probes=4, batch_size=1)
    with pytest.raises(ModelStateError, match="every later product"):
        op.matvec(_vec(op.shape[0]))


def test_change_before_or_between_runs_refused_at_first_product():
    """A change through .data before a run (after the build, or between two runs) is refused at
    the run's first product, before its result; a run that raised leaves the operator checking
    its products one by one again."""
    model, X, y = _setup()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    first = cl.estimators.hutchinson(op, num_probes=3, batch_size=1)
    assert first.num_matvecs == 3
    model[0].bias.data.add_(0.25)
    with pytest.raises(ModelStateError, match=r"'0\.bias'.*through \.data"):
        cl.estimators.hutchinson(op, num_probes=3, batch_size=1)
    assert op.num_matvecs == 3  # the refused product is not counted
    assert op._values_run is None and op._values_products == 0
    op2 = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    model[2].weight.data.mul_(2.0)
    with pytest.raises(ModelStateError, match=r"'2\.weight'"):
        cl.estimators.lanczos_eigenvalues(op2, k=1)


def test_sharpness_krylov_run_fingerprints_twice(monkeypatch):
    """The sharpness measurement's Krylov run (warm_top_eigenvalue, plain and preconditioned)
    compares the model's values before its first product and after its last, like the public
    estimators, and its top eigenvalue is the dense Hessian's."""
    from curvlab.analysis._sharpness import PreconditionedOperator, warm_top_eigenvalue

    model, X, y = _setup()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    H = dense_hessian(model, X, y)
    count = _Counting(monkeypatch)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, matrix="hessian")
    count.calls = 0
    theta, _, products, _, converged = warm_top_eigenvalue(op, None, 1e-10, seed=0)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert converged and abs(theta - top) <= 1e-8 * abs(top)
    assert products >= 3 and count.calls == 2
    count.calls = 0
    diag = torch.ones(op.shape[0], dtype=H.dtype)
    warm_top_eigenvalue(PreconditionedOperator(op, diag), None, 1e-10, seed=0)
    assert count.calls == 2


class _StridedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=torch.float64)[::2])  # a strided view
        self.b = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w) + self.b


def test_a_strided_parameter_changed_through_data_is_refused():
    """A float64 parameter that is a strided view had no fingerprint (its flattening took no
    dtype view): a product after ``w.data.mul_(3)`` ran at the new values (found in review
    s19). Refused now, and the product before the change is the dense Hessian's."""
    torch.manual_seed(0)
    model = _StridedParameter()
    assert model.w.stride() == (2,)
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    loss = nn.MSELoss()
    op = cl.curvature_operator(model, loss, [(X[:4], Y[:4]), (X[4:], Y[4:])], matrix="hessian")
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:3], theta[3:]
        return loss(torch.func.functional_call(model, {"w": w, "b": b}, (X,)), Y)

    H = torch.func.hessian(f)(flat)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-14)
    model.w.data.mul_(3.0)
    with pytest.raises(ModelStateError):
        op @ v
