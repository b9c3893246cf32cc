"""Review s18 of ``cl.analyze``, its checkpoints and the report's series figures: each test failed
before its fix.

1. A seed outside torch's range (``2**64``) passed the option check and failed inside the first
   measurement with torch's "Overflow when unpacking long long", after the data was read.
2. ``sharpness.png`` drew its line straight through a checkpoint where the sharpness failed, with
   no note; ``critical_batch_size.png`` left a failed ``B_simple`` point out with no note.
3. A checkpoint file holding a list or a tensor was blamed on the argument ("checkpoint is a list;
   pass a file path ... Wrap it in sorted(...)"), never naming the file.
4. A model with lazy modules was left materialized with fresh random weights by the data check.
5. A batch that fits only the GPT layout after a first batch of ``T == C`` (read in torch's
   layout) failed every quantity at every checkpoint after all the work (an ``AnalysisError`` of
   identical reasons); it is one ``ValueError`` before any measurement.

Expected values are computed here (dense float64 losses with ``torch.nn.functional``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._rng import SEED_RANGE
from curvlab.analysis import _analyze, _plotting
from curvlab.analysis._checkpoint import CheckpointError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (12,), generator=g)


def _brute_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


class _Counted(list):
    """A list of batches that counts its readings."""

    readings = 0

    def __iter__(self):
        self.readings += 1
        return super().__iter__()


_KW: dict[str, Any] = {"quantities": ["loss"], "nqm": False, "progress": False}


# ------------------------------------------------------------------ 1. the seed's range
@pytest.mark.parametrize("seed", [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1])
def test_a_seed_out_of_torchs_range_is_refused_before_the_data_is_read(seed: int) -> None:
    model, X, y = _problem()
    data = _Counted([(X, y)])
    with pytest.raises(ValueError, match=r"^seed must be an int in \[-9223372036854775808, "):
        cl.analyze(
            model, nn.CrossEntropyLoss(), data, checkpoint=model.state_dict(), seed=seed, **_KW
        )
    assert data.readings == 0  # was: read, then "Overflow when unpacking long long"


def test_the_ends_of_the_seed_range_are_taken() -> None:
    model, X, y = _problem()
    for seed in SEED_RANGE:
        report = cl.analyze(model, nn.CrossEntropyLoss(), (X, y), seed=seed, **_KW)
        assert report.values["loss"] == pytest.approx(_brute_loss(model, X, y), rel=1e-12)


# ------------------------------------------------------------------ 2. gaps in the figures
@pytest.fixture
def saved(monkeypatch) -> list[tuple[Any, list[str], list[str]]]:
    """``(figure, left-out items, remarks)`` of every figure the analysis plots save."""
    out: list[tuple[Any, list[str], list[str]]] = []
    original = _plotting._save

    def capture(fig: Any, path: Path, left: Any, tight_box: bool = False) -> Path:
        result = original(fig, path, left, tight_box)
        out.append((fig, list(left.items), list(left.remarks)))
        return result

    monkeypatch.setattr(_plotting, "_save", capture)
    return out


def _entry(label: str, values: dict[str, Any], errors: dict[str, str] | None = None) -> dict:
    return {"label": label, "values": values, "per_layer": {}, "errors": errors or {}}


def _line(ax: Any, linestyle: str) -> tuple[list[float], list[float]]:
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == linestyle]
    xy = line.get_xydata()
    return [float(v) for v in xy[:, 0]], [float(v) for v in xy[:, 1]]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)
    )


def test_the_sharpness_line_breaks_at_a_failed_checkpoint_and_says_so(tmp_path, saved) -> None:
    """s200's sharpness failed: the line was drawn s100 -> s300 without a word."""
    entries = [
        _entry("s100", {"sharpness": 1.0, "sharpness_threshold": 4.0}),
        _entry("s200", {"loss": 0.5}, {"sharpness": "NonFiniteError: ..."}),
        _entry("s300", {"sharpness": 2.0}),  # its threshold missing, the value there
        _entry("s400", {"sharpness": 3.0, "sharpness_threshold": 4.0}),
    ]
    assert _plotting.plot_sharpness({"entries": entries, "meta": {}}, tmp_path / "s.png")
    fig, items, remarks = saved[-1]
    ax = fig.axes[0]
    xs, ys = _line(ax, "-")
    assert xs == [0.0, 1.0, 2.0, 3.0]
    assert _same(ys, [1.0, math.nan, 2.0, 3.0])  # was: x [0, 2, 3], s200 bridged
    tx, ty = _line(ax, "--")
    assert tx == [0.0, 1.0, 2.0, 3.0] and _same(ty, [4.0, math.nan, math.nan, 4.0])
    assert items == []
    assert len(remarks) == 2
    assert "no value at s200 (failed)" in remarks[0] and "broken" in remarks[0]
    assert remarks[1].startswith("threshold of λ_max(H): no value at s300;")
    texts = "\n".join(t.get_text() for t in fig.texts)
    assert all(r in texts for r in remarks)


