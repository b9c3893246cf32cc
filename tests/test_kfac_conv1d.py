"""K-FAC of HuggingFace ``Conv1D`` (GPT-2), the factor memory budget, and KFACNoise on GPT-2.

``transformers.pytorch_utils.Conv1D`` computes ``y = x @ W + b`` with ``W`` stored ``(in, out)``: it
is the ``nn.Linear`` of weight ``W.T``. So its K-FAC factors must be exactly that Linear layer's
(``A`` in x in, ``G`` out x out), checked here on a tiny float64 GPT-2 (dict inputs with an attention
mask, padded labels -100, GPT-layout logits) against its *Linear twin*: the same model with every
``Conv1D`` replaced by ``nn.Linear`` holding ``W.T`` and the same bias, for kinds "mc" (same seed),
"exact" and "empirical". The layout claim (block of the stored ``W.reshape(-1)`` = ``kron(A, G)``) is
checked against dense brute force where K-FAC is exact: one example at one position, where the
weight's GGN block is ``J_W^T H J_W`` and its empirical Fisher block ``g_W g_W^T`` (tests/bruteforce.py
Jacobians and output Hessian). tests/test_kfac_any_model.py checks the same layers' ``A`` and ``G``
against Jacobian references on the zoo's GPT-2 with several examples and positions.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab._rng import make_generator
from curvlab.noise import KFACNoise
from curvlab.noise._kfac import _DIAG
from curvlab.quantities._kfac import DEFAULT_MEMORY_BUDGET
from tests import bruteforce as B
from tests.test_noise_samplers import _one_thread, moments_ok  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2(vocab_size: int = 50, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=vocab_size,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).double().eval()


def _batch(vocab_size: int = 50, B_: int = 3, T: int = 6, seed: int = 1) -> tuple[dict, Tensor]:
    """Dict inputs with an attention mask (right padding) and next-token labels, -100 past the end."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (B_, T + 1), generator=gen)
    lengths = torch.tensor([T + 1, 4, 6][:B_])
    mask = (torch.arange(T + 1)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids[:, 1:].clone()
    labels[mask[:, 1:] == 0] = -100
    inputs = {"input_ids": ids[:, :T].contiguous(), "attention_mask": mask[:, :T].contiguous()}
    return inputs, labels


def _linear_twin(model: nn.Module) -> nn.Module:
    """A copy with every Conv1D replaced by the ``nn.Linear`` holding ``W.T`` and the same bias."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Conv1D):
            d_in, d_out = m.weight.shape
            lin = nn.Linear(d_in, d_out, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent), attr, lin)
    return twin


def _conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    atol = 1e-12 * max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")


def _to_param_layout(d_in: int, d_out: int) -> Tensor:
    """``perm`` with ``W.reshape(-1) == W.T.reshape(-1)[perm]`` for ``W`` of shape ``(in, out)``."""
    return torch.arange(d_out * d_in).reshape(d_out, d_in).T.reshape(-1)


# ------------------------------------------------------------------- factors = the Linear twin's


@pytest.mark.parametrize("kind", ["mc", "exact", "empirical"])
def test_conv1d_factors_equal_the_linear_twin(kind: str) -> None:
    model = _gpt2()
    twin = _linear_twin(model)
    X, y = _batch()
    with torch.no_grad():  # the twin is the same function
        torch.testing.assert_close(twin(**X).logits, model(**X).logits, rtol=1e-12, atol=1e-12)
    loss_fn = nn.CrossEntropyLoss()
    f = cl.kfac(model, loss_fn, (X, y), kind=kind, seed=0)
    t = cl.kfac(twin, loss_fn, (X, y), kind=kind, seed=0)
    names = _conv1d_names(model)
    assert len(names) == 8 and set(f) == set(t) == {*names, "lm_head"}
    for name in f:
        _close(f[name].A, t[name].A, f"{name} A ({kind})")
        _close(f[name].G, t[name].G, f"{name} G ({kind})")
    for name in names:
        conv, lin = f[name], t[name]
        d_in, d_out = dict(model.named_modules())[name].weight.shape
        assert conv.module_type == "Conv1D" and conv.weight_layout == "in_out"
        assert lin.weight_layout == "out_in"
        assert conv.weight_shape == (d_in, d_out) and conv.A.shape == (d_in, d_in)
        assert conv.G.shape == (d_out, d_out) and conv.has_bias
        # contract view (out, in): kron(G, A), the twin's; own layout (in, out): kron(A, G)
        _close(conv.weight_block("out_in"), lin.weight_block(), f"{name} out_in block")
        perm = _to_param_layout(d_in, d_out)
        own = conv.weight_block()
        _close(own, torch.kron(conv.A, conv.G), f"{name} param block")
        _close(own, lin.weight_block()[perm][:, perm], f"{name} permuted twin block")
        _close(conv.bias_block(), lin.bias_block(), f"{name} bias block")
    with pytest.raises(ValueError, match="layout"):
        f[names[0]].weight_block("in_out")


def test_conv1d_approx_reduce_and_chunks_equal_the_twin() -> None:
    model = _gpt2()
    twin = _linear_twin(model)
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    f = cl.kfac(model, loss_fn, (X, y), kind="exact", approx="reduce", chunk_size=2)
    t = cl.kfac(twin, loss_fn, (X, y), kind="exact", approx="reduce")
    for name in t:
        _close(f[name].A, t[name].A, f"{name} A")
        _close(f[name].G, t[name].G, f"{name} G")


# --------------------------------------------------------------- brute force where K-FAC is exact


def _one_token_problem(model: nn.Module) -> Any:
    """One example at one position: K-FAC's kron is the exact block there."""
    X = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    y = torch.tensor([[23]])
    return SimpleNamespace(model=model, loss_fn=nn.CrossEntropyLoss(), batches=[(X, y)])


def test_conv1d_blocks_equal_dense_blocks_for_one_token() -> None:
    """For one example at one position, ``weight_block()`` (the stored ``(in, out)`` flattening,
    ``kron(A, G)``) is exactly the weight's GGN block (kind="exact") and its empirical Fisher block
    (kind="empirical"), and ``G`` the bias's; the ``(out, in)``-ordered ``kron(G, A)`` is not."""
    model = _gpt2()
    prob = _one_token_problem(model)
    d = B.Dense(prob)
    J = d.jacobian.reshape(-1, d.D)  # (V, D): one example, one position
    H = d.output_hessian  # (V, V)
    S = d.contributions  # (1, D): the example's gradient; "mean" over one token
    offsets, i = {}, 0
    for n, shape in B.param_shapes(model).items():
        offsets[n] = slice(i, i + shape.numel())
        i += shape.numel()
    data = prob.batches[0]
    exact = cl.kfac(model, prob.loss_fn, data, kind="exact")
    emp = cl.kfac(model, prob.loss_fn, data, kind="empirical")
    for name in _conv1d_names(model):
        w, b = offsets[f"{name}.weight"], offsets[f"{name}.bias"]
        ggn_w, ggn_b = J[:, w].T @ H @ J[:, w], J[:, b].T @ H @ J[:, b]
        emp_w, emp_b = S[:, w].T @ S[:, w], S[:, b].T @ S[:, b]
        B.assert_close(exact[name].weight_block(), ggn_w, what=f"{name} GGN block")
        B.assert_close(exact[name].bias_block(), ggn_b, what=f"{name} GGN bias block")
        B.assert_close(emp[name].weight_block(), emp_w, what=f"{name} empirical block")
        B.assert_close(emp[name].bias_block(), emp_b, what=f"{name} empirical bias block")
        wrong = exact[name].weight_block("out_in")  # the W.T ordering, for the stored W
        assert not torch.allclose(wrong, ggn_w, rtol=1e-3, atol=1e-6 * float(ggn_w.abs().max()))


# ---------------------------------------------------------------------------------- memory budget


def _factor_bytes(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    total = 0
    for name, m in model.named_modules():
        if name in skip:
            continue
        if isinstance(m, Conv1D):
            d_in, d_out = m.weight.shape
        elif isinstance(m, nn.Linear):
            d_out, d_in = m.weight.shape
        else:
            continue
        total += (d_in**2 + d_out**2) * m.weight.element_size()
    return total


class _ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1


def test_budget_error_names_the_head_before_any_forward_and_params_excludes_it() -> None:
    """A tied head over 30000 tokens needs a 7.2 GB G in float64: over the default budget."""
    V = 30000
    model = _gpt2(vocab_size=V)
    X, y = _batch(vocab_size=V)
    loss_fn = nn.CrossEntropyLoss()
    counter = _ForwardCounter(model)
    try:
        total = _factor_bytes(model)
        assert total > DEFAULT_MEMORY_BUDGET
        with pytest.raises(ValueError) as err:
            cl.kfac(model, loss_fn, (X, y), kind="empirical")
        msg = str(err.value)
        assert counter.calls == 0, "the budget must be checked before any forward pass"
        assert "'lm_head'" in msg and f"G {V}x{V} = 7.20 GB" in msg
        assert "over the budget on its own" in msg and "memory_budget=" in msg
        assert f"{total / 1e9:.2f} GB" in msg and f"{DEFAULT_MEMORY_BUDGET / 1e9:.2f} GB" in msg
        # the suggested selection names the tied weight as named_parameters() does
        assert "params=lambda name, p: name not in {'transformer.wte.weight'}" in msg
        assert "diag_fisher" in msg
        f = cl.kfac(
            model,
            loss_fn,
            (X, y),
            kind="empirical",
            params=lambda n, p: n != "transformer.wte.weight",
        )
        # the pass, the examples-apart check's two passes on pairs of examples (the first of
        # them the layout check; _layout.py) and the watched one-example pass with gradient
        # (review s26: a forward that differentiates only with gradient)
        assert counter.calls == 4
        assert set(f) == set(_conv1d_names(model))
        assert f.info["factor_bytes"] == _factor_bytes(model, skip=("lm_head",))
        # the same factors as a selection of the blocks alone
        g = cl.kfac(model, loss_fn, (X, y), kind="empirical", params="transformer.h")
        for name in f:
            assert torch.equal(f[name].A, g[name].A) and torch.equal(f[name].G, g[name].G)
    finally:
        counter.handle.remove()


def test_budget_boundary_and_validation() -> None:
    model = _gpt2()
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    total = _factor_bytes(model)
    f = cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=total)
    assert f.info["factor_bytes"] == total
    assert "lm_head: KFACFactors" in repr(f)
    assert cl.kfac(model, loss_fn, (X, y), memory_budget=None, seed=0).info["factor_bytes"] == total
    with pytest.raises(ValueError, match=r"'transformer\.h\.\d\.mlp\.c_(fc|proj)' \(Conv1D"):
        cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=total - 1)
    # every layer alone over the budget: no params= selection would fit (found in review)
    with pytest.raises(
        ValueError, match=r"no selected layer's K-FAC factors fit memory_budget=1000"
    ):
        cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=1000)
    for bad in (0, -1.0, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget must be"):
            cl.kfac(model, loss_fn, (X, y), memory_budget=bad)


@pytest.mark.slow
def test_budget_check_on_gpt2_small_takes_seconds() -> None:
    """GPT-2 small (124M parameters, float32): the 10 GB head is refused from the shapes alone."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    counter = _ForwardCounter(model)
    ids = torch.randint(0, 50257, (2, 8))
    try:
        with pytest.raises(ValueError, match=r"'lm_head'.*G 50257x50257 = 10\.10 GB"):
            cl.kfac(model, nn.CrossEntropyLoss(), ({"input_ids": ids}, ids), kind="empirical")
        assert counter.calls == 0  # refused from the shapes: no forward pass ran
    finally:
        counter.handle.remove()


# ----------------------------------------------------------------------------------- KFACNoise


def test_kfac_noise_on_gpt2_conv1d_is_the_linear_twins_noise_transposed() -> None:
    """Same factors, same generator: the Conv1D weight's noise is the twin Linear's, transposed
    (``(in, out)`` layout), its bias noise the same; the tied head is left to the diagonal."""
    model = _gpt2()
    twin = _linear_twin(model)
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    sampler = KFACNoise("empirical", scale=0.5)
    state = sampler.estimate(model, loss_fn, X, y, make_generator(seed=0))
    twin_state = sampler.estimate(twin, loss_fn, X, y, make_generator(seed=0))
    names = _conv1d_names(model)
    assert set(state) == set(twin_state) == {*names, _DIAG}
    assert "transformer.wte.weight" in state[_DIAG]  # the tied head's weight
    f = cl.kfac(model, loss_fn, (X, y), kind="empirical")
    for name in names:
        s = state[name]
        _close(s["B"] @ s["B"].T, f[name].G, f"{name} B B^T")
        _close(s["C"].T @ s["C"], f[name].A, f"{name} C^T C")
    eps = sampler.draw(model, state, make_generator(seed=3))
    eps_twin = sampler.draw(twin, twin_state, make_generator(seed=3))
    params = dict(model.named_parameters())
    assert set(eps) == set(params)
    for n, p in params.items():
        assert eps[n].shape == p.shape, n
        if n.endswith(".weight") and n[: -len(".weight")] in names:
            _close(eps[n], eps_twin[n].T, f"{n} noise")
        else:
            _close(eps[n], eps_twin[n], f"{n} noise")


def test_kfac_noise_conv1d_covariance_is_kron_a_g_in_its_layout() -> None:
    """Over many draws the stored ``(in, out)`` weight's noise has covariance
    ``scale^2 kron(A, G)`` (its own row-major flattening) and is told apart from ``kron(G, A)``
    (watched: the first three rows of ``W``, i.e. 3 inputs x all outputs)."""
    model = _gpt2()
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    scale, name = 0.5, "transformer.h.1.attn.c_proj"
    sampler = KFACNoise("empirical", scale=scale)
    state = sampler.estimate(model, loss_fn, X, y, make_generator(seed=0))
    one = {name: state[name]}  # draw this layer only (the others' noise is then zero)
    gen = make_generator(seed=5)
    d_out = dict(model.named_modules())[name].weight.shape[1]
    idx = torch.arange(3 * d_out)
    samples = torch.stack(
        [sampler.draw(model, one, gen)[f"{name}.weight"].reshape(-1)[idx] for _ in range(4000)]
    )
    f = cl.kfac(model, loss_fn, (X, y), kind="empirical")[name]
    full = scale**2 * f.weight_block()
    _close(full, scale**2 * torch.kron(f.A, f.G), "kron(A, G)")
    cov = full[idx][:, idx]
    ok, msg = moments_ok(samples, cov)
    assert ok, msg
    wrong = (scale**2 * f.weight_block("out_in"))[idx][:, idx]
    assert not moments_ok(samples, wrong)[0], "layout not told apart"
    assert not moments_ok(samples, 1.3 * cov)[0], "no power against a 30% scale error"


def test_kfac_noise_memory_budget_is_passed_on_and_skips_the_tied_head() -> None:
    """The tied head gets no factors in KFACNoise, so it does not count against the budget."""
    V = 30000
    model = _gpt2(vocab_size=V)
    X, y = _batch(vocab_size=V)
    loss_fn = nn.CrossEntropyLoss()
    state = KFACNoise("empirical", scale=0.1).estimate(model, loss_fn, X, y, make_generator(0))
    assert "lm_head" not in state and set(state) == {*_conv1d_names(model), _DIAG}
    blocks = _factor_bytes(model, skip=("lm_head",))
    with pytest.raises(ValueError, match="memory_budget"):
        KFACNoise("empirical", scale=0.1, memory_budget=blocks - 1).estimate(
            model, loss_fn, X, y, make_generator(0)
        )
