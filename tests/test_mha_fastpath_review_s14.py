"""torch's MultiheadAttention/TransformerEncoderLayer fast path in curvlab's own passes.

In eval mode and without gradient torch runs ``nn.TransformerEncoderLayer`` as one fused kernel, on
nested tensors when a ``src_key_padding_mask`` is given: ``kfac`` on such an encoder crashed in its
probe ("NestedTensorImpl doesn't support sizes"; a known item since review s13, and with the
batch-axis check of s14 the crash read as "a batch without a batch axis"). The fast path is now off
inside every curvlab pass, which then computes what a pass with gradient computes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl

DT = torch.float64


class Encoder(nn.Module):
    def __init__(self, nested: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(16, 20)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=mask))


def _problem(nested: bool = True):  # noqa: ANN202
    torch.manual_seed(0)
    model = Encoder(nested).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, 3:] = True
    y = ids.clone()
    y[mask] = -100
    return model, ({"ids": ids, "mask": mask}, y)


LOSS = cl.classes_last(nn.CrossEntropyLoss())


def test_kfac_on_an_encoder_with_a_padding_mask_equals_the_unnested_model() -> None:
    model, data = _problem()
    got = cl.kfac(model, LOSS, data)
    twin, _ = _problem(nested=False)
    ref = cl.kfac(twin, LOSS, data)
    assert set(got) == set(ref) and got
    for name in ref:
        torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name].G, ref[name].G, rtol=1e-12, atol=1e-14)
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def test_empirical_fisher_of_an_encoder_with_a_padding_mask_against_brute_force() -> None:
    model, (inputs, y) = _problem()
    got = cl.diag_fisher(model, LOSS, (inputs, y), kind="empirical")
    params = {k: v.detach() for k, v in model.named_parameters()}
    count = (y != -100).sum()

    def one(p, ids, mask, t):  # noqa: ANN001, ANN202
        out = functional_call(model, p, (ids[None], mask[None]))
        return nn.functional.cross_entropy(out.flatten(0, 1), t, ignore_index=-100, reduction="sum")

    torch.backends.mha.set_fastpath_enabled(False)  # the brute force needs the plain layers too
    try:
        per = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, inputs["ids"], inputs["mask"], y)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    n = y.shape[0]
    for k, v in per.items():  # g_n = N * grad of example n's share of the mean loss
        g = v * n / count
        torch.testing.assert_close(got[k], (g**2).mean(0), rtol=1e-9, atol=1e-14)
