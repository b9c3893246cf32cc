"""Review s18 of ``curvlab analyze``: each test failed before its fix.

1. ``--seed 18446744073709551616`` (out of torch's range) was taken, and failed with torch's
   "Overflow when unpacking long long" after the model was built and the data read.
2. A model with lazy modules was measured with fresh random weights; it is refused, naming
   ``--model``, before the data factory runs.
3. There was no option for the number of top eigenvalues: a model with fewer than 5 parameters
   always failed ``top_eigenvalues`` ("k must be ... got 5"). ``--top-k`` sets it.

Expected eigenvalues are computed here (the dense float64 Hessian by ``torch.func.hessian``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab._rng import SEED_RANGE
from curvlab.cli import build_parser, main

MODEL = textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from torch import nn

    def make_model():
        Path(__file__).with_name("model_factory_ran").write_text("")
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
    """``main(argv)``'s exit code, also where argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _project(tmp_path: Path) -> Path:
    path = tmp_path / "cli_s18_model.py"
    path.write_text(MODEL)
    return path


# ------------------------------------------------------------------ 1. --seed
@pytest.mark.parametrize("seed", [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1])
def test_a_seed_out_of_range_is_refused_before_the_model_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture, seed: int
) -> None:
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_model", "--seed", str(seed)]
    assert _exit_code([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --seed: must be an integer in [" in err[0], err
    assert "Overflow" not in err[0]
    assert not (tmp_path / "model_factory_ran").exists()
    assert not (tmp_path / "data_factory_ran").exists()
    assert not (tmp_path / "o").exists()


def test_the_ends_of_the_seed_range_parse() -> None:
    from curvlab._cli_parser import seed_int

    for seed in SEED_RANGE:
        assert seed_int(str(seed)) == seed
        args = build_parser().parse_args(
            ["analyze", "--model", "m:f", "--out", "o", "--seed", str(seed)]
        )
        assert args.seed == seed


# ------------------------------------------------------------------ 2. lazy modules
def test_a_lazy_model_is_refused_before_the_data_factory_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_lazy", "--data", f"{path}:data"]
    argv += ["--quantities", "loss", "--no-nqm", "--no-progress", "--out", str(tmp_path / "o")]
    assert _exit_code(argv) == 2  # was: 0, the loss of random weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("curvlab: error: --model has uninitialized (lazy) parameters")
    assert not (tmp_path / "data_factory_ran").exists()
    assert not (tmp_path / "o").exists()


def test_a_lazy_model_with_a_checkpoint_is_measured_at_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Review of s18's fix: the refusal's advice ("load a checkpoint into the model") cannot be
    followed on a command line, where --checkpoint already gives the weights; the command loads
    the first into its own model, which materializes it, and measures each checkpoint."""
    path = _project(tmp_path)
    W = torch.tensor([[0.3, -1.2], [0.7, 0.4]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64)
    torch.save({"0.weight": W, "0.bias": b}, tmp_path / "ck.pt")
    out = tmp_path / "o"
    argv = ["analyze", "--model", f"{path}:make_lazy", "--data", f"{path}:data"]
    argv += ["--checkpoint", str(tmp_path / "ck.pt"), "--quantities", "loss", "--no-nqm"]
    assert _exit_code([*argv, "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    g = torch.Generator().manual_seed(1)  # the data factory's batch, built here again
    X = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    want = float(nn.functional.cross_entropy(X @ W.T + b, y))
    (entry,) = json.loads((out / "report.json").read_text())["entries"]
    assert entry["errors"] == {}
    assert abs(entry["values"]["loss"] - want) <= 1e-14 * abs(want)


def test_top_k_above_the_parameters_is_refused_before_any_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Review of s18's fix: --top-k 100 on a 4-parameter model failed top_eigenvalues at every
    checkpoint after the other quantities' work."""
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_model", "--data", f"{path}:data", "--top-k", "100"]
    argv += ["--quantities", "loss,top_eigenvalues", "--no-nqm", "--no-progress"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "k=100 top eigenvalues (--top-k)" in err and "4 trainable parameters" in err, err
    # the default quantities with --top-k given: refused up front too (review of the fixes)
    argv = ["analyze", "--model", f"{path}:make_model", "--data", f"{path}:data", "--top-k", "100"]
    argv += ["--no-nqm", "--no-progress"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "k=100 top eigenvalues (--top-k)" in err and "4 trainable parameters" in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 3. --top-k
def _hessian_eigenvalues(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of the dense Hessian of the mean cross-entropy in W, descending."""

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(X @ w.reshape(2, 2).T, y)

    H = torch.func.hessian(loss)(W.reshape(-1))
    return torch.linalg.eigvalsh(H).flip(0)


def test_top_k_sets_the_number_of_top_eigenvalues(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _project(tmp_path)
    out = tmp_path / "o"
    argv = ["analyze", "--model", f"{path}:make_model", "--quantities", "top_eigenvalues"]
    argv += ["--top-k", "3", "--no-nqm", "--no-progress", "--out", str(out)]
    assert _exit_code(argv) == 0, capsys.readouterr().err  # was: unrecognized arguments
    capsys.readouterr()
    saved = json.loads((out / "report.json").read_text())
    got = saved["entries"][0]["values"]["top_eigenvalues"]
    ns: dict = {"__file__": str(tmp_path / "scratch.py")}
    exec(MODEL, ns)
    X, y = ns["data"]()
    want = _hessian_eigenvalues(X, y, ns["make_model"]().weight.detach())[:3]
    # 4 parameters: Lanczos spans the whole space in 4 steps and is exact up to rounding of
    # O(eps * |H|) (eps = 2.2e-16); 1e-9 of the largest eigenvalue is far above that
    assert got == pytest.approx(want.tolist(), abs=1e-9 * float(want[0]))


def test_top_k_is_a_positive_integer_named_in_the_help(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _project(tmp_path)
    argv = ["analyze", "--model", f"{path}:make_model", "--top-k", "0"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "argument --top-k: must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "model_factory_ran").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    assert "--top-k" in capsys.readouterr().out
