"""Messages that name the culprit and the way out (review s19).

1. ``curvlab analyze`` with a lazy ``--model`` and no ``--checkpoint`` said to "run one forward
   pass ... or load a checkpoint into the model (model.load_state_dict...)", which a command line
   cannot do: it now says to pass ``--checkpoint``.
2. ``--top-k`` above the model's parameters was refused only after the ``--data`` factory ran.
3. ``analyze``'s default quantities on a model of fewer than 5 parameters: ``top_eigenvalues``
   failed with "k must be a positive int in [1, 4] (the operator's size), got 5", naming neither
   ``k=`` nor ``--top-k`` nor the default.
4. ``kfac`` on a layer whose forward was called on no rows only (``b(h[~mask])``, nothing
   selected) said "it never ran: no batch called its forward".
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.cli import main

MODEL = textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Linear(2, 2, bias=False).double()  # 4 parameters

    def make_lazy():
        return nn.Sequential(nn.LazyLinear(2, dtype=torch.float64))

    def data():
        Path(__file__).with_name("data_factory_ran").write_text("")
        g = torch.Generator().manual_seed(1)
        X = torch.randn(10, 2, generator=g, dtype=torch.float64)
        return X, torch.randint(0, 2, (10,), generator=g)
    """
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _project(tmp_path: Path) -> Path:
    path = tmp_path / "messages_s19_model.py"
    path.write_text(MODEL)
    return path


# ------------------------------------------------------------------ 1. lazy --model
def test_a_lazy_model_without_checkpoint_is_told_to_pass_checkpoint(tmp_path, capsys):
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_lazy", "--data", f"{path}:data"]
    argv += ["--quantities", "loss", "--no-nqm", "--no-progress", "--out", str(tmp_path / "o")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("curvlab: error: --model has uninitialized (lazy) parameters"), err
    assert "'0.weight', '0.bias'" in err[0], err
    assert "Pass --checkpoint PATH" in err[0], err
    assert "load_state_dict" not in err[0], err  # what a command line cannot do
    assert not (tmp_path / "data_factory_ran").exists()
    assert not (tmp_path / "o").exists()


def test_a_lazy_model_whose_checkpoint_does_not_fit_names_the_checkpoint(tmp_path, capsys):
    path = _project(tmp_path)
    ck = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2, 2, dtype=torch.float64)}, ck)  # another model's keys
    argv = ["analyze", "--model", f"{path}:make_lazy", "--data", f"{path}:data"]
    argv += ["--checkpoint", str(ck), "--quantities", "loss", "--no-nqm", "--no-progress"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"The first --checkpoint '{ck}' did not load into it" in err[0], err
    assert "load_state_dict" not in err[0], err
    assert not (tmp_path / "data_factory_ran").exists()


# ------------------------------------------------------------------ 2. --top-k
@pytest.mark.parametrize("quantities", [None, "loss,top_eigenvalues"])
def test_top_k_above_the_parameters_is_refused_before_the_data_factory(
    tmp_path, capsys, quantities
):
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_model", "--data", f"{path}:data", "--top-k", "5"]
    argv += [] if quantities is None else ["--quantities", quantities]
    assert _exit_code([*argv, "--no-nqm", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "k=5 top eigenvalues (--top-k)" in err and "4 trainable parameters" in err, err
    assert not (tmp_path / "data_factory_ran").exists()  # was: the factory ran first
    assert not (tmp_path / "o").exists()


def test_top_k_within_the_parameters_is_measured(tmp_path, capsys):
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_model", "--data", f"{path}:data", "--top-k", "4"]
    argv += ["--quantities", "top_eigenvalues", "--no-nqm", "--no-progress"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ 3. analyze's default k
def test_default_k_on_a_tiny_model_names_k_and_top_k():
    torch.manual_seed(0)
    model = nn.Linear(2, 2, bias=False).double()  # 4 parameters, fewer than the default k=5
    X = torch.randn(10, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial failure's warning
        report = cl.analyze(
            model,
            nn.CrossEntropyLoss(),
            (X, y),
            nqm=False,
            progress=False,
            num_probes=2,
            num_steps=4,
            density_probes=1,
        )
    why = report.entries[0]["errors"]["top_eigenvalues"]
    assert "k=5" in why and "k=" in why and "--top-k" in why and "default 5" in why, why
    assert "4 trainable parameters" in why and "k <= 4" in why, why
    assert "the operator's size" not in why, why
    assert "trace_hessian" in report.entries[0]["values"]  # the others are measured


# ------------------------------------------------------------------ 4. kfac, calls on no rows
class _Routed(nn.Module):
    """``a`` on the rows with ``x[:, 0] > 0``, ``b`` on the others (here: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.t, self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.t(x))
        mask = x[:, 0] > 0
        out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        out = out.index_put((mask.nonzero()[:, 0],), self.a(h[mask]))
        return out.index_put(((~mask).nonzero()[:, 0],), self.b(h[~mask]))


def test_kfac_names_a_layer_called_on_no_rows():
    torch.manual_seed(0)
    model = _Routed().double()
    X = torch.randn(4, 3, dtype=torch.float64)
    X[:, 0] = X[:, 0].abs() + 0.1  # every row routed to a: b's forward runs on no rows
    y = torch.tensor([0, 1, 1, 0])
    res = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact", chunk_size=1)
    assert sorted(res) == ["a", "t"]
    why = res.info["left_out"]["b"]
    assert "called on no rows" in why, why
    assert "never ran" not in why, why


def test_kfac_still_says_never_ran_for_a_layer_not_called():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    torch.manual_seed(0)
    model = Unused().double()
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    res = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert res.info["left_out"]["b"].startswith("it never ran: no batch called its forward")
