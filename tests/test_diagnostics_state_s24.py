"""Diagnostics states and curvlab's own state files (review s24).

* ``Diagnostics.load_state_dict`` took a state of another model, loss, seed or set of
  quantities silently: model A's Tr(F) window raised a false Fisher-explosion warning at model
  B's first measurement, and another seed's generator mixed two label streams;
* ``analyze`` (and the CLI) given curvlab's own state (a ``Diagnostics``, ``NoisyOptimizer`` or
  penalty ``state_dict()``) said it "does not fit the model: ... unexpected keys
  ['generator']"; a dict whose tensor entries share no key with the model was taken as its
  state_dict the same way;
* ``copy.deepcopy`` / ``pickle`` of a ``Diagnostics`` with a ``log_dir`` raised Python's raw
  "cannot pickle '_io.TextIOWrapper'".

Values are checked against dense float64 brute force written here (``torch.func``).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.analysis import Diagnostics
from curvlab.analysis._checkpoint import CheckpointError, CheckpointMismatchError
from curvlab.noise import KFACNoise, NoisyOptimizer
from curvlab.regularizers import GradientNormPenalty

DT = torch.float64


def _mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _saved(diag: Diagnostics) -> dict:
    """``diag.state_dict()`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(diag.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _measured(model: nn.Module, loss_fn: nn.Module, names: list[str], **kw) -> dict:
    X, y = _batch()
    diag = Diagnostics(model, loss_fn, names, every=1, **kw)
    for step in range(2):
        diag.step(step, X, y)
    return _saved(diag)


# ---------------------------------------------------------------- defect 1: another's state


def test_state_of_another_model_is_refused_before_anything_changes():
    state = _measured(_mlp(4), nn.CrossEntropyLoss(), ["trace_fisher"])
    other = Diagnostics(_mlp(40), nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    before = other.generator.get_state().clone()
    with pytest.raises(ValueError, match="another model") as info:
        other.load_state_dict(state)
    assert "'0.weight' (4, 3) there, (40, 3) here" in str(info.value)
    # nothing loaded: the window, the flag and the generator are the fresh Diagnostics'
    assert torch.equal(other.generator.get_state(), before)
    assert list(other._explosion.window) == [] and not other._explosion.exploded
    assert other._calls == 0


def test_state_of_other_names_is_refused():
    model = _mlp(4)
    state = _measured(model, nn.CrossEntropyLoss(), ["trace_fisher"])
    renamed = nn.Sequential()
    renamed.add_module("first", nn.Linear(3, 4).to(DT))
    renamed.add_module("act", nn.Tanh())
    renamed.add_module("last", nn.Linear(4, 3).to(DT))
    diag = Diagnostics(renamed, nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    with pytest.raises(ValueError, match=r"this model's parameters \['first.weight'"):
        diag.load_state_dict(state)


def test_state_of_another_seed_loss_and_quantities_names_each():
    model = _mlp(4)
    state = _measured(model, nn.CrossEntropyLoss(), ["trace_fisher", "loss"], seed=0)
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(reduction="sum"), ["trace_fisher"], every=1, seed=5
    )
    with pytest.raises(ValueError) as info:
        diag.load_state_dict(state)
    text = str(info.value)
    assert "its seed is 0, this one's 5" in text
    assert "reduction 'mean'" in text and "reduction 'sum'" in text
    assert "its quantities are ['loss', 'trace_fisher'], this one's ['trace_fisher']" in text
    assert "another model" not in text


def test_seed_alone_is_refused():
    model = _mlp(4)
    state = _measured(model, nn.CrossEntropyLoss(), ["trace_fisher"], seed=0)
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["trace_fisher"], every=1, seed=5)
    with pytest.raises(ValueError, match="seed=0"):
        diag.load_state_dict(state)


def test_same_settings_resume_as_uninterrupted_and_quantity_order_is_free():
    X, y = _batch()
    names = ["trace_fisher", "loss"]
    whole = Diagnostics(_mlp(4), nn.CrossEntropyLoss(), names, every=1)
    first = Diagnostics(_mlp(4), nn.CrossEntropyLoss(), names, every=1)
    for step in range(2):
        whole.step(step, X, y)
        first.step(step, X, y)
    state = _saved(first)
    assert state["settings"]["seed"] == 0
    assert state["settings"]["loss"] == {"kind": "cross_entropy", "reduction": "mean"}
    assert state["settings"]["parameters"]["0.weight"] == [4, 3]
    resumed = Diagnostics(_mlp(4), nn.CrossEntropyLoss(), names[::-1], every=1)
    resumed.load_state_dict(state)
    a = whole.step(2, X, y)["values"]
    b = resumed.step(2, X, y)["values"]
    assert a["trace_fisher"] == b["trace_fisher"] and a["loss"] == b["loss"]
    # the loss value against brute force
    model = _mlp(4)
    params = dict(model.named_parameters())
    expected = nn.functional.cross_entropy(functional_call(model, params, (X,)), y).item()
    assert b["loss"] == pytest.approx(expected, rel=16 * torch.finfo(DT).eps, abs=0)


def test_state_without_settings_loads_as_before():
    state = _measured(_mlp(4), nn.CrossEntropyLoss(), ["trace_fisher"])
    del state["settings"]
    other = Diagnostics(_mlp(40), nn.CrossEntropyLoss(), ["trace_fisher"], every=1, seed=3)
    other.load_state_dict(state)  # an earlier curvlab's state: not checked
    assert other._calls == 2


def test_malformed_settings_are_refused():
    model = _mlp(4)
    state = _measured(model, nn.CrossEntropyLoss(), ["trace_fisher"])
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    with pytest.raises(ValueError, match="not a Diagnostics state_dict: its 'settings'"):
        diag.load_state_dict({**state, "settings": 3})


def test_another_models_state_no_longer_gives_a_false_explosion():
    tiny = _mlp(4)
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(0.05)  # small logits: a Tr(F) far below the other model's
    state = _measured(tiny, nn.CrossEntropyLoss(), ["trace_fisher"])
    big = Diagnostics(_mlp(40), nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    with pytest.raises(ValueError):
        big.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cl.analysis.FisherExplosionWarning)
        big.step(2, *_batch())


# ---------------------------------------------------------------- defect 2: curvlab's own states


def _problem():
    model = _mlp(4)
    X, y = _batch()
    return model, nn.CrossEntropyLoss(), X, y


def _noisy_state(model, loss_fn, X, y) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    noisy = NoisyOptimizer(opt, KFACNoise(scale=1.0), model, loss_fn, seed=0)
    noisy.zero_grad()
    with noisy.capture():
        loss_fn(model(X), y).backward()
    noisy.step()
    return noisy.state_dict()


def _penalty_state(model, loss_fn, X, y) -> dict:
    penalty = GradientNormPenalty(model, loss_fn, alpha=0.1)
    penalty(X, y)
    return penalty.state_dict()


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda m, L, X, y: _measured(m, L, ["loss"]), "Diagnostics state"),
        (_noisy_state, "NoisyOptimizer state"),
        (_penalty_state, "penalty state"),
    ],
)
def test_curvlab_state_is_named_not_a_mismatch(tmp_path, make, name):
    model, loss_fn, X, y = _problem()
    state = make(model, loss_fn, X, y)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    for ckpt in (state, str(path)):
        with pytest.raises(CheckpointError, match=f"is a curvlab {name}") as info:
            cl.analyze(model, loss_fn, (X, y), checkpoint=ckpt, quantities=["loss"], progress=False)
        assert not isinstance(info.value, CheckpointMismatchError)
        assert "not model weights" in str(info.value)


def test_tensor_entries_sharing_no_key_are_no_state_dict():
    model, loss_fn, X, y = _problem()
    ckpt = {"scores": torch.zeros(3, dtype=DT), "epoch": 3}
    with pytest.raises(CheckpointError, match="holds no state_dict of this model") as info:
        cl.analyze(model, loss_fn, (X, y), checkpoint=ckpt, quantities=["loss"], progress=False)
    assert not isinstance(info.value, CheckpointMismatchError)
    assert "'epoch'" in str(info.value) and "'scores'" in str(info.value)


def test_state_dict_with_extra_entries_still_loads():
    model, loss_fn, X, y = _problem()
    other = _mlp(4, seed=7)
    ckpt = {**other.state_dict(), "epoch": 3}
    report = cl.analyze(
        model, loss_fn, (X, y), checkpoint=ckpt, quantities=["loss"], progress=False
    )
    params = dict(other.named_parameters())
    expected = nn.functional.cross_entropy(functional_call(other, params, (X,)), y).item()
    got = report.entries[-1]["values"]["loss"]
    assert got == pytest.approx(expected, rel=16 * torch.finfo(DT).eps, abs=0)


# ---------------------------------------------------------------- defect 3: copies


def test_copy_with_a_log_is_refused_with_the_way_out(tmp_path):
    diag = Diagnostics(_mlp(4), nn.CrossEntropyLoss(), ["loss"], every=1, log_dir=tmp_path)
    diag.step(0, *_batch())
    for copier in (copy.deepcopy, lambda d: pickle.loads(pickle.dumps(d))):
        with pytest.raises(TypeError, match=r"save diag\.state_dict\(\)") as info:
            copier(diag)
        assert "one Diagnostics per log_dir" in str(info.value)
    diag.step(1, *_batch())  # the original goes on writing
    diag.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_copy_without_a_log_still_works():
    X, y = _batch()
    diag = Diagnostics(_mlp(4), nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    diag.step(0, X, y)
    for twin in (copy.deepcopy(diag), pickle.loads(pickle.dumps(diag))):
        assert twin.step(1, X, y)["values"] == copy.deepcopy(diag).step(1, X, y)["values"]