def test_a_non_finite_sharpness_breaks_the_line_too(tmp_path, saved) -> None:
    entries = [
        _entry(str(s), {"critical_sharpness": v})
        for s, v in [(1000, 4.0), (2000, math.inf), (3000, 6.0)]
    ]
    assert _plotting.plot_sharpness({"entries": entries, "meta": {}}, tmp_path / "s.png")
    fig, items, remarks = saved[-1]
    xs, ys = _line(fig.axes[0], "-")
    assert xs == [0.0, 1.0, 2.0] and _same(ys, [4.0, math.nan, 6.0])
    assert items == ["critical_sharpness of checkpoints at 2000 = inf"] and remarks == []


def test_a_trajectory_without_gaps_has_no_remark(tmp_path, saved) -> None:
    entries = [_entry(f"c{i}", {"sharpness": 1.0 + i}) for i in range(3)]
    assert _plotting.plot_sharpness({"entries": entries, "meta": {}}, tmp_path / "s.png")
    fig, items, remarks = saved[-1]
    assert _line(fig.axes[0], "-") == ([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert items == [] and remarks == []


def test_a_failed_b_simple_is_named_under_the_critical_batch_figure(tmp_path, saved) -> None:
    entries = [
        _entry("c0", {"noise_scale": 10.0, "noise_scale_hessian": 20.0}),
        _entry("c1", {"noise_scale_hessian": 30.0}, {"loss, noise_scale": "ValueError: ..."}),
        _entry("c2", {"noise_scale": 12.0, "noise_scale_hessian": 25.0}),
    ]
    assert _plotting.plot_critical_batch({"entries": entries, "meta": {}}, tmp_path / "c.png")
    fig, items, remarks = saved[-1]
    assert items == []
    assert remarks == ["B_simple: no value at c1 (failed); no point drawn there"]
    assert remarks[0] in [t.get_text() for t in fig.texts]


def test_b_simple_never_measured_is_not_named(tmp_path, saved) -> None:
    entries = [_entry(f"c{i}", {"noise_scale_hessian": 20.0 + i}) for i in range(2)]
    assert _plotting.plot_critical_batch({"entries": entries, "meta": {}}, tmp_path / "c.png")
    _, items, remarks = saved[-1]
    assert items == [] and remarks == []


def test_analyze_report_names_the_failed_sharpness(tmp_path, saved) -> None:
    """End to end: the sharpness fails at the middle checkpoint (a NaN parameter gradient)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).double()
            self.b = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.sqrt(self.b**2)  # d/db at b = 0: 0/0

    torch.manual_seed(0)
    model = M()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    states = []
    for v in (1.0, 0.0, 2.0):
        sd = {k: t.clone() for k, t in model.state_dict().items()}
        sd["b"] = torch.full((3,), v, dtype=torch.float64)
        states.append(sd)
    with pytest.warns(cl.analysis.AnalysisWarning):
        report = cl.analyze(
            model, nn.CrossEntropyLoss(), (X, y), checkpoint=states, labels=["a", "b", "c"],
            quantities=["loss", "sharpness"], nqm=False, progress=False,
        )  # fmt: skip
    assert "sharpness" in report.entries[1]["errors"]
    report.save(tmp_path / "r")
    (fig, _, remarks) = next(s for s in saved if s[0].axes[0].get_ylabel() == "λ_max(H)")
    xs, ys = _line(fig.axes[0], "-")
    assert xs == [0.0, 1.0, 2.0] and math.isnan(ys[1])
    assert any("no value at b (failed)" in r for r in remarks)


# ------------------------------------------------------------------ 3. what a file holds
def test_a_file_holding_a_list_is_named_with_what_it_holds(tmp_path) -> None:
    model, X, y = _problem()
    path = tmp_path / "both.pt"
    torch.save([model.state_dict(), {"lr": 0.1}], path)
    with pytest.raises(CheckpointError) as info:
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), checkpoint=path, **_KW)
    text = str(info.value)
    assert text.startswith(f"checkpoint '{path}' holds a list of 2 items, not a state_dict")
    assert "a list inside one file is not read as a trajectory" in text
    assert "torch.load(path, weights_only=True)[0]" in text
    assert "sorted(" not in text and "pass a file path" not in text  # was: about the argument
    # what it says to pass measures that state_dict
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    sd = torch.load(path, weights_only=True)[0]
    report = cl.analyze(other, nn.CrossEntropyLoss(), (X, y), checkpoint=sd, **_KW)
    assert report.values["loss"] == pytest.approx(_brute_loss(model, X, y), rel=1e-12)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (torch.zeros(3), "holds a single tensor of shape [3], not a state_dict"),
        ((torch.zeros(3), 1), "holds a tuple of 2 items, not a state_dict"),
    ],
    ids=["tensor", "tuple"],
)
def test_a_file_holding_no_dict_is_named(tmp_path, content: Any, says: str) -> None:
    model, X, y = _problem()
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), checkpoint=[path, path], **_KW)
    text = str(info.value)
    assert text.startswith(f"checkpoint '{path}' {says}")
    assert "torch.save(model.state_dict(), path)" in text


# ------------------------------------------------------------------ 4. lazy modules
@pytest.mark.parametrize("lazy", ["LazyLinear", "LazyBatchNorm1d"])
def test_a_lazy_model_is_refused_before_any_forward_pass(tmp_path, lazy: str) -> None:
    torch.manual_seed(0)
    first = (
        nn.LazyLinear(4, dtype=torch.float64)
        if lazy == "LazyLinear"
        else nn.Sequential(nn.Linear(3, 4).double(), nn.LazyBatchNorm1d(dtype=torch.float64))
    )
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(4, 3).double())
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    _, X, y = _problem()
    with pytest.raises(
        ValueError, match=r"^model has uninitialized \(lazy\) parameters or buffers"
    ):
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), **_KW)
    assert calls == []  # was: a forward that materialized random weights, left in the model
    assert any(nn.parameter.is_lazy(t) for t in [*model.parameters(), *model.buffers()])


def test_a_lazy_model_loaded_first_measures_the_checkpoint() -> None:
    """What the message advises: load_state_dict materializes the lazy parameters."""
    reference, X, y = _problem()
    lazy = [nn.LazyLinear(n, dtype=torch.float64) for n in (4, 3)]
    model = nn.Sequential(lazy[0], nn.Tanh(), lazy[1])
    model.load_state_dict(reference.state_dict())
    report = cl.analyze(model, nn.CrossEntropyLoss(), (X, y), **_KW)
    assert report.values["loss"] == pytest.approx(_brute_loss(reference, X, y), rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


# ------------------------------------------------------------------ 5. the layout up front
C = 3


def _sequences(lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(2, t, 2, generator=g, dtype=torch.float64),
            torch.randint(0, C, (2, t), generator=g),
        )
        for t in lengths
    ]


def _gpt_model() -> tuple[nn.Module, list[int]]:
    """Logits (B, T, C) for inputs (B, T, 2), and a list counting its forward passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, C)).double()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return model, calls


