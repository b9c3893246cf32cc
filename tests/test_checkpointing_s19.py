"""Review s19: reentrant activation checkpointing whose block holds the trainable parameters.

``torch.utils.checkpoint(..., use_reentrant=True)`` runs the block under ``no_grad``; only its
own backward node, which ``loss.backward()`` runs, recomputes it with autograd. Every pass of
curvlab differentiates with ``torch.autograd.grad``, which prunes that node when it reaches none
of the parameters asked for (the block's are not in the graph at all): no gradient, which was
read as 0 (an exact Hessian trace 0.0 for 0.3661, the gradient mean of a GPT-2 whose MLPs alone
are trainable of norm 0 for 0.6301, zero noise from ``NoisyOptimizer.step(inputs=, targets=)``).
Now every pass refuses it after the forward pass, before any backward one, naming the
parameters and ``use_reentrant=False``. The numbers the refused calls would have had are
checked here against dense float64 brute force with ``torch.func``, for the non-reentrant form
(computed exactly) and for a reentrant block that holds no trainable parameter (not refused).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.checkpoint import checkpoint

import curvlab as cl
from curvlab.noise import DiagFisherNoise, NoisyOptimizer

try:  # a test dependency; imported here, at collection, not inside a test's time
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

DT = torch.float64


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        self.head = nn.Linear(5, 2)
        self.reentrant = reentrant  # None: no checkpointing (the brute force's function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _model(reentrant: bool | None) -> _Checkpointed:
    torch.manual_seed(0)
    return _Checkpointed(reentrant).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)


def _hessian_trace(prefix: str) -> float:
    """Brute force: the exact Hessian trace of the mean cross-entropy with respect to the
    parameters under ``prefix``, from the dense Hessian of the model without checkpointing."""
    model = _model(None)
    X, y = _data()
    chosen = {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefix + ".")}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    names, shapes = list(chosen), [p.shape for p in chosen.values()]
    sizes = [p.numel() for p in chosen.values()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        out = functional_call(model, {**parts, **rest}, (X,))
        return nn.functional.cross_entropy(out, y)

    theta = torch.cat([p.reshape(-1) for p in chosen.values()])
    return float(torch.diagonal(hessian(loss)(theta)).sum())


_CALLS = {
    "trace": lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="exact", params="block"),
    "diag_hessian": lambda m, d: cl.diag_hessian(m, nn.CrossEntropyLoss(), d, params="block"),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, nn.CrossEntropyLoss(), d, params="block", k=1),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, nn.CrossEntropyLoss(), d),
}


@pytest.mark.parametrize("name", list(_CALLS))
def test_a_reentrant_block_with_trainable_parameters_is_refused(name: str) -> None:
    """``params="block"``: the trace, the Hessian diagonal and the top eigenvalue came out 0
    (brute force: 0.3661 for the trace, which must be far from 0 for the refusal to matter);
    the gradient statistics over all parameters raised torch's RuntimeError instead."""
    assert _hessian_trace("block") > 0.1
    model = _model(True)
    with pytest.raises(ValueError, match="use_reentrant=False") as err:
        _CALLS[name](model, _data())
    assert "'block.0.weight'" in str(err.value) and "without autograd" in str(err.value)
    assert all(p.grad is None for p in model.parameters())


def test_non_reentrant_checkpointing_is_exact() -> None:
    """The fix the message names: the same trace, exact, against the dense Hessian (float64:
    a sum of 60 entries each a few roundings off, far inside 1e-10 relative)."""
    got = cl.trace(_model(False), nn.CrossEntropyLoss(), _data(), method="exact", params="block")
    assert got.value == pytest.approx(_hessian_trace("block"), rel=1e-10)


def test_a_reentrant_block_without_trainable_parameters_is_computed() -> None:
    """A frozen block hides nothing: the head's trace (the checkpoint's node is pruned by
    autograd) is the dense Hessian's, not refused."""
    model = _model(True)
    model.block.requires_grad_(False)
    got = cl.trace(model, nn.CrossEntropyLoss(), _data(), method="exact", params="head")
    assert got.value == pytest.approx(_hessian_trace("head"), rel=1e-10)


@pytest.mark.skipif(transformers is None, reason="needs transformers")
def test_a_hf_model_whose_mlps_alone_are_trainable_is_refused() -> None:
    """The PEFT/LoRA recipe: HF's gradient_checkpointing_enable (use_reentrant=True) makes the
    embeddings' output require grad, so loss.backward() trains the MLPs; the gradient mean was
    0 for a norm 0.6301 (torch's own backward)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=8, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to(DT)
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    data = ({"input_ids": ids}, cl.analysis.hf.causal_lm_targets(ids))
    loss = nn.CrossEntropyLoss()(model(input_ids=ids).logits.flatten(0, 1), data[1].flatten())
    loss.backward()  # torch's own backward does reach the MLPs
    assert float(model.transformer.h[0].mlp.c_fc.weight.grad.norm()) > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="use_reentrant=False") as err:
        cl.gradient_stats(model, nn.CrossEntropyLoss(), data)
    assert "transformer.h.0.mlp.c_fc.weight" in str(err.value)


def test_noisy_optimizer_with_inputs_refuses_a_reentrant_block() -> None:
    """``step(inputs=, targets=)`` computes the noise in its own pass: it added no noise at all
    to the block (the gradient left as torch's backward gave it)."""
    model = _model(True)
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = NoisyOptimizer(
        opt, DiagFisherNoise(large_batch=64, small_batch=4), model, nn.CrossEntropyLoss(), seed=0
    )
    noisy.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        noisy.step(inputs=X, targets=y)
