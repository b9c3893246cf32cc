"""cl.analyze and Report: checkpoints, trajectories, clear errors, saved reports, NQM prediction."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from torch import nn

from curvlab.analysis import (
    CheckpointError,
    CheckpointMismatchError,
    Report,
    analyze,
    nqm_prediction,
)

FIRST_ORDER = ["loss", "grad_norm", "trace_empirical_fisher", "noise_scale", "trace_fisher"]


def _model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _data(n: int = 30):
    g = torch.Generator().manual_seed(9)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_analyze_a_saved_checkpoint_matches_the_loaded_model_and_leaves_it_untouched(tmp_path):
    X, y = _data()
    trained = _model(seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    model = _model(seed=0)
    before = _params(model)
    report = analyze(model, nn.CrossEntropyLoss(), (X, y), checkpoint=path, quantities=FIRST_ORDER)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the user's model keeps its parameters
    direct = analyze(trained, nn.CrossEntropyLoss(), (X, y), quantities=FIRST_ORDER)
    for q in FIRST_ORDER:
        assert report[q] == pytest.approx(direct[q], rel=1e-6), q
    assert report["loss"] == pytest.approx(
        float(nn.CrossEntropyLoss()(trained(X), y).detach()), rel=1e-6
    )
    assert report.entries[0]["label"] == "ckpt.pt"


def test_uneven_batches_give_the_quantities_of_all_data_together():
    X, y = _data(30)
    model = _model()
    q = ["loss", "grad_norm", "trace_empirical_fisher", "noise_scale"]
    whole = analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=q)
    parts = analyze(
        model,
        nn.CrossEntropyLoss(),
        [(X[:7], y[:7]), (X[7:20], y[7:20]), (X[20:], y[20:])],
        quantities=q,
    )
    for name in q + ["trace_covariance"]:
        assert parts[name] == pytest.approx(whole[name], rel=1e-5), name
    # per-example gradients by brute force: Tr(empirical F) = mean ||g_n||^2
    grads = []
    for n in range(30):
        model.zero_grad()
        nn.CrossEntropyLoss()(model(X[n : n + 1]), y[n : n + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    G = torch.stack(grads).double()
    assert whole["trace_empirical_fisher"] == pytest.approx(float(G.pow(2).sum(1).mean()), rel=1e-5)
    assert whole["grad_norm"] == pytest.approx(float(G.mean(0).norm()), rel=1e-5)


def test_trajectory_of_checkpoints(tmp_path):
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    states = [_model(seed=s).state_dict() for s in range(3)]
    paths = []
    for i, sd in enumerate(states):
        paths.append(tmp_path / f"step{i}.pt")
        torch.save(sd, paths[-1])
    report = analyze(_model(), loss_fn, (X, y), checkpoint=paths, quantities=["loss", "grad_norm"])
    assert [e["label"] for e in report.entries] == ["step0.pt", "step1.pt", "step2.pt"]
    expected = [float(loss_fn(_model(seed=s)(X), y).detach()) for s in range(3)]
    assert report.trajectory("loss") == pytest.approx(expected, rel=1e-6)
    out = report.save(tmp_path / "report")
    assert (out / "trajectory.png").stat().st_size > 1000
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["entries"]) == 3 and "trajectory.png" in saved["figures"]
    assert Report.from_dict(saved).trajectory("loss") == pytest.approx(expected, rel=1e-6)


def test_wrappers_prefixes_and_map_location(tmp_path):
    X, y = _data()
    trained = _model(seed=4)
    sd = trained.state_dict()
    wrapped = [
        {"model": sd},
        {"model_state_dict": sd, "optimizer": {"state": {}}},
        {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},  # Lightning
        {f"module.{k}": v for k, v in sd.items()},  # DataParallel
    ]
    path = tmp_path / "lightning.ckpt"
    torch.save(wrapped[2], path)
    report = analyze(
        _model(),
        nn.CrossEntropyLoss(),
        (X, y),
        checkpoint=[*wrapped, path],
        quantities=["loss"],
        map_location="cpu",
    )
    expected = float(nn.CrossEntropyLoss()(trained(X), y).detach())
    assert report.trajectory("loss") == pytest.approx([expected] * 5, rel=1e-6)


def test_mismatched_checkpoints_name_the_keys():
    X, y = _data()
    sd = _model().state_dict()
    bad = dict(sd)
    del bad["0.bias"]
    bad["extra.weight"] = torch.zeros(2)
    bad["2.weight"] = torch.zeros(4, 6)
    with pytest.raises(CheckpointMismatchError) as info:
        analyze(_model(), nn.CrossEntropyLoss(), (X, y), checkpoint=bad, quantities=["loss"])
    msg = str(info.value)
    assert "missing keys ['0.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert "'2.weight (checkpoint [4, 6] vs model [3, 6])'" in msg
    assert info.value.mis_shaped == {"2.weight": ((4, 6), (3, 6))}


def test_missing_corrupt_and_unsafe_files_get_clear_errors(tmp_path):
    X, y = _data()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze(model, loss_fn, (X, y), checkpoint=tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a torch.save file"):
        analyze(model, loss_fn, (X, y), checkpoint=corrupt)
    text = tmp_path / "notes.pt"  # torch's weights_only unpickler reports it as unsafe objects
    text.write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError, match="corrupt or not a torch.save file"):
        analyze(model, loss_fn, (X, y), checkpoint=text)
    truncated = tmp_path / "truncated.pt"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        analyze(model, loss_fn, (X, y), checkpoint=truncated)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": model.state_dict(), "obj": pickle.PickleError("x")}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        analyze(model, loss_fn, (X, y), checkpoint=unsafe)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        analyze(model, loss_fn, (X, y), checkpoint={"epoch": 3, "lr": 0.1})
    with pytest.raises(TypeError, match="one-shot iterator"):
        analyze(model, loss_fn, iter([(X, y)]))
    with pytest.raises(ValueError, match="unknown quantities"):
        analyze(model, loss_fn, (X, y), quantities=["trace_hesian"])
    with pytest.raises(ValueError, match="empty list"):
        analyze(model, loss_fn, (X, y), checkpoint=[])
    with pytest.raises(ValueError, match="labels has 1 names for 2"):
        analyze(model, loss_fn, (X, y), checkpoint=[None, None], labels=["a"])


def test_batchnorm_is_measured_in_eval_mode_and_the_mode_restored():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    X, y = _data()
    model.train()
    with torch.no_grad():
        model(X + torch.randn(X.shape, generator=g))  # give the running stats something to hold
    running = model[1].running_mean.clone()
    report = analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["loss", "trace_fisher"])
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, running)
    model.eval()
    assert report["loss"] == pytest.approx(
        float(nn.CrossEntropyLoss()(model(X), y).detach()), rel=1e-6
    )
    assert report["trace_fisher"] > 0


def test_save_never_overwrites_without_permission(tmp_path):
    X, y = _data()
    report = analyze(_model(), nn.CrossEntropyLoss(), (X, y), quantities=FIRST_ORDER)
    out = report.save(tmp_path / "r")
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html", "layers.png"} <= names
    html = (out / "report.html").read_text()
    assert "layers.png" in html and "trace_fisher" in html
    with pytest.raises(FileExistsError, match="overwrite=True"):
        report.save(out)
    report.save(out, overwrite=True)
    assert json.loads((out / "report.json").read_text())["entries"][0]["values"]["loss"] > 0


def test_nqm_prediction_from_a_spectrum():
    # a power-law spectrum: curvature 1/i on 50 nodes of equal weight
    nodes = [1.0 / i for i in range(1, 51)]
    weights = [1 / 50] * 50
    pred = nqm_prediction(nodes, weights, dim=5000)
    curves = pred["curves"]
    assert set(curves) == {"SGD", "preconditioned SGD (P = H^0.5)"}
    crit_sgd = curves["SGD"]["critical_batch_size"]
    crit_pre = curves["preconditioned SGD (P = H^0.5)"]["critical_batch_size"]
    assert math.isfinite(crit_sgd) and math.isfinite(crit_pre)
    assert crit_pre > crit_sgd  # preconditioning extends perfect scaling (Zhang et al.)
    steps = curves["SGD"]["steps"]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # more examples per step never hurt
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        nqm_prediction([-1.0, 0.0], [0.5, 0.5], dim=10)


def test_full_default_analysis_with_estimators_and_nqm(tmp_path):
    X, y = _data(40)
    model = _model()
    report = analyze(model, nn.CrossEntropyLoss(), (X, y), num_probes=10, num_steps=20)
    assert not any(e["errors"] for e in report.entries), report.entries[0]["errors"]
    # brute-force Hessian: trace and top eigenvalues
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.CrossEntropyLoss()(torch.func.functional_call(model, out, (X,)), y)

    H = torch.autograd.functional.hessian(loss_of, theta)
    evals = torch.linalg.eigvalsh(H).flip(0)
    assert report["top_eigenvalues"][0] == pytest.approx(float(evals[0]), rel=1e-3)
    stderr = report["trace_hessian_stderr"]
    assert abs(report["trace_hessian"] - float(H.trace())) <= 5 * stderr + 1e-6
    assert report.nqm is not None and report.nqm["curves"]["SGD"]["critical_batch_size"] > 0
    per_layer = report.per_layer["trace_hessian"]
    assert set(per_layer) == {"0", "2"}
    assert sum(per_layer.values()) == pytest.approx(report["trace_hessian"], rel=1e-6)
    out = report.save(tmp_path / "full")
    for name in ("spectrum.png", "nqm.png", "layers.png"):
        assert (out / name).stat().st_size > 1000, name


def test_sum_reduction_scales_as_documented():
    X, y = _data(30)
    model = _model()
    q = ["loss", "grad_norm", "trace_empirical_fisher", "noise_scale"]
    mean = analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=q)
    total = analyze(model, nn.CrossEntropyLoss(reduction="sum"), (X, y), quantities=q)
    assert total["loss"] == pytest.approx(30 * mean["loss"], rel=1e-6)
    assert total["grad_norm"] == pytest.approx(30 * mean["grad_norm"], rel=1e-5)
    assert total["trace_empirical_fisher"] == pytest.approx(
        30 * mean["trace_empirical_fisher"], rel=1e-5
    )
    assert total["noise_scale"] == pytest.approx(mean["noise_scale"], rel=1e-5)  # mean convention


def test_none_in_a_checkpoint_list_is_the_model_as_given(tmp_path):
    """``checkpoint=[path, None, path, None]``: each ``None`` entry measures the model as it was
    given (it measured the previous checkpoint's state, labelled "model")."""
    torch.manual_seed(0)
    model, other = nn.Linear(4, 3), nn.Linear(4, 3)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    lf = nn.CrossEntropyLoss()
    with torch.no_grad():
        mine, theirs = float(lf(model(X), y)), float(lf(other(X), y))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = analyze(
        model,
        lf,
        (X, y),
        checkpoint=[path, None, path, None],
        quantities=["loss"],
        nqm=False,
        progress=False,
    )
    assert [e["label"] for e in r.entries][1::2] == ["model", "model"]
    assert r.trajectory("loss") == pytest.approx([theirs, mine, theirs, mine], rel=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_an_overwrite_that_fails_leaves_the_earlier_report(tmp_path, monkeypatch):
    """``save(overwrite=True)`` replaces the earlier report only once the new one is complete: a
    figure that fails to render left an emptied folder (the old files were deleted first)."""
    import curvlab.analysis._report as report_mod

    model = _model()
    r = analyze(
        model, nn.CrossEntropyLoss(), _data(), quantities=["loss"], nqm=False, progress=False
    )
    out = r.save(tmp_path / "rep")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(d, path):  # noqa: ANN001, ANN202
        raise RuntimeError("matplotlib exploded")

    name, _, title = report_mod._FIGURES[0]
    monkeypatch.setattr(report_mod, "_FIGURES", [(name, broken, title), *report_mod._FIGURES[1:]])
    with pytest.raises(RuntimeError, match="exploded"):
        r.save(out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_analyze_without_checkpoints_leaves_the_graph_usable():
    """``analyze`` without checkpoints copied the saved state back into every parameter, which
    bumped their version counters: a loss computed before the call could not run backward."""
    model = _model()
    X, y = _data()
    loss = nn.CrossEntropyLoss()(model(X), y)
    analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["loss"], nqm=False, progress=False)
    loss.backward()  # raised "modified by an inplace operation"
    assert all(p.grad is not None for p in model.parameters())


def test_a_rejected_checkpoint_leaves_the_models_version_counters(tmp_path):
    """A mismatching checkpoint is refused before anything is copied, so nothing is restored: a
    graph the user built before the call still runs backward (found in review: the validation's
    restore bumped every version counter)."""
    X, y = _data()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    loss = loss_fn(model(X), y)  # the user's graph saves the weights for backward
    versions = [p._version for p in model.parameters()]
    bad = dict(model.state_dict())
    name = next(iter(bad))
    bad[name] = torch.zeros(*bad[name].shape[:-1], bad[name].shape[-1] + 1)
    with pytest.raises(CheckpointMismatchError):
        analyze(model, loss_fn, (X, y), checkpoint=bad, quantities=["loss"], progress=False)
    assert [p._version for p in model.parameters()] == versions
    loss.backward()


def test_nqm_prediction_does_not_depend_on_the_loss_reduction() -> None:
    """The NQM reads the per-example (mean-convention) Hessian: a "sum" loss's spectrum is M
    times larger, which divided the predicted critical batch size by about M (found in review:
    375 / 582 under "mean", 8.1 / 10.5 under "sum" for N = 64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    crit = {}
    for reduction in ("mean", "sum"):
        report = analyze(
            model,
            nn.CrossEntropyLoss(reduction=reduction),
            (X, y),
            quantities=["spectral_density"],
            num_steps=20,
            density_probes=2,
        )
        curves = report.entries[-1]["nqm"]["curves"]
        crit[reduction] = [c["critical_batch_size"] for c in curves.values()]
    assert crit["sum"] == pytest.approx(crit["mean"], rel=1e-9)
    assert all(c > 100 for c in crit["mean"])


def test_nqm_prediction_at_power_zero_lists_each_batch_size_once() -> None:
    """``precond_power=0`` made the sweep run power 0 twice: every curve listed each batch size
    twice (found in review)."""
    nodes, weights = [0.5, 2.0, 8.0], [0.5, 0.3, 0.2]
    plain = nqm_prediction(nodes, weights, dim=100, batch_sizes=[1, 4, 16], precond_power=0.5)
    zero = nqm_prediction(nodes, weights, dim=100, batch_sizes=[1, 4, 16], precond_power=0.0)
    for curve in zero["curves"].values():
        assert curve["batch_size"] == [1.0, 4.0, 16.0]
        assert curve["steps"] == plain["curves"]["SGD"]["steps"]


def test_a_sum_loss_with_every_target_ignored_keeps_its_density() -> None:
    """The mean-convention scale divided by zero loss terms and took the spectral density down;
    only the NQM prediction, which needs loss terms, fails now (found in review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    y = torch.full((8,), -100)
    with pytest.warns(Warning, match="nqm at"):
        report = analyze(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            (X, y),
            quantities=["spectral_density"],
            num_steps=5,
            density_probes=1,
        )
    entry = report.entries[-1]
    assert "spectral_density" in entry["arrays"]
    assert "spectral_density" not in entry["errors"]
    assert "no loss term" in entry["errors"]["nqm"]
    density = entry["arrays"]["spectral_density"]  # the loss is 0 everywhere: so is H
    assert density["nodes"] == [0.0] * 5
    assert sum(density["weights"]) == pytest.approx(1.0)
