"""``torch.compile``d models everywhere: the eager model's results, keyed by the user's names.

Every entry point given ``torch.compile(model, backend="aot_eager")`` must return what it returns
for ``model`` itself (same seeds, to 1e-6, identical keys, no ``_orig_mod.`` prefix), say so in
its ``info["compiled"]`` and leave the model (and the wrapper) exactly as it was. The in-step paths
(``NoisyOptimizer`` with its captures, ``Diagnostics``, the penalties) must train to the eager
run's parameters with a compiled model and with a compiled step, without a recompile per step.
See docs/training-loops.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

import curvlab as cl
from curvlab._compiled import COMPILED_NOTE, COMPILED_PARTS_NOTE, COMPILED_STEP_NOTE
from curvlab._rng import make_generator
from curvlab.analysis import QUANTITIES
from curvlab.estimators import exact_trace_per_example
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    NoisyOptimizer,
)
from curvlab.operators import HessianOperator, select_parameters
from curvlab.regularizers import (
    FisherPenalty,
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)
from tests import reference as R
from tests.problems import make_problem
from tests.zoo import make_case

RTOL, ATOL = 1e-6, 1e-9


def _compile(model: nn.Module, **kwargs: Any) -> nn.Module:
    return torch.compile(model, backend="aot_eager", **kwargs)


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_dynamo() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- problems


def _problem(name: str) -> tuple[nn.Module, nn.Module, Any, Tensor, Tensor]:
    """(model, loss_fn, data, X, y): an MLP, a small CNN, a tiny GPT with (B, T, C) logits."""
    if name == "gpt":  # tied head, ignore_index targets (B, T), SDPA attention
        case = make_case("tiny_gpt-mean-three")
        X = torch.cat([b[0] for b in case.batches])
        y = torch.cat([b[1] for b in case.batches])
        return case.model, case.loss_fn, case.data, X, y
    p = make_problem({"mlp": "mlp-ce-mean-three", "cnn": "cnn-ce-sum-one"}[name])
    return p.model, p.loss_fn, p.data, p.X, p.y


PROBLEMS = ["mlp", "cnn", "gpt"]


def _loss(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """The training loss as a user writes it (a GPT loop flattens its tokens)."""
    if out.dim() == 3:
        return loss_fn(out.flatten(0, 1), y.flatten())
    return loss_fn(out, y)


# ------------------------------------------------------------------------------ entry points

Call = Callable[[nn.Module, nn.Module, Any, Tensor, Tensor], Any]


def _penalty(fn: Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor]) -> Call:
    """A penalty's value and its gradient with respect to the parameters."""

    def call(m: nn.Module, loss_fn: nn.Module, data: Any, X: Tensor, y: Tensor) -> Any:
        if not X.is_floating_point() and fn is _GP_X:  # the GPT's inputs are token ids
            pytest.skip("input_gradient_penalty refuses integer inputs (token ids) by design")
        value = fn(m, loss_fn, X, y)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, params, allow_unused=True)
        return {"value": value.detach(), "grads": [g for g in grads if g is not None]}

    return call


