"""The ways in on transformers, HuggingFace GPT-2 and residual nets: analyze, Diagnostics, noise,
NoisyOptimizer and the regularisers run, leave no trace, and agree with the engine's quantities."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.noise._kfac import _DIAG
from tests import reference as R
from tests.zoo import make_case

MODELS = ["tiny_gpt", "hf_gpt2", "resblock"]


def _case(entry: str, reduction: str = "mean"):  # noqa: ANN202
    c = make_case(f"{entry}-{reduction}-one")
    inputs, targets = c.batches[0]
    return c.model, c.loss_fn, inputs, targets


def _user_loss(model: nn.Module, loss_fn: nn.Module, inputs, targets) -> torch.Tensor:  # noqa: ANN001
    """What a training loop computes: GPT logits flattened for the loss."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.ndim == 3 and targets.ndim == 2:
        return loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss_fn(logits, targets)


@pytest.mark.parametrize("entry", MODELS)
def test_analyze_and_diagnostics_run_and_agree(entry: str, tmp_path) -> None:  # noqa: ANN001
    model, loss_fn, X, y = _case(entry)
    before = R.snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no quantity may fail
        report = cl.analyze(
            model,
            loss_fn,
            (X, y),
            quantities=["loss", "trace_empirical_fisher", "trace_hessian", "top_eigenvalues"],
            num_probes=2,
            k=2,
            nqm=False,
        )
    R.assert_untouched(model, before)
    values = report.to_dict()["entries"][0]["values"]
    F = cl.diag_fisher(model, loss_fn, (X, y))
    assert values["trace_empirical_fisher"] == pytest.approx(
        float(sum(v.sum() for v in F.values())), rel=1e-9
    )
    with torch.no_grad():
        assert values["loss"] == pytest.approx(float(_user_loss(model, loss_fn, X, y)), rel=1e-9)
    diag = cl.Diagnostics(
        model, loss_fn, quantities=["loss", "noise_scale"], every=1, log_dir=tmp_path
    )
    record = diag.step(0, X, y)
    diag.close()
    stats = cl.gradient_stats(model, loss_fn, (X, y))
    assert record["values"]["noise_scale"] == pytest.approx(stats.noise_scale, rel=1e-9)
    assert (tmp_path / "metrics.jsonl").exists()


SAMPLERS = {
    "diag": lambda: cl.noise.DiagFisherNoise(scale=0.3),
    "trace": lambda: cl.noise.FisherTraceNoise(scale=0.3),
    "kfac": lambda: cl.noise.KFACNoise(scale=0.3),
    "full": lambda: cl.noise.FullFisherNoise(scale=0.3),
    "full-emp": lambda: cl.noise.FullFisherNoise("empirical", scale=0.3),
    "iso": lambda: cl.noise.IsotropicNoise(0.1),
    "mult": lambda: cl.noise.MultiplicativeNoise(0.1),
}


@pytest.mark.parametrize("entry", MODELS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_samplers_run_and_leave_no_trace(entry: str, sampler: str) -> None:
    model, loss_fn, X, y = _case(entry)
    before = R.snapshot(model)
    noise = SAMPLERS[sampler]().sample(model, loss_fn, X, y, seed=3)
    R.assert_untouched(model, before)
    params = dict(model.named_parameters())
    assert set(noise) == set(params)
    assert all(
        noise[n].shape == p.shape and torch.isfinite(noise[n]).all() for n, p in params.items()
    )


def test_kfac_noise_on_a_transformer_is_kfac_plus_the_diagonal() -> None:
    """Single-use Linear layers get their K-FAC blocks; the rest (tied head, norms) the diagonal."""
    model, loss_fn, X, y = _case("tiny_gpt")
    sampler = cl.noise.KFACNoise("mc", scale=1.0)
    state = sampler.estimate(model, loss_fn, X, y, torch.Generator().manual_seed(0))
    factors = cl.kfac(model, loss_fn, (X, y), kind="mc", seed=0)
    layers = [k for k in state if k != _DIAG]
    assert layers and "head" not in layers  # the head's weight is tied to the embedding
    for name in layers:
        B, C = state[name]["B"], state[name]["C"]
        torch.testing.assert_close(B @ B.T, factors[name].G, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(C.T @ C, factors[name].A, rtol=1e-6, atol=1e-9)
    diag = cl.diag_fisher(model, loss_fn, (X, y), kind="mc", seed=0)
    rest = state[_DIAG]
    assert "tok.weight" in rest and any(k.startswith("ln") or ".ln" in k for k in rest)
    # the diagonal part uses fresh label draws: check its structure, not its values
    for k, v in rest.items():
        assert v.shape == diag[k].shape and (v >= 0).all()


@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_noisy_optimizer_second_pass_uses_the_flattened_step_targets(entry: str) -> None:
    """A GPT loop flattens (B, T) tokens for the loss; the curvature pass reshapes them back."""
    model, loss_fn, X, y = _case(entry)
    sampler = cl.noise.DiagFisherNoise(scale=0.5)
    opt = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, loss_fn, seed=7
    )
    with opt.capture():
        model.zero_grad(set_to_none=True)
        _user_loss(model, loss_fn, X, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    gen = torch.Generator().manual_seed(7)
    expected = sampler.draw(model, sampler.estimate(model, loss_fn, X, y, gen), gen)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad - grads[n], expected[n], rtol=1e-9, atol=1e-12)


def test_full_fisher_empirical_capture_equals_its_separate_pass_on_a_gpt() -> None:
    """Folded into the user's flattened-token backward pass: one sign per sequence, same noise."""
    model, loss_fn, X, y = _case("tiny_gpt")
    sampler = cl.noise.FullFisherNoise("empirical", scale=0.5)
    opt = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, loss_fn, seed=11
    )
    model.zero_grad(set_to_none=True)
    _user_loss(model, loss_fn, X, y).backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    with opt.capture():
        model.zero_grad(set_to_none=True)
        _user_loss(model, loss_fn, X, y).backward()
    noisy = {n: p.grad.clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(11)
    expected = sampler.estimate(model, loss_fn, X, y, gen)
    for n in clean:
        torch.testing.assert_close(noisy[n] - clean[n], expected[n], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("entry", MODELS)
def test_regularisers_match_their_definition(entry: str) -> None:
    """GP = alpha ||grad L||^2 at the data labels, with L what the training loop computes."""
    model, loss_fn, X, y = _case(entry)
    term = cl.regularizers.gradient_penalty(model, loss_fn, X, y, alpha=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(_user_loss(model, loss_fn, X, y), params)
    expected = 0.5 * sum(t.pow(2).sum() for t in g)
    torch.testing.assert_close(term.detach(), expected.detach(), rtol=1e-9, atol=1e-12)
    fp = cl.regularizers.fisher_penalty(model, loss_fn, X, targets=y, seed=0)
    assert fp.requires_grad and torch.isfinite(fp)
