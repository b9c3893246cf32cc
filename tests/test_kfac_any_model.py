"""``cl.kfac`` and ``cl.spectral_density`` on any model: tests/zoo.py's cases against dense references.

K-FAC (curvlab/quantities/_kfac.py, Eschenhagen et al., NeurIPS 2023). For a Linear/Conv layer the
weight is viewed as ``(out, in')`` (``in' = in * kernel``) and its Fisher block is approximated by
``kron(G, A)``. A weight applied ``R`` times (one layer called twice, several layers sharing one
weight) is one block, keyed by the first layer's name. With ``u_{n,r,t}`` the input (patch) of use
``r`` of example ``n`` at output position ``t`` of ``T`` and ``J_{n,r,t}`` the Jacobian of the
model's whole output with respect to that use's layer output at ``(n, t)``, the references are built
here from the definitions only (torch.func Jacobians through a zero perturbation ``eps`` of every
layer call, tests/bruteforce.py's output Hessian and gradient of the objective ``L``):

* ``"expand"``: ``A = (1/N) sum_n (1/R) sum_r (1/T) sum_t u u^T``;
  ``G_exact = sum_{n,r,t} J^T (d^2 L / d f^2) J`` (the GGN of ``L``, so the mean/sum and
  ``ignore_index`` token-count scaling come from ``L`` itself), ``G_empirical = s sum_{n,r,t}
  delta delta^T`` with ``delta = J^T dL/df`` and ``s = N`` under "mean" (the empirical Fisher is
  ``(1/N) sum g_n g_n^T`` with ``g_n = N grad c_n``), ``s = 1`` under "sum";
* ``"reduce"``: ``A = (1/N) sum_n ubar_n ubar_n^T`` with ``ubar_n`` the mean of ``u`` over uses and
  positions, ``G`` as above with ``J`` replaced by ``sum_{r,t} J_{n,r,t}``.

A Linear weight tied to an ``Embedding`` (the GPT heads) gets the factors of its Linear uses only
(the module docstring says so); the references do the same because only Linear/Conv calls are
perturbed.

Spectral density (curvlab/estimators/_density.py): Lanczos from the unit probe ``v`` gives a Gauss
quadrature whose moments ``sum_i tau_i theta_i^j`` equal ``v^T A^j v`` for ``j < 2m`` (checked per
probe for ``j <= 3`` against the dense Hessian/GGN, the probes rebuilt from the seed as the
estimator draws them), with weights summing to 1. With ``num_steps >= D`` the quadrature integrates
the probe's whole spectral measure: moments up to degree 7, smooth bumps and the returned broadened
density equal their dense counterparts. Its nodes are the eigenvalues only with reorthogonalisation
(``slq(..., reorth_passes=2)``; spectral_density's plain recurrence leaves unconverged Ritz values
with weight between eigenvalues). Over probes the mean first moment estimates ``tr(A)/D`` (within
5 standard errors, the standard error checked against its exact value, with a power check).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab.estimators._trace import probe_rows
from tests import bruteforce as B
from tests.zoo import BATCHINGS, ENTRIES, REDUCTIONS, make_case

slow = pytest.mark.slow
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# --------------------------------------------------------------------------- K-FAC references


def _call(model: nn.Module, inputs: Any) -> Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out if isinstance(out, Tensor) else out.logits


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ W + b, W stored (in, out), i.e. Linear(W.T)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if (isinstance(m, LAYERS) or _is_hf_conv1d(m)) and m.weight.requires_grad
    }


def _input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """``(N, T, in')``: row ``u_{n,t}`` = d z[n, channel 0, position t] / d W[0] (flattened)
    (for HF Conv1D: d z[n, t, 0] / d W[:, 0], W.T's first row)."""
    N = x.shape[0]
    if isinstance(layer, nn.Linear) or _is_hf_conv1d(layer):
        return x.reshape(N, -1, x.shape[-1])
    W = layer.weight.detach()

    def channel0(w0: Tensor) -> Tensor:
        w = torch.cat([w0.unsqueeze(0), W[1:]])
        return layer._conv_forward(x, w, None)[:, 0].reshape(N, -1)

    return jacrev(channel0)(W[0]).reshape(N, -1, W[0].numel())


def _output_columns(layer: nn.Module, J: Tensor, zshape: torch.Size) -> Tensor:
    """``J`` ``(F, *zshape)`` as ``(F, N, T, out)``."""
    F, N = J.shape[0], zshape[0]
    if isinstance(layer, nn.Linear) or _is_hf_conv1d(layer):
        return J.reshape(F, N, -1, zshape[-1])
    return J.reshape(F, N, zshape[1], -1).transpose(2, 3)


@functools.cache
def kfac_refs(entry: str, reduction: str) -> dict[str, Any]:
    """Dense K-FAC references of every block of ``entry`` (``"one"`` and ``"three"`` alike)."""
    case = make_case(f"{entry}-{reduction}-one")
    d = B.Dense(case)
    model, X, N = case.model, d.inputs, d.N
    layers = _layers(model)
    first: dict[int, str] = {}
    group = {n: first.setdefault(id(m.weight), n) for n, m in layers.items()}

    calls: list[tuple[str, Tensor, torch.Size]] = []  # (layer name, input, output shape)

    def capture(name: str):  # noqa: ANN202
        def fn(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            calls.append((name, inp[0].detach(), out.shape))

        return fn

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            out0 = _call(model, X)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out0, d.output, rtol=0, atol=0)

    def f(eps: tuple[Tensor, ...]) -> Tensor:
        counter = [0]

        def add(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            k = counter[0]
            counter[0] += 1
            return out + eps[k]

        hs = [m.register_forward_hook(add) for m in layers.values()]
        try:
            return _call(model, X).reshape(-1)
        finally:
            for h in hs:
                h.remove()

    zeros = tuple(torch.zeros(s, dtype=out0.dtype) for _, _, s in calls)
    Js = jacrev(f)(zeros)  # per call: (F, *zshape)
    H = d.output_hessian  # d^2 L / d f^2, (F, F)
    g = torch.func.grad(lambda o: B.loss_value(case.loss_fn, o, d.targets))(d.output).reshape(-1)
    s = float(N) if reduction == "mean" else 1.0

    uses: dict[str, int] = {}
    for name, _, _ in calls:
        uses[group[name]] = uses.get(group[name], 0) + 1
    refs: dict[str, dict[str, Tensor]] = {}
    terms: dict[str, int] = {}  # key -> uses x positions (1: a Linear layer on vectors used once)
    for (name, x, zshape), J in zip(calls, Js, strict=True):
        key, layer = group[name], layers[name]
        Jc = _output_columns(layer, J, zshape)  # (F, N, T, out)
        U = _input_rows(layer, x)  # (N, T, in')
        T, R = U.shape[1], uses[key]
        terms[key] = terms.get(key, 0) + T
        HJ = torch.einsum("fg,gnto->fnto", H, Jc)
        delta = torch.einsum("f,fnto->nto", g, Jc)
        r = refs.setdefault(key, {})
        parts = {
            "A_expand": torch.einsum("nti,ntj->ij", U, U) / (N * T * R),
            "G_exact_expand": torch.einsum("fnto,fntp->op", Jc, HJ),
            "G_empirical_expand": s * torch.einsum("nto,ntp->op", delta, delta),
            "ubar": U.mean(1) / R,  # (N, in')
            "Jbar": Jc.sum(2),  # (F, N, out)
            "dbar": delta.sum(1),  # (N, out)
        }
        for k, v in parts.items():
            r[k] = r[k] + v if k in r else v
    for r in refs.values():
        ubar, Jbar, dbar = r.pop("ubar"), r.pop("Jbar"), r.pop("dbar")
        r["A_reduce"] = ubar.T @ ubar / N
        r["G_exact_reduce"] = torch.einsum("fno,fg,gnp->op", Jbar, H, Jbar)
        r["G_empirical_reduce"] = s * dbar.T @ dbar
    refs = {k: {n: v.detach() for n, v in r.items()} for k, r in refs.items()}
    return {
        "refs": refs,
        "terms": terms,
        "calls": [n for n, _, _ in calls],
        "layers": layers,
        "group": group,
    }


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    atol = 1e-10 * max(B.scale_of(expected), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------- K-FAC tests

# every zoo entry (all have Linear or Conv layers); the GPTs' references take ~2 s each
KFAC_CASES = [f"{e}-{r}-{b}" for e in ENTRIES for r in REDUCTIONS for b in BATCHINGS]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("name", KFAC_CASES)
def test_kfac_equals_dense_reference(name: str, kind: str, approx: str) -> None:
    case = make_case(name)
    ref = kfac_refs(case.entry, case.reduction)
    factors = cl.kfac(case.model, case.loss_fn, case.data, kind=kind, approx=approx)
    # one block per weight, keyed by the first layer that holds it, only for layers that ran
    assert set(factors) == set(ref["refs"]), (sorted(factors), sorted(ref["refs"]))
    assert factors.info["num_examples"] == 8 and factors.info["kind"] == kind
    for key, r in ref["refs"].items():
        f, layer = factors[key], ref["layers"][key]
        assert f.weight_shape == tuple(layer.weight.shape)
        # G is a bias's factor only where every layer sharing the weight uses that bias (layers
        # sharing a weight with biases of their own: G sums them all, so no bias block)
        mine = dict(case.model.named_modules())[key]
        sharing = [  # the Linear/Conv uses (a tied embedding has no bias)
            m
            for m in case.model.modules()
            if getattr(m, "weight", None) is mine.weight and hasattr(m, "bias")
        ]
        own_bias = all(m.bias is mine.bias for m in sharing)
        assert f.has_bias == (layer.bias is not None and layer.bias.requires_grad and own_bias)
        W = layer.weight.T if _is_hf_conv1d(layer) else layer.weight  # the (out, in') view
        assert f.weight_layout == ("in_out" if _is_hf_conv1d(layer) else "out_in")
        assert f.A.shape == (W[0].numel(),) * 2
        assert f.G.shape == (W.shape[0],) * 2
        assert f.bias_block() is (f.G if f.has_bias else None)
        _assert_close(f.A, r[f"A_{approx}"], f"{name} {key} A ({approx})")
        _assert_close(f.G, r[f"G_{kind}_{approx}"], f"{name} {key} G ({kind}, {approx})")


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_kfac_references_tell_the_variants_apart(entry: str) -> None:
    """The references are not degenerate: expand and reduce coincide exactly where the docs say
    (a Linear layer on vectors used once) and their A and empirical G differ elsewhere; exact and
    empirical G differ. (The exact G of expand and reduce coincide for position-wise layers under
    a per-position loss: the cross-position terms J_t^T Lambda J_s vanish there.)"""
    ref = kfac_refs(entry, "mean")
    for key, r in ref["refs"].items():
        once = ref["terms"][key] == 1
        for kind in ("A", "G_exact", "G_empirical"):
            a, b = r[f"{kind}_expand"], r[f"{kind}_reduce"]
            close = torch.allclose(a, b, rtol=1e-9, atol=1e-12 * B.scale_of(a))
            if once or kind != "G_exact":
                assert close == once, (key, kind, close)
        assert not torch.allclose(r["G_exact_expand"], r["G_empirical_expand"], rtol=1e-3)


def _one_example(entry: str) -> Any:
    case = make_case(f"{entry}-mean-one")
    X, y = case.batches[0]
    case.batches = [(X[:1], y[:1])]
    return case


@pytest.mark.parametrize(
    ("entry", "layers"),
    [
        ("ln_mlp", ["0", "3"]),
        ("temperature", ["lin"]),
        ("multilabel_bce", ["0", "2"]),
        ("embedding_clf", ["head"]),
        ("resblock", ["fc"]),
        ("shared_linear", ["head"]),
    ],
)
def test_kfac_exact_is_the_ggn_block_for_one_example_on_vectors(entry: str, layers: list) -> None:
    """One example, a Linear layer on a vector used once: kron(G, A) is exactly the weight's GGN
    block (row-major) and G the bias's, in the dense GGN of tests/bruteforce.py."""
    case = _one_example(entry)
    ggn = B.Dense(case).ggn
    offsets, i = {}, 0
    for n, shape in B.param_shapes(case.model).items():
        offsets[n] = slice(i, i + shape.numel())
        i += shape.numel()
    factors = cl.kfac(case.model, case.loss_fn, case.data, kind="exact")
    for layer in layers:
        f = factors[layer]
        w = offsets[f"{layer}.weight"]
        B.assert_close(f.weight_block(), ggn[w, w], what=f"{layer}.weight")
        if f.has_bias:
            b = offsets[f"{layer}.bias"]
            B.assert_close(f.bias_block(), ggn[b, b], what=f"{layer}.bias")
        else:
            assert f"{layer}.bias" not in offsets


@pytest.mark.parametrize(
    "name", ["seq_ce_gpt-mean-one", "pixel_ce-sum-one", "twice_linear-mean-one"]
)
def test_kfac_chunks_do_not_change_the_factors(name: str) -> None:
    """A chunk boundary inside a batch (chunk_size=3 of 8) gives the same factors."""
    case = make_case(name)
    ref = kfac_refs(case.entry, case.reduction)["refs"]
    for approx in ("expand", "reduce"):
        f = cl.kfac(case.model, case.loss_fn, case.data, kind="exact", approx=approx, chunk_size=3)
        assert set(f) == set(ref)
        for key, r in ref.items():
            _assert_close(f[key].A, r[f"A_{approx}"], f"{key} A")
            _assert_close(f[key].G, r[f"G_exact_{approx}"], f"{key} G")


def test_kfac_shared_and_tied_weights_form_one_block() -> None:
    """The references' grouping is the documented one (checked on the model structure itself)."""
    gpt = kfac_refs("tiny_gpt", "mean")
    assert set(gpt["refs"]) == {
        "blocks.0.qkv",
        "blocks.0.proj",
        "blocks.0.fc",
        "blocks.0.out",
        "head",
    }
    shared = kfac_refs("shared_linear", "sum")
    assert set(shared["refs"]) == {"a", "head"} and shared["group"]["b"] == "a"
    twice = kfac_refs("twice_linear", "sum")
    assert twice["calls"] == ["lin", "lin"] and set(twice["refs"]) == {"lin"}
    hf = kfac_refs("hf_gpt2", "mean")
    conv1d = {
        f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(hf["refs"]) == {"lm_head"} | conv1d  # GPT-2's transformers Conv1D layers and head
    # for a weight used twice the two uses' terms differ: the block is not one use's factors
    case = make_case("twice_linear-sum-one")
    f = cl.kfac(case.model, case.loss_fn, case.data, kind="exact")
    X = case.batches[0][0]
    A_first = X.T @ X / X.shape[0]
    assert not torch.allclose(f["lin"].A, A_first, rtol=1e-3)
    h = torch.tanh(case.model.lin(X)).detach()
    torch.testing.assert_close(f["lin"].A, (X.T @ X + h.T @ h) / (2 * X.shape[0]))


MC_CASES = [
    ("seq_ce_gpt-mean-three", "expand"),
    ("pixel_bce-sum-one", "reduce"),
    ("tiny_gpt-mean-three", "expand"),
]


@pytest.mark.parametrize(("name", "approx"), MC_CASES)
def test_kfac_mc_is_unbiased_for_exact(name: str, approx: str) -> None:
    case = make_case(name)
    ref = kfac_refs(case.entry, case.reduction)["refs"]
    reps = [
        cl.kfac(case.model, case.loss_fn, case.data, kind="mc", mc_samples=8, seed=s, approx=approx)
        for s in range(40)
    ]
    for key, r in ref.items():
        exact = r[f"G_exact_{approx}"]
        G = torch.stack([rep[key].G for rep in reps])
        mean, se = G.mean(0), G.std(0) / len(reps) ** 0.5
        # power: the standard error is small next to the factor itself
        assert float(se.max()) <= 0.1 * float(exact.abs().max()), (key, float(se.max()))
        z = (mean - exact).abs() / (se + 1e-12 * float(exact.abs().max()))
        assert (z < 5).all(), f"{key}: max z {z.max():.2f}"
        _assert_close(reps[0][key].A, r[f"A_{approx}"], f"{key} A (mc)")
    again = cl.kfac(
        case.model, case.loss_fn, case.data, kind="mc", mc_samples=8, seed=0, approx=approx
    )
    for key in ref:
        assert torch.equal(again[key].G, reps[0][key].G)


# --------------------------------------------------------------------------- spectral density


@functools.cache
def dense_matrix(entry: str, reduction: str, matrix: str) -> Tensor:
    return B.Dense(make_case(f"{entry}-{reduction}-one")).matrix(matrix)


def _probes(D: int, seed: int, num_probes: int) -> Tensor:
    """The unit probes ``(num_probes, D)`` as the estimator draws them (Rademacher from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [probe_rows(D, 1, gen, dtype=torch.float64)[0] for _ in range(num_probes)]
    return torch.stack(rows) / math.sqrt(D)


DENSITY_CASES = [
    ("tiny_gpt-mean-three", "hessian"),
    ("resblock-sum-one", "hessian"),
    ("pixel_bce-mean-one", "ggn"),
    ("hf_gpt2-mean-one", "hessian"),
]


@pytest.mark.parametrize(("name", "matrix"), DENSITY_CASES)
def test_spectral_density_moments_equal_dense(name: str, matrix: str) -> None:
    """Per probe, sum_i tau_i theta_i^j = v^T A^j v (j = 0..3): Lanczos' Gauss quadrature."""
    case = make_case(name)
    A = dense_matrix(case.entry, case.reduction, matrix)
    D = A.shape[0]
    num_probes, seed = 3, 5
    res = cl.spectral_density(
        case.model,
        case.loss_fn,
        case.data,
        matrix=matrix,
        num_steps=12,
        num_probes=num_probes,
        seed=seed,
    )
    assert res.nodes.shape == res.weights.shape == (num_probes, 12)
    assert (res.weights >= 0).all()
    torch.testing.assert_close(res.weights.sum(1), torch.ones(num_probes, dtype=torch.float64))
    V = _probes(D, seed, num_probes)
    norm = float(torch.linalg.matrix_norm(A, ord=2))
    for j in (1, 2, 3):
        quad = (res.weights * res.nodes**j).sum(1)
        exact = torch.einsum("li,ij,lj->l", V, torch.linalg.matrix_power(A, j), V)
        torch.testing.assert_close(quad, exact, rtol=1e-6, atol=1e-9 * norm**j)
    first = torch.einsum("li,ij,lj->l", V, A, V).mean()
    assert res.moment(1) == pytest.approx(float(first), rel=1e-6, abs=1e-9 * norm)
    # the density is a probability density on its grid, whose ends bracket every node
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-9)
    assert (res.density >= 0).all()
    assert float(res.grid[0]) < float(res.nodes.min()) and float(res.grid[-1]) > float(
        res.nodes.max()
    )


FULL_CASES = [
    ("pixel_bce-mean-one", "ggn"),
    ("resblock-sum-one", "hessian"),
    pytest.param("tiny_gpt-mean-three", "hessian", marks=slow),
    pytest.param("hf_gpt2-mean-one", "hessian", marks=slow),
]


def _spectral_measure(A: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues of ``A`` and the probe's weights ``(u_k^T v)^2`` on them (sum 1 for unit v)."""
    lam, U = torch.linalg.eigh(A)
    return lam, (U.T @ v) ** 2


def _bumps(t: Tensor, lam: Tensor) -> Tensor:
    """15 Gaussian bumps of width 5% of the spectrum's spread, centred across it, at ``t``."""
    width = 0.05 * float(lam.max() - lam.min())
    centres = torch.linspace(float(lam.min()), float(lam.max()), 15, dtype=torch.float64)
    return torch.exp(-0.5 * ((t[None, :] - centres[:, None]) / width) ** 2)


@pytest.mark.parametrize(("name", "matrix"), FULL_CASES)
def test_spectral_density_with_full_steps_is_the_probe_spectral_measure(
    name: str, matrix: str
) -> None:
    """With num_steps >= D (capped at D) the Gauss quadrature integrates v's spectral measure
    sum_k (u_k^T v)^2 delta(lambda_k): its moments up to degree 7, smooth functions of it and the
    returned broadened density equal the dense ones. (Without reorthogonalisation, which
    spectral_density does not do, the nodes are not all eigenvalues in floating point: some
    unconverged Ritz values between eigenvalues carry weight; see the reorthogonalised test below.)
    """
    case = make_case(name)
    A = dense_matrix(case.entry, case.reduction, matrix)
    D = A.shape[0]
    seed = 3
    res = cl.spectral_density(
        case.model, case.loss_fn, case.data, matrix=matrix, num_steps=D + 10, seed=seed
    )
    assert res.nodes.shape == (1, D)  # the steps are capped at D
    assert res.num_matvecs <= D
    v = _probes(D, seed, 1)[0]
    lam, mu = _spectral_measure(A, v)
    nodes, weights = res.nodes[0], res.weights[0]
    norm = float(lam.abs().max())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (weights >= 0).all()
    live = nodes[weights > 0]  # Ritz values lie in the numerical range [lambda_min, lambda_max]
    assert float(live.min()) >= float(lam.min()) - 1e-9 * norm
    assert float(live.max()) <= float(lam.max()) + 1e-9 * norm
    for j in range(1, 8):
        quad = float((weights * nodes**j).sum())
        assert quad == pytest.approx(float(lam**j @ mu), rel=1e-6, abs=1e-9 * norm**j), j
    torch.testing.assert_close(
        _bumps(nodes, lam) @ weights, _bumps(lam, lam) @ mu, rtol=1e-6, atol=1e-9
    )
    # the returned density: the same broadening of the exact measure on the same grid
    z = (res.grid[:, None] - lam[None, :]) / res.sigma
    expected = (torch.exp(-0.5 * z**2) / (res.sigma * math.sqrt(2 * math.pi))) @ mu
    expected = expected / torch.trapezoid(expected, res.grid)
    torch.testing.assert_close(res.density, expected, rtol=1e-6, atol=1e-9 * float(expected.max()))


@pytest.mark.parametrize(("name", "matrix"), FULL_CASES)
def test_reorthogonalised_slq_with_full_steps_has_the_eigenvalues_as_nodes(
    name: str, matrix: str
) -> None:
    """slq on cl.curvature_operator with full reorthogonalisation and D steps: the nodes carrying
    weight are eigenvalues of the dense matrix and the weight on each (cluster of equal)
    eigenvalue(s) is the probe's, sum_k (u_k^T v)^2 over the cluster."""
    from curvlab.estimators import slq

    case = make_case(name)
    A = dense_matrix(case.entry, case.reduction, matrix)
    D = A.shape[0]
    op = cl.curvature_operator(case.model, case.loss_fn, case.data, matrix=matrix)
    res = slq(op, num_steps=D, seed=4, reorth_passes=2)
    v = _probes(D, 4, 1)[0]
    lam, mu = _spectral_measure(A, v)
    norm = float(lam.abs().max())
    # clusters of numerically equal eigenvalues (ascending order: a new cluster at each gap)
    cluster = torch.cat([torch.zeros(1, dtype=torch.long), (lam.diff() > 1e-9 * norm).cumsum(0)])
    nodes, weights = res.nodes[0], res.weights[0]
    live = weights > 1e-14
    nearest = (nodes[live, None] - lam[None, :]).abs().min(1)
    assert float(nearest.values.max()) <= 1e-9 * norm, float(nearest.values.max())
    n_clusters = int(cluster.max()) + 1
    got = torch.zeros(n_clusters, dtype=torch.float64).index_add_(
        0, cluster[nearest.indices], weights[live]
    )
    want = torch.zeros(n_clusters, dtype=torch.float64).index_add_(0, cluster, mu)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "matrix"),
    [
        ("pixel_bce-mean-one", "ggn"),
        ("resblock-sum-one", "hessian"),
        ("tiny_gpt-mean-three", "hessian"),
        pytest.param("hf_gpt2-mean-one", "ggn", marks=slow),  # its Hessian's trace is ~0
    ],
)
def test_spectral_density_first_moment_estimates_normalised_trace(name: str, matrix: str) -> None:
    """Over probes the first moment averages to tr(A)/D (Hutchinson with unit Rademacher probes)."""
    case = make_case(name)
    A = dense_matrix(case.entry, case.reduction, matrix)
    D = A.shape[0]
    num_probes = 100
    res = cl.spectral_density(
        case.model,
        case.loss_fn,
        case.data,
        matrix=matrix,
        num_steps=2,
        num_probes=num_probes,
        seed=11,
    )
    m1 = (res.weights * res.nodes).sum(1)
    mean, se = float(m1.mean()), float(m1.std() / math.sqrt(num_probes))
    target = float(torch.trace(A)) / D
    # the spread is Rademacher-Hutchinson's: Var(v^T A v) = 2 sum_{i != j} A_ij^2 / D^2
    off = A - torch.diag(torch.diagonal(A))
    se_exact = math.sqrt(2 * float(off.square().sum())) / D / math.sqrt(num_probes)
    assert 0.5 * se_exact <= se <= 2 * se_exact, (se, se_exact)
    # power: a result off by the whole of tr(A)/D (0, or twice the trace) is > 5 standard errors
    assert 5 * se_exact < abs(target), (se_exact, target)
    assert abs(mean - target) <= 5 * se_exact, (mean, target, se_exact)