def _GP_X(m: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:  # noqa: N802
    return input_gradient_penalty(m, loss_fn, X, y)


def _noise(sampler: Any, **kw: Any) -> Call:
    return lambda m, l, d, X, y: sampler.sample(m, l, X, y, seed=3, **kw)


def _estimate(sampler: Any) -> Call:
    return lambda m, l, d, X, y: sampler.estimate(m, l, X, y, make_generator(seed=4))


def _operator(m: nn.Module, loss_fn: nn.Module, data: Any, X: Tensor, y: Tensor) -> Any:
    op = cl.curvature_operator(m, loss_fn, data, matrix="ggn")
    v = torch.linspace(-1, 1, op.shape[0], dtype=op.dtype)
    return {"names": op.names, "Gv": op.matmat(v[:, None]), "info": op.info}


def _hessian_class(m: nn.Module, loss_fn: nn.Module, data: Any, X: Tensor, y: Tensor) -> Any:
    op = HessianOperator(m, loss_fn, data)
    v = torch.linspace(-1, 1, op.shape[0], dtype=op.dtype)
    return {"names": op.names, "Hv": op.matmat(v[:, None]), "info": op.info}


CALLS: dict[str, Call] = {
    "diag_fisher-empirical": lambda m, l, d, X, y: cl.diag_fisher(m, l, d),
    "diag_fisher-mc": lambda m, l, d, X, y: cl.diag_fisher(m, l, d, kind="mc", seed=1),
    "diag_fisher-exact": lambda m, l, d, X, y: cl.diag_fisher(m, l, d, kind="exact"),
    "diag_hessian": lambda m, l, d, X, y: cl.diag_hessian(m, l, d),
    "kfac": lambda m, l, d, X, y: cl.kfac(m, l, d, kind="mc", seed=2),
    "gradient_stats": lambda m, l, d, X, y: cl.gradient_stats(m, l, d),
    "fisher_norms": lambda m, l, d, X, y: cl.fisher_norms(m, l, d, kind="exact"),
    "trace-hessian": lambda m, l, d, X, y: cl.trace(m, l, d, num_probes=4, seed=5),
    "trace-fisher-exact": lambda m, l, d, X, y: cl.trace(m, l, d, matrix="fisher", method="exact"),
    "eigenvalues": lambda m, l, d, X, y: cl.eigenvalues(m, l, d, k=2, seed=6),
    "spectral_density": lambda m, l, d, X, y: cl.spectral_density(m, l, d, num_steps=8, seed=7),
    "fisher_trace": lambda m, l, d, X, y: cl.fisher_trace(m, l, d, seed=8),
    "exact_trace_per_example": lambda m, l, d, X, y: exact_trace_per_example(m, l, d, "ggn"),
    "select_parameters": lambda m, l, d, X, y: list(select_parameters(m, lambda n, p: p.ndim > 1)),
    "curvature_operator": _operator,
    "HessianOperator": _hessian_class,
    "DiagFisherNoise.sample": _noise(DiagFisherNoise(scale=0.5)),
    "DiagFisherNoise-mc.sample": _noise(DiagFisherNoise("mc", scale=0.5)),
    "DiagFisherNoise.estimate": _estimate(DiagFisherNoise(scale=0.5)),
    "FisherTraceNoise.sample": _noise(FisherTraceNoise(scale=0.5)),
    "KFACNoise.sample": _noise(KFACNoise("empirical", scale=0.5)),
    "KFACNoise.estimate": _estimate(KFACNoise(scale=0.5)),
    "FullFisherNoise.sample": _noise(FullFisherNoise("true", scale=0.5)),
    "IsotropicNoise.sample": _noise(IsotropicNoise(0.1)),
    "fisher_penalty": _penalty(lambda m, l, X, y: fisher_penalty(m, l, X, seed=1, targets=y)),
    "gradient_penalty": _penalty(lambda m, l, X, y: gradient_penalty(m, l, X, y)),
    "random_label_penalty": _penalty(
        lambda m, l, X, y: random_label_penalty(m, l, X, seed=2, targets=y)
    ),
    "input_gradient_penalty": _penalty(_GP_X),
}
NO_INFO = {  # results without an info dict: tensors, dicts of tensors, lists, tuples
    "exact_trace_per_example",
    "select_parameters",
    "DiagFisherNoise.sample",
    "DiagFisherNoise-mc.sample",
    "DiagFisherNoise.estimate",
    "FisherTraceNoise.sample",
    "KFACNoise.sample",
    "KFACNoise.estimate",
    "FullFisherNoise.sample",
    "IsotropicNoise.sample",
    "fisher_penalty",
    "gradient_penalty",
    "random_label_penalty",
    "input_gradient_penalty",
}


def _call(name: str, model: nn.Module, problem: tuple) -> Any:
    _, loss_fn, data, X, y = problem
    return CALLS[name](model, loss_fn, data, X, y)


def _same(got: Any, expected: Any, where: str = "result") -> None:
    """Equal results to RTOL/ATOL, with identical keys in identical order (``info`` skipped)."""
    if isinstance(expected, Tensor):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True, msg=where)
    elif isinstance(expected, dict):
        assert list(got) == list(expected), (where, list(got), list(expected))
        for k in expected:
            if k != "info":
                _same(got[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _same(a, b, f"{where}[{i}]")
    elif dataclasses.is_dataclass(expected):
        assert type(got) is type(expected), where
        for f in dataclasses.fields(expected):
            if f.name != "info":
                _same(getattr(got, f.name), getattr(expected, f.name), f"{where}.{f.name}")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=RTOL, abs=ATOL, nan_ok=True), where
    else:
        assert got == expected, where


def _info(result: Any) -> dict:
    if isinstance(result, dict) and "info" in result and not hasattr(result, "info"):
        return result["info"]
    return result.info


def _stance() -> str:
    return torch._dynamo.eval_frame._stance.stance


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("call", CALLS)
def test_entry_point_on_a_compiled_model_is_the_eager_one(problem: str, call: str) -> None:
    prob = _problem(problem)
    model = prob[0]
    compiled = _compile(model)  # shares the parameters; never run by these calls
    expected = _call(call, model, prob)
    before, stance = R.snapshot(compiled), _stance()
    got = _call(call, compiled, prob)
    R.assert_untouched(compiled, before)  # also the original module: its names are listed too
    assert _stance() == stance
    _same(got, expected)
    if call not in NO_INFO:
        assert _info(got)["compiled"] == COMPILED_NOTE
        assert "compiled" not in _info(expected)
    keys = got.get("names", got) if isinstance(got, dict) else got if isinstance(got, list) else []
    assert not any("_orig_mod" in str(k) for k in keys), keys


@pytest.mark.parametrize("problem", PROBLEMS)
def test_analyze_on_a_compiled_model_omits_nothing(problem: str) -> None:
    model, loss_fn, data, _, _ = _problem(problem)
    compiled = _compile(model)
    quantities = [q for q in QUANTITIES if q != "noise_scale_dp"]  # needs several processes
    kw = dict(quantities=quantities, num_probes=3, k=2, num_steps=8, density_probes=1, nqm=False)
    expected = cl.analyze(model, loss_fn, data, **kw, on_error="raise")
    before = R.snapshot(compiled)
    got = cl.analyze(compiled, loss_fn, data, **kw)
    R.assert_untouched(compiled, before)
    entry, ref = got.entries[-1], expected.entries[-1]
    assert entry["errors"] == {}
    assert ref["errors"] == {} and len(ref["values"]) >= len(quantities)
    _same(entry["values"], ref["values"], "values")
    _same(entry["per_layer"], ref["per_layer"], "per_layer")
    assert not any(k.startswith("_orig_mod") for k in entry["per_layer"])
    _same(entry["arrays"], ref["arrays"], "arrays")
    assert got.meta["compiled"] == COMPILED_NOTE and "compiled" not in expected.meta


def test_analyze_loads_a_checkpoint_saved_from_the_compiled_model() -> None:
    model, loss_fn, data, _, _ = _problem("mlp")
    compiled = _compile(model)
    state = {k: v + 0.01 for k, v in compiled.state_dict().items()}  # "_orig_mod." keys
    kw = dict(quantities=["loss", "trace_hessian"], num_probes=3, nqm=False)
    got = cl.analyze(compiled, loss_fn, data, checkpoint=state, **kw)
    shifted = copy.deepcopy(model)
    shifted.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    _same(got.values, cl.analyze(shifted, loss_fn, data, **kw).values)


def test_diagnostics_and_lightning_callback_on_a_compiled_model(monkeypatch: Any) -> None:
    import curvlab.analysis.lightning as lightning

    model, loss_fn, _, X, y = _problem("cnn")
    compiled = _compile(model)
    quantities = ["loss", "grad_norm", "trace_fisher", "noise_scale", "trace_hessian"]
    records = []
    for m in (model, compiled):
        with cl.Diagnostics(m, loss_fn, quantities=quantities, every=1) as diag:
            diag.step(0, X, y)
        records.append((diag.records[0], diag.info))
    (eager, eager_info), (got, info) = records
    _same(got["values"], eager["values"])
    _same(got["per_layer"], eager["per_layer"])
    assert info == {"compiled": COMPILED_NOTE} and eager_info == {}

    # the Lightning callback builds its Diagnostics from the (compiled) network attribute
    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    callback = lightning.diagnostics_callback(
        loss_fn, model_attr="net", quantities=quantities, every=1
    )
    module = nn.Module()
    module.net = compiled
    trainer = type("Trainer", (), {"global_step": 0})()
    callback.on_train_start(trainer, module)
    trainer.global_step = 1  # Lightning counts the optimizer step before the batch ends
    callback.on_train_batch_end(trainer, module, None, (X, y), 0)
    callback.on_train_end(trainer, module)
    _same(callback.diagnostics.records[0]["values"], eager["values"])
    assert callback.diagnostics.info == {"compiled": COMPILED_NOTE}


# -------------------------------------------------------------------------- compiled parts


@pytest.mark.parametrize("how", ["module.compile", "compiled submodule"])
def test_a_model_with_compiled_parts_runs_them_eagerly(how: str) -> None:
    model, loss_fn, data, X, y = _problem("mlp")
    expected = cl.trace(model, loss_fn, data, method="exact")
    top = cl.eigenvalues(model, loss_fn, data, k=2)
    part = copy.deepcopy(model)
    if how == "module.compile":
        part[2].compile(backend="aot_eager")
        names = [n for n, _ in model.named_parameters()]
    else:  # the user's names now hold the wrapper's "_orig_mod"
        part[2] = _compile(part[2])
        names = ["0.weight", "0.bias", "2._orig_mod.weight", "2._orig_mod.bias"]
    part(X).sum().backward()  # compiled once (AOTAutograd: no double backward)
    part.zero_grad(set_to_none=True)
    before = R.snapshot(part)
    got = cl.trace(part, loss_fn, data, method="exact")
    got_top = cl.eigenvalues(part, loss_fn, data, k=2)
    penalty = fisher_penalty(part, loss_fn, X, output=part(X), seed=1)
    torch.autograd.grad(penalty, list(part.parameters()))  # double backward: eager forward
    R.assert_untouched(part, before)
    assert got.value == pytest.approx(expected.value, rel=RTOL)
    torch.testing.assert_close(got_top.values, top.values, rtol=RTOL, atol=ATOL)
    assert got.info["compiled"] == got_top.info["compiled"] == COMPILED_PARTS_NOTE
    assert list(cl.diag_hessian(part, loss_fn, data)) == names


def test_ddp_around_a_compiled_model_and_a_compiled_ddp_model() -> None:
    import torch.distributed as dist

    model, loss_fn, data, _, _ = _problem("mlp")
    expected = cl.diag_fisher(model, loss_fn, data)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = [
            nn.parallel.DistributedDataParallel(_compile(model)),
            _compile(nn.parallel.DistributedDataParallel(model)),
        ]
        for m in wrapped:
            got = cl.diag_fisher(m, loss_fn, data)
            _same(got, expected)
            assert got.info["compiled"] == COMPILED_NOTE
    finally:
        dist.destroy_process_group()


def test_penalties_given_a_compiled_output_differentiate_an_eager_forward() -> None:
    model, loss_fn, _, X, y = _problem("mlp")
    compiled = _compile(model)
    params = list(model.parameters())
    for penalty in (
        lambda m, out: fisher_penalty(m, loss_fn, X, output=out, seed=1),
        lambda m, out: gradient_penalty(m, loss_fn, X, y, output=out),
        lambda m, out: random_label_penalty(m, loss_fn, X, output=out, seed=2),
    ):
        expected = torch.autograd.grad(penalty(model, model(X)), params)
        for m in (compiled, model):  # the output of compiled code, for either model object
            for out in (compiled(X), 1.0 * compiled(X)):  # a compiled node at the top or below
                got = torch.autograd.grad(penalty(m, out), params)
                _same(list(got), list(expected))


# --------------------------------------------------------------------------- training steps


def _train(
    problem: str, compile_model: bool, compile_step: bool, steps: int = 4
) -> tuple[list[Tensor], list[dict], dict, dict, list[int], Any]:
    """NoisyOptimizer (diagonal Fisher noise, captured every 2nd step), a FisherPenalty and
    Diagnostics every 2nd step; returns the parameters, records, infos and graph counts."""
    model, loss_fn, _, X, y = _problem(problem)
    model.train()
    step_model = _compile(model) if compile_model else model
    before = R.snapshot(step_model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    noisy = NoisyOptimizer(
        opt, DiagFisherNoise(scale=0.3), step_model, loss_fn, seed=0, recompute_every=2
    )
    penalty = FisherPenalty(step_model, loss_fn, alpha=0.01, every=2, seed=0)
    use_penalty = X.is_floating_point()  # (a penalty on the GPT is covered above)
    diag = cl.Diagnostics(step_model, loss_fn, quantities=["loss", "trace_fisher"], every=2)

    def closure() -> Tensor:
        noisy.zero_grad()
        out = step_model(X)
        loss = _loss(loss_fn, out, y)
        if use_penalty:
            loss = loss + penalty(X, y, output=out)
        loss.backward()
        return loss

    step = _compile(closure) if compile_step else closure
    graphs = []
    for s in range(steps):
        noisy.step(step)
        diag.step(s, X, y)
        graphs.append(counters["stats"]["unique_graphs"])
    after = R.snapshot(step_model)
    assert after["hooks"] == before["hooks"] and after["modes"] == before["modes"]
    params = [p.detach().clone() for p in model.parameters()]
    return params, diag.records, noisy.info, diag.info, graphs, penalty.info


TRAININGS = [
    ("mlp", True, False),
    ("mlp", False, True),
    ("mlp", True, True),
    ("cnn", True, False),
    ("gpt", True, False),
    ("gpt", False, True),
]


@pytest.mark.parametrize(("problem", "compile_model", "compile_step"), TRAININGS)
def test_noisy_training_with_diagnostics_ends_where_the_eager_run_does(
    problem: str, compile_model: bool, compile_step: bool
) -> None:
    rng = torch.get_rng_state()
    expected, eager_records, *_ = _train(problem, False, False)
    counters.clear()
    got, records, noisy_info, diag_info, graphs, penalty_info = _train(
        problem, compile_model, compile_step
    )
    assert torch.equal(torch.get_rng_state(), rng)
    _same(got, expected, "parameters")
    assert [r["step"] for r in records] == [0, 2]
    for r, e in zip(records, eager_records):
        _same(r["values"], e["values"], f"record {r['step']}")
    # the capture steps (0, 2) run eagerly; steps 1 and 3 run the one compiled graph: no recompile
    assert graphs[1] >= 1 and graphs[-1] == graphs[1], graphs
    expected_info = {"compiled": COMPILED_STEP_NOTE} if compile_model else {}
    assert noisy_info == expected_info
    assert diag_info == ({"compiled": COMPILED_NOTE} if compile_model else {})
    assert penalty_info == ({"compiled": COMPILED_NOTE} if compile_model else {})


@pytest.mark.parametrize("fullgraph", [False, True])
def test_hooks_added_after_compilation_still_see_the_step(fullgraph: bool) -> None:
    # dynamo does not guard on module hooks: a model compiled (and run) before the capture must
    # not silently skip the capture's hooks; the capture step runs eagerly instead
    model, loss_fn, _, X, y = _problem("mlp")
    compiled = _compile(model, fullgraph=fullgraph)
    _loss(loss_fn, compiled(X), y).backward()  # compiled without any hook
    model.zero_grad(set_to_none=True)
    sampler = DiagFisherNoise(scale=0.5)
    expected = sampler.estimate(model, loss_fn, X, y, make_generator(seed=0))
    with sampler.capture(compiled, loss_fn, make_generator(seed=0)) as taps:
        _loss(loss_fn, compiled(X), y).backward()
    assert taps.calls == 1 and taps.model_input is not None
    _same(taps.result(), expected)
    assert _stance() == "default"
