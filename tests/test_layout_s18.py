"""The coupling error for a batch without a batch axis names the batch axis first (review s18).

A ``DataLoader(TensorDataset(ids, labels), batch_size=None)`` yields one sequence per batch with
no batch axis: ids ``(T,)``, labels ``(T,)``. An attention model runs on the unbatched ``(T, d)``
features and on any slice of its "examples" (positions), so the check that the model keeps the
examples apart found a coupling and said only "the model mixes the examples ... use LayerNorm or
the matrix-free operators", hiding the real cause (the missing batch axis) and its one-line fix.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab._layout import MixedExamplesError, finding_error

V, T, D = 5, 6, 4


class _LM(nn.Module):
    """A one-layer causal attention LM: unbatched ``(T,)`` ids give ``(T, d)`` attention input,
    which ``nn.MultiheadAttention`` takes as one unbatched sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.att = nn.MultiheadAttention(D, 1, batch_first=True)
        self.out = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        t = ids.shape[-1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        a, _ = self.att(h, h, h, attn_mask=mask, need_weights=False)
        return self.out(h + a)


class _Centered(nn.Module):
    """A genuinely mixing model on a proper batch: features centred over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return z - z.mean(0)


def _model() -> _LM:
    torch.manual_seed(0)
    return _LM().double().eval()


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, T), generator=g)
    y = torch.randint(0, V, (3, T), generator=g)
    return DataLoader(TensorDataset(ids, y), batch_size=None)  # one sequence, no batch axis


def _message(call) -> str:  # noqa: ANN001
    with pytest.raises(MixedExamplesError) as info:
        call()
    return str(info.value)


def _names_batch_axis_first(msg: str) -> None:
    lead = msg.split(".")[0]
    assert "no batch axis" in lead, msg  # the likely cause, first
    assert "batch_size=" in msg, msg  # and the fix
    assert "(MultiheadAttention)" in msg, msg  # the coupling found is still reported
    # the batch axis comes before the advice for a genuinely mixing model
    assert msg.index("no batch axis") < msg.index("LayerNorm"), msg


@pytest.mark.parametrize("quantity", ["gradient_stats", "diag_fisher"])
def test_unbatched_loader_names_the_batch_axis(quantity: str) -> None:
    model, loss = _model(), nn.CrossEntropyLoss()
    msg = _message(lambda: getattr(cl, quantity)(model, loss, _loader()))
    _names_batch_axis_first(msg)
    assert "DataLoader" in msg


def test_unbatched_loader_names_the_batch_axis_kfac() -> None:
    model, loss = _model(), nn.CrossEntropyLoss()
    _names_batch_axis_first(_message(lambda: cl.kfac(model, loss, _loader())))


def test_unbatched_single_batch_names_the_batch_axis() -> None:
    """One example's tensors passed without a leading axis (no loader to tell): the attention
    layer's unbatched input is the evidence."""
    model, loss = _model(), nn.CrossEntropyLoss()
    ids, y = next(iter(_loader()))
    msg = _message(lambda: cl.gradient_stats(model, loss, (ids, y)))
    _names_batch_axis_first(msg)
    assert "unbatched input of shape (6, 4)" in msg, msg


def test_batched_attention_runs() -> None:
    """The fix the message names (batch_size=B) works: the mean gradient equals autograd's on
    the whole batch, each sequence one example."""
    model, loss = _model(), nn.CrossEntropyLoss()
    data = DataLoader(_loader().dataset, batch_size=3)
    stats = cl.gradient_stats(model, loss, data)
    ids, labels = _loader().dataset.tensors
    params = dict(model.named_parameters())
    full = loss(model(ids).reshape(-1, V), labels.reshape(-1))  # every sequence has T tokens
    grads = torch.autograd.grad(full, list(params.values()))
    for (name, _), g in zip(params.items(), grads):
        torch.testing.assert_close(stats.mean[name], g, rtol=1e-10, atol=1e-13)


def test_mixing_model_with_batch_axis_keeps_the_coupling_message() -> None:
    torch.manual_seed(0)
    model = _Centered().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=4)):
        msg = _message(lambda d=data: cl.gradient_stats(model, nn.MSELoss(), d))
        assert msg.startswith("the model mixes the examples of a batch: "), msg
        assert "batch axis" not in msg, msg


def test_batch_sampler_loader_is_batched() -> None:
    """A DataLoader with a batch_sampler has batch_size None too, yet yields real batches: a
    coupling found on its data is the model's."""
    x = torch.zeros(4, 3)
    batched = DataLoader(TensorDataset(x), batch_sampler=[[0, 1], [2, 3]])
    assert batched.batch_size is None
    why = "module 'lin' (Linear) mixes them"
    assert not str(finding_error(why, batched)).count("batch axis")
    assert "no batch axis" in str(finding_error(why, DataLoader(TensorDataset(x), batch_size=None)))


def test_likely_unbatched_survives_the_ranks_gather() -> None:
    """Under torch.distributed the finding is pickled to the other ranks and noted with the
    rank that found it: the evidence must survive both, or other ranks lose the batch axis."""
    import pickle

    from curvlab._layout import LikelyUnbatched, _noted, shareable

    found = LikelyUnbatched("module 'att' (MultiheadAttention) mixes them", "one sequence")
    theirs = pickle.loads(pickle.dumps(shareable(found)))
    noted = _noted(theirs, " (on rank 1's first chunk; every rank raises this error)")
    msg = str(finding_error(noted))
    assert msg.startswith("the batch most likely has no batch axis: one sequence."), msg
    assert "on rank 1's first chunk" in msg, msg
