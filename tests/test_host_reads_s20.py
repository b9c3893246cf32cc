"""Host reads on training-step paths, counted on the CPU (review s20).

A dispatch mode records every operator that would make a CUDA device wait for the host (a value
or a data-dependent shape read: ``.item()``/``float()``/``bool()`` of a tensor, ``nonzero``,
boolean-mask indexing, ``torch.equal``, ``torch.linalg.eigh``'s convergence check, ...) and every
``Tensor.cpu``/``numpy``/``tolist`` call made from curvlab's own code, as
``tests/test_host_sync_cpu.py`` does. Two differences from a device are accounted for, so that the
counts are those of one accelerator:

* curvlab's finiteness check (``curvlab._finite.all_finite``) reads one sum per tensor on the CPU
  and one per device elsewhere: each call counts once;
* reads that are host-side by design (CPU tensors whatever the model's device: the global RNG
  states a layout probe compares, the CPU label draws, a Python scalar's wrapped tensor, index
  arithmetic built on the CPU) are left out.

Pinned here (docs/noise.md, "Host reads in a step"; docs/training-loops.md, "What each costs"):

* the one-pass paths (``step(closure)``, ``with noisy.capture():``) whose captured state is used
  read nothing, on a model without a LayerNorm and on one whose LayerNorm is frozen (the way to
  stay on that path); ``KFACNoise`` reads only its eigendecompositions on recomputation steps;
* a step that measures in the separate pass reads at most the documented number of values;
* the HuggingFace first-step loss check reads its numbers once (six reads before);
* a ``Diagnostics.step`` given a Python int reads nothing when it does not measure, and a 0-dim
  tensor step is read on every call (docs/analysis.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import curvlab as cl
import curvlab._finite as finite_module
import curvlab.quantities._kfac as kfac_module
from curvlab.analysis.hf import _own_loss_probe, _refuse_other_loss, causal_lm_targets
from tests.test_host_sync_cpu import _SYNC_OPS as BASE_SYNC_OPS
from tests.test_host_sync_cpu import _curvlab_frame

N = cl.noise

# test_host_sync_cpu's reads, and the decompositions, checks and draws that synchronise too
_SYNC_OPS = BASE_SYNC_OPS | {
    "linalg_eigh",
    "_linalg_eigh",
    "_linalg_check_errors",
    "linalg_cholesky_ex",
    "linalg_inv_ex",
    "_linalg_svd",
    "histc",
    "multinomial",
}

# functions whose reads are of CPU tensors whatever the model's device (no device waited for)
# (same_state: the RNG states a probe compares before and after its pass, CPU byte tensors also
# for a GPU's generator, curvlab/_reading_rngs.py)
_HOST_SIDE = ("(_put_back)", "(_zero_or_nonfinite)", "(_inverse_cdf_draws)", "(same_state)")


def _host_side(name: str, where: str) -> bool:
    if any(fn in where for fn in _HOST_SIDE):
        return True
    # a layout probe compares the global RNG states (CPU byte tensors) before and after its pass
    # (curvlab/_layout.py's only torch.equal)
    return name == "equal" and where.startswith("_layout.py:")


class _Recorder(TorchDispatchMode):
    def __init__(self, hits: list[str]) -> None:
        super().__init__()
        self.hits = hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        sync = name in _SYNC_OPS
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            sync = any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            )
            name = f"{name}[bool mask]"
        where = _curvlab_frame() if sync else None
        if where is not None and not _host_side(name, where):
            self.hits.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _record() -> Iterator[list[str]]:
    """The would-be host reads of curvlab's code inside the block, one per device read."""
    hits: list[str] = []
    # not ``item``: its ``_local_scalar_dense`` is seen by the dispatch mode (counted once)
    originals = {m: getattr(torch.Tensor, m) for m in ("cpu", "numpy", "tolist")}
    all_finite = finite_module.all_finite

    def wrapped(method: str):  # type: ignore[no-untyped-def]
        original = originals[method]

        def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if (where := _curvlab_frame()) is not None and not _host_side(method, where):
                hits.append(f"Tensor.{method} at {where}")
            return original(self, *args, **kwargs)

        return call

    def one_per_device(tensors):  # type: ignore[no-untyped-def]
        before = len(hits)
        result = all_finite(tensors)
        if len(hits) > before:  # the CPU branch's per-tensor sums: one read on a device
            del hits[before + 1 :]
            hits[before] = "all_finite (one read per device)"
        return result

    try:
        for method in originals:
            setattr(torch.Tensor, method, wrapped(method))
        finite_module.all_finite = one_per_device
        kfac_module.all_finite = one_per_device
        with _Recorder(hits):
            yield hits
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)
        finite_module.all_finite = all_finite
        kfac_module.all_finite = all_finite


