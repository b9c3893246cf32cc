"""``nn.EmbeddingBag(max_norm=...)`` renormalises the rows it looks up in place in every forward
pass, as ``nn.Embedding(max_norm=...)`` does: curvlab's passes put the user's weight back for both
(found in review: an EmbeddingBag's weight was left renormalised). The numbers are those at the
renormalised weights, against the func backend's per-example gradients and a dense Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(6, 3, max_norm=0.5, mode="mean"), nn.Linear(3, 2))
    return model.double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4]]), torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: cl.diag_fisher(m, nn.CrossEntropyLoss(), d),
        lambda m, d: cl.gradient_stats(m, nn.CrossEntropyLoss(), d),
        # its Hessian and GGN products: torch has no second derivative of embedding_bag's
        # backward and no forward mode of it (a clear error); the exact diagonal needs neither
        lambda m, d: cl.diag_fisher(m, nn.CrossEntropyLoss(), d, kind="exact"),
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, matrix="ggn", method="exact"),
    ],
    ids=["diag_fisher", "gradient_stats", "diag_ggn", "trace"],
)
def test_an_embedding_bag_with_max_norm_keeps_the_users_weight(call):
    model = _model()
    before = model[0].weight.detach().clone()
    version = model[0].weight._version
    call(model, _data())
    assert torch.equal(model[0].weight.detach(), before)  # changed before
    assert model[0].weight._version >= version


def test_an_embedding_bag_with_max_norm_is_computed_at_the_renormalised_weights():
    model = _model()
    data = _data()
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), data)
    ref = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, backend="func")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-15)
    # the func backend's numbers at the renormalised weights: those of a model without max_norm
    # whose weight is renormalised once (every row this data looks up)
    plain = _model()
    with torch.no_grad():
        plain[0](data[0])  # renormalise in place
    plain[0].max_norm = None
    want = cl.diag_fisher(plain, nn.CrossEntropyLoss(), data, backend="func")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-15)