def test_a_layout_conflict_is_one_error_before_any_measurement() -> None:
    model, calls = _gpt_model()
    data = _sequences([C, C, C + 1])  # T == C twice (read in torch's layout), then GPT only
    with (
        pytest.warns(UserWarning, match="sequence length equals the number of classes"),
        pytest.raises(
            ValueError, match=r"classes_last\(loss_fn\) as the loss \(batch 2 of data\)$"
        ),
    ):
        cl.analyze(
            model, nn.CrossEntropyLoss(), data, checkpoint=[model.state_dict()] * 2,
            nqm=False, progress=False,
        )  # fmt: skip
    # the first batch's few examples, then one example of the batch of another length; before:
    # an AnalysisError of identical reasons after every quantity ran at both checkpoints
    assert calls == [2, 1]


def test_a_settled_layout_costs_no_extra_forward_pass(monkeypatch) -> None:
    checked: list[int] = []
    original = _analyze._check_layout
    monkeypatch.setattr(_analyze, "_check_layout", lambda *a: checked.append(a[-1]) or original(*a))
    model, _ = _gpt_model()
    data = _sequences([C + 1, C, C + 2])  # GPT only first: every later batch follows it
    report = cl.analyze(model, nn.CrossEntropyLoss(), data, **_KW)
    assert checked == []
    with torch.no_grad():
        total = sum(
            nn.functional.cross_entropy(model(x).flatten(0, 1), t.flatten(), reduction="sum")
            for x, t in data
        )
    want = float(total) / sum(t.numel() for _, t in data)
    assert report.values["loss"] == pytest.approx(want, rel=1e-12)


def test_the_marked_loss_takes_the_same_data() -> None:
    model, _ = _gpt_model()
    data = _sequences([C, C + 1])
    report = cl.analyze(model, cl.classes_last(nn.CrossEntropyLoss()), data, **_KW)
    with torch.no_grad():
        total = sum(
            nn.functional.cross_entropy(model(x).flatten(0, 1), t.flatten(), reduction="sum")
            for x, t in data
        )
    want = float(total) / sum(t.numel() for _, t in data)
    assert report.values["loss"] == pytest.approx(want, rel=1e-12)