def test_the_recorder_counts_one_read_per_finiteness_check() -> None:
    """The recorder itself: five CPU sums of one finiteness check count once, as on a device."""
    with _record() as hits:
        finite_module.check_values_finite({str(i): torch.ones(3) for i in range(5)}, "x")
    assert hits == ["all_finite (one read per device)"]


# ---------------------------------------------------------------------------- noise samplers


class _Normed(nn.Module):
    """Linear, LayerNorm, Linear: the LayerNorm's parameters are outside the tapped layers."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)
        if frozen:  # the way to stay on the one-pass path (docs/noise.md)
            self.norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": _mlp,
    "frozen-layernorm": lambda: _Normed(frozen=True),
    "layernorm": _Normed,
}

SAMPLERS: dict[str, Callable[[], N.NoiseSampler]] = {
    "diag-empirical": lambda: N.DiagFisherNoise("empirical", scale=0.1),
    "diag-mc": lambda: N.DiagFisherNoise("mc", scale=0.1),
    "diag-exact": lambda: N.DiagFisherNoise("exact", scale=0.1),
    "trace-empirical": lambda: N.FisherTraceNoise("empirical", scale=0.1),
    "trace-mc": lambda: N.FisherTraceNoise("mc", scale=0.1),
    "kfac-empirical": lambda: N.KFACNoise("empirical", scale=0.1),
    "kfac-mc": lambda: N.KFACNoise("mc", scale=0.1),
    "full-empirical": lambda: N.FullFisherNoise("empirical", scale=0.1),
    "full-true": lambda: N.FullFisherNoise("true", scale=0.1),
    "isotropic": lambda: N.IsotropicNoise(0.1),
    "multiplicative": lambda: N.MultiplicativeNoise(0.1),
}


def _reads_per_step(
    model_name: str, sampler: str, path: str, steps: int = 3, recompute_every: int = 1
) -> list[list[str]]:
    """The reads of each of ``steps`` steps after the first (which may probe the layout, once
    per model and input shape), on ``path``: ``"closure"``, ``"capture"`` or ``"separate"``
    (``step(inputs=, targets=)``)."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    X, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    loss_fn = nn.CrossEntropyLoss()
    noisy = N.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        SAMPLERS[sampler](),
        model,
        loss_fn,
        recompute_every=recompute_every,
        seed=0,
    )

    def closure() -> torch.Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    def step() -> None:
        if path == "closure":
            noisy.step(closure)
        elif path == "capture":
            noisy.zero_grad()
            with noisy.capture():
                loss_fn(model(X), y).backward()
            noisy.step()
        else:
            closure()
            noisy.step(inputs=X, targets=y)

    step()
    reads = []
    for _ in range(steps):
        with _record() as hits:
            step()
        reads.append(hits)
    return reads


ONE_PASS = ["diag-empirical", "trace-empirical", "full-empirical", "full-true"]


@pytest.mark.parametrize("model_name", ["mlp", "frozen-layernorm"])
@pytest.mark.parametrize("path", ["closure", "capture"])
@pytest.mark.parametrize("sampler", ONE_PASS + ["isotropic", "multiplicative"])
def test_one_pass_paths_read_nothing(sampler: str, path: str, model_name: str) -> None:
    """docs/noise.md: where the captured state is used, a step reads nothing back (recomputation
    and reuse steps alike); a frozen LayerNorm keeps a model on that path."""
    for hits in _reads_per_step(model_name, sampler, path, recompute_every=2):
        assert hits == [], hits


