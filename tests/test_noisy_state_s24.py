"""Review s24: NoisyOptimizer's saved and copied state.

* ``load_state_dict`` took the state of another model (hidden width 4 loaded into width 5): the
  saved ``sampler_state_params`` were never compared with the model, torch's optimizer loads
  momentum buffers of any shape, and the next step failed inside torch with a raw size error
  after the curvature pass and the noise draw. Now the state is refused before anything is
  loaded, naming the parameters and shapes that differ; a state saved with other parameters
  trainable (progressive unfreezing), one of an optimizer whose state has other shapes by design
  (``Adafactor``'s factored moments) and one from before the entry existed still load.
* ``copy.deepcopy(noisy)`` measured the curvature anew at its next step (the weak references to
  the parameters its cached state was measured for still pointed at the original's), and
  ``pickle.dumps(noisy)`` / ``torch.save(noisy)`` raised ``cannot pickle
  'weakref.ReferenceType'`` after one step with ``DiagFisherNoise`` or ``KFACNoise``. A copy of
  ``(model, optimizer, noisy)`` now goes on bitwise as the original (the same noise, the cached
  curvature reused), deep-copied or pickled.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    IsotropicNoise,
    KFACNoise,
    NoiseSampler,
    NoisyOptimizer,
)

SAMPLERS: dict[str, Callable[[], NoiseSampler]] = {
    "diag": lambda: DiagFisherNoise(scale=1.0),
    "kfac": lambda: KFACNoise(scale=1.0),
    "trace": lambda: FisherTraceNoise(scale=1.0),
}


def _data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _build(
    sampler: NoiseSampler, hidden: int = 4, optimizer: str = "sgd"
) -> tuple[nn.Module, NoisyOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    noisy = NoisyOptimizer(opt, sampler, model, nn.CrossEntropyLoss(), seed=1, recompute_every=4)
    return model, noisy


def _step(model: nn.Module, noisy: NoisyOptimizer, step: int) -> None:
    X, y = _data(step)
    noisy.zero_grad()
    with noisy.capture():
        noisy.loss_fn(model(X), y).backward()  # type: ignore[misc]
    noisy.step()


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _saved(noisy: NoisyOptimizer) -> dict:
    buf = io.BytesIO()
    torch.save(noisy.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------- another model
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_another_models_state_is_refused_before_loading(name: str) -> None:
    model_a, noisy_a = _build(SAMPLERS[name]())
    _step(model_a, noisy_a, 0)
    state = _saved(noisy_a)
    model_b, noisy_b = _build(SAMPLERS[name](), hidden=5)
    gen_before = noisy_b.generator.get_state()
    with pytest.raises(ValueError) as info:
        noisy_b.load_state_dict(state)
    msg = str(info.value)
    for part in ("0.weight", "(4, 3)", "(5, 3)", "2.weight", "(3, 4)", "(3, 5)", "momentum_buffer"):
        assert part in msg, (part, msg)
    assert "Nothing was loaded" in msg, msg
    # nothing loaded: the optimizer's state, the step count, the generator, the cache
    assert noisy_b.optimizer.state_dict()["state"] == {}
    assert noisy_b.steps_taken == 0 and noisy_b._state is None
    assert torch.equal(noisy_b.generator.get_state(), gen_before)


def test_another_models_optimizer_state_is_refused_without_a_sampler_state() -> None:
    """IsotropicNoise caches no curvature: the momentum buffers' shapes alone tell."""
    model_a, noisy_a = _build(IsotropicNoise(std=0.1))
    _step(model_a, noisy_a, 0)
    state = _saved(noisy_a)
    assert state["sampler_state_params"] is None
    _, noisy_b = _build(IsotropicNoise(std=0.1), hidden=5)
    with pytest.raises(ValueError, match=r"0\.weight.*momentum_buffer.*\(4, 3\).*\(5, 3\)"):
        noisy_b.load_state_dict(state)
    assert noisy_b.optimizer.state_dict()["state"] == {} and noisy_b.steps_taken == 0


def _resumed_equals_uninterrupted(
    edit: Callable[[dict], dict], optimizer: str = "sgd", frozen: bool = False
) -> None:
    model_a, noisy_a = _build(DiagFisherNoise(scale=1.0), optimizer=optimizer)
    if frozen:
        model_a[0].requires_grad_(False)
    _step(model_a, noisy_a, 0)
    state, params = _saved(noisy_a), {k: v.clone() for k, v in model_a.state_dict().items()}
    model_a[0].requires_grad_(True)
    model_b, noisy_b = _build(DiagFisherNoise(scale=1.0), optimizer=optimizer)
    model_b.load_state_dict(params)
    noisy_b.load_state_dict(edit(state))
    for step in (1, 2):
        _step(model_a, noisy_a, step)
        _step(model_b, noisy_b, step)
    assert torch.equal(_flat(model_a), _flat(model_b))


def test_the_same_models_state_still_loads() -> None:
    _resumed_equals_uninterrupted(lambda s: s)


def test_a_state_from_before_the_entry_still_loads() -> None:
    _resumed_equals_uninterrupted(
        lambda s: {k: v for k, v in s.items() if k != "sampler_state_params"}
    )


def test_a_state_saved_with_a_layer_frozen_still_loads() -> None:
    """Progressive unfreezing: measured for the last layer alone, resumed with both trainable
    (the next step measures anew, as the uninterrupted run does)."""
    _resumed_equals_uninterrupted(lambda s: s, frozen=True)


def test_an_optimizer_state_of_other_shapes_by_design_still_loads() -> None:
    """Adafactor's factored moments (row_var, col_var) have other shapes than the parameters."""
    _resumed_equals_uninterrupted(lambda s: s, optimizer="adafactor")


# --------------------------------------------------------------------------- copies
def _copy_goes_on_alike(name: str, how: Callable[[object], object]) -> None:
    model, noisy = _build(SAMPLERS[name]())
    _step(model, noisy, 0)  # measured here, reused on steps 1..3 (recompute_every=4)
    twin_model, twin = how((model, noisy))  # type: ignore[misc]
    assert twin.model is twin_model and twin_model is not model
    for step in (1, 2, 3):
        _step(model, noisy, step)
        _step(twin_model, twin, step)
        assert twin._state_step == noisy._state_step == 0, "the copy measured anew"
        assert torch.equal(_flat(twin_model), _flat(model)), f"step {step}"


def _pickled(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("how", [copy.deepcopy, _pickled, _torch_saved], ids=lambda f: f.__name__)
def test_a_copy_goes_on_bitwise_as_the_original(name: str, how: Callable) -> None:
    _copy_goes_on_alike(name, how)


def test_a_copy_of_the_noisy_optimizer_alone_is_its_own() -> None:
    """Deep-copied alone, the copy holds copies of the model and optimizer (its cache's
    parameter objects among them: no measurement anew), and the original is untouched."""
    model, noisy = _build(DiagFisherNoise(scale=1.0))
    _step(model, noisy, 0)
    twin = copy.deepcopy(noisy)
    refs = noisy._state_objects
    assert refs is not None and all(r() is p for r, p in zip(refs, model.parameters()))
    twin_refs = twin._state_objects
    assert twin_refs is not None
    assert all(r() is p for r, p in zip(twin_refs, twin.model.parameters()))
    assert not twin._needs_pass() and not noisy._needs_pass()