@pytest.mark.parametrize("sampler", ["full-empirical", "full-true", "isotropic", "multiplicative"])
def test_samplers_without_a_separate_fallback_read_nothing_on_a_layernorm_model(
    sampler: str,
) -> None:
    """``FullFisherNoise``'s fold reaches every parameter, LayerNorm's included: one pass."""
    for hits in _reads_per_step("layernorm", sampler, "capture"):
        assert hits == [], hits


@pytest.mark.parametrize("model_name", ["mlp", "frozen-layernorm"])
def test_kfac_one_pass_reads_only_its_eigendecompositions(model_name: str) -> None:
    """Two ``eigh`` per layer on a recomputation step (two layers), nothing on reuse steps."""
    reads = _reads_per_step(model_name, "kfac-empirical", "closure", steps=4, recompute_every=2)
    for i, hits in enumerate(reads):
        if i % 2:  # steps 2 and 4 (the first is step 0): recomputation steps
            assert len(hits) == 4 and all("eigh" in h for h in hits), hits
        else:
            assert hits == [], hits


def test_kfac_factor_of_few_rows_adds_two_selections() -> None:
    """A factor built from fewer rows than the layer's width (batch 4, widths 20 and 30) adds
    two boolean selections (its rank) to its ``eigh``: 2 layers x (2 eigh + 2 selections)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4))
    X, y = torch.randn(4, 20), torch.randint(0, 4, (4,))
    loss_fn = nn.CrossEntropyLoss()
    noisy = N.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), N.KFACNoise(scale=0.1), model, loss_fn
    )

    def closure() -> torch.Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    noisy.step(closure)
    with _record() as hits:
        noisy.step(closure)
    assert sum("eigh" in h for h in hits) == 4, hits
    assert sum("bool mask" in h for h in hits) == 4, hits
    assert len(hits) == 8, hits


# the documented upper bounds of a measuring step in the separate pass (docs/noise.md):
# DiagFisherNoise/FisherTraceNoise 3 (+2 where BackPACK computes "exact", +5 with ignored labels);
# KFACNoise: its kfac call (3 finiteness checks, 2 label counts, up to 8 comparisons of the
# examples-apart probe) + 2 eigh per layer + 3 where other parameters get the diagonal + 1 where a
# layer never ran; FullFisherNoise at most 2, every step
_KFAC = 3 + 2 + 8 + 2 * 2 + 3 + 1
SEPARATE = [
    ("mlp", "diag-empirical", "separate", 3),
    ("layernorm", "diag-empirical", "closure", 3),
    ("mlp", "diag-mc", "capture", 3),
    ("mlp", "diag-exact", "closure", 5),
    ("layernorm", "trace-empirical", "capture", 3),
    ("mlp", "trace-mc", "separate", 3),
    ("layernorm", "kfac-empirical", "closure", _KFAC),
    ("mlp", "kfac-mc", "capture", _KFAC),
    ("mlp", "kfac-empirical", "separate", _KFAC),
    ("mlp", "full-empirical", "separate", 2),
    ("layernorm", "full-true", "separate", 2),
]


@pytest.mark.parametrize(("model_name", "sampler", "path", "most"), SEPARATE)
def test_separate_pass_reads_at_most_the_documented_number(
    model_name: str, sampler: str, path: str, most: int
) -> None:
    """A measuring step in the separate pass reads at most the documented number of values,
    on every measuring step (``recompute_every=1``); it does read (the docs say so)."""
    if sampler == "diag-exact":
        pytest.importorskip("backpack")  # the bound counts BackPACK's reads
    for hits in _reads_per_step(model_name, sampler, path):
        assert 0 < len(hits) <= most, hits


# ---------------------------------------------------------------- HuggingFace first-step check


def _causal_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3] = -100  # an ignored label: the counts differ from the positions
    return logits, labels


def _ce64(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Brute force: the float64 cross-entropy sum over the scored positions, and their count."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            c = int(targets[b, t])
            if c != -100:
                total -= float(logp[b, t, c])
                count += 1
    return total, count


@pytest.mark.parametrize("items", [None, "tensor", "int"])
def test_hf_loss_check_reads_its_numbers_once(items: str | None) -> None:
    """docs/training-loops.md: the first-step check costs one host synchronisation (six reads
    before review s20: the loss, the shifted sum and count, the item count twice, the sum
    again)."""
    logits, labels = _causal_batch()
    total, count = _ce64(logits, causal_lm_targets(labels))
    own = torch.tensor(total / count, dtype=torch.float32)  # the model's own (causal-LM) loss
    kwargs: dict = {"labels": labels}
    if items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(count) if items == "tensor" else count
    probe = _own_loss_probe(kwargs, {"loss": own, "logits": logits})
    assert probe is not None
    with _record() as hits:
        _refuse_other_loss(probe, "m", 1)  # agrees: no error
    assert len(hits) == 1, hits


def test_hf_loss_check_refusal_reads_once_and_names_both_numbers() -> None:
    """A model whose own loss is the unshifted mean (XLNet's), with the Trainer's item count:
    refused with both numbers, from the one read."""
    logits, labels = _causal_batch()
    plain_total, plain_count = _ce64(logits, labels)
    shifted_total, shifted_count = _ce64(logits, causal_lm_targets(labels))
    own = torch.tensor(plain_total / plain_count)
    probe = _own_loss_probe(
        {"labels": labels, "num_items_in_batch": torch.tensor(plain_count)},
        {"loss": own, "logits": logits},
    )
    assert probe is not None
    with _record() as hits, pytest.raises(ValueError, match="without the causal shift") as info:
        _refuse_other_loss(probe, "m", 1)
    assert len(hits) == 1, hits
    message = str(info.value)
    assert f"{shifted_total / shifted_count:.6g} on the first" in message
    assert f"own loss {plain_total / plain_count:.6g}" in message


def test_hf_unshifted_mean_without_item_count_is_named_unshifted() -> None:
    """The unshifted cross-entropy is divided by its own count (it scores each sequence's first
    label too): before review s20 it was divided by the shifted count, so a model returning the
    unshifted mean without ``num_items_in_batch`` (XLNet outside the Trainer) was told it
    returned "neither the shifted nor the unshifted cross-entropy"."""
    logits, labels = _causal_batch()
    plain_total, plain_count = _ce64(logits, labels)
    _, shifted_count = _ce64(logits, causal_lm_targets(labels))
    assert plain_count != shifted_count
    own = torch.tensor(plain_total / plain_count)
    probe = _own_loss_probe({"labels": labels}, {"loss": own, "logits": logits})
    assert probe is not None
    with pytest.raises(ValueError, match="without the causal shift") as info:
        _refuse_other_loss(probe, "m", 1)
    plain = float(info.value.args[0].split("labels as they are (")[1].split(")")[0])
    assert math.isclose(plain, plain_total / plain_count, rel_tol=1e-5)  # 6 digits printed


# ------------------------------------------------------------------------ Diagnostics.step


def test_diagnostics_step_reads_a_tensor_step_on_every_call(tmp_path: Path) -> None:
    """docs/analysis.md: an unmeasured step given a Python int reads nothing; a 0-dim tensor
    step is read (``int(step)``) on every call, measured or not: on an accelerator a step
    counter kept on the device synchronises every step."""
    torch.manual_seed(0)
    model = _mlp()
    X, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    diag = cl.Diagnostics(
        model, nn.CrossEntropyLoss(), quantities=["loss"], every=10, log_dir=tmp_path
    )
    diag.step(0, X, y)  # measured
    with _record() as plain:
        diag.step(1, X, y)
    with _record() as counter:
        diag.step(torch.tensor(2), X, y)
    diag.close()
    assert plain == []
    assert len(counter) == 1 and "_step_number" in counter[0], counter
