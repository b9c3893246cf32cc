"""Review s20: messages and small input checks seen from the command line and the examples.

1. ``analyze``'s loss-shape errors quoted the shapes of its internal probe of 8 examples
   ("outputs (8, 3) ... targets of shape (8,)") for batches of 12: they name the batch's own.
2. ``curvlab nqm --batch-sizes 1,,2`` dropped the empty entry silently; a malformed value
   (``--powers 0.5,x``) was reported only after the clash with an existing ``--out``.
3. ``curvlab analyze --quantities top_eigenvalues,...`` without ``--top-k`` on a model of fewer
   than 5 parameters blamed ``--top-k``, which was never given, without saying that 5 is the
   default.
4. ``examples/wen_fig23_classifier.py --steps 50`` printed the ``k=50`` column twice.
5. ``MSELoss`` given class labels from Python said "use nn.CrossEntropyLoss (--loss
   cross_entropy)", an option Python has not.
"""

from __future__ import annotations

import argparse
import importlib
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

import curvlab as cl
import curvlab.nqm._cli as nqm_cli
from curvlab.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ 1. analyze's shape errors
def _batches(targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    return [(X[:12], targets[:12]), (X[12:], targets[12:])]


@pytest.mark.parametrize(
    ("loss_fn", "targets", "shapes"),
    [
        (nn.MSELoss(), torch.zeros(20, dtype=torch.int64), ["(12, 3)", "(12,)"]),
        (nn.MSELoss(), torch.zeros(20, 2, dtype=torch.float64), ["(12, 3)", "(12, 2)"]),
        (nn.CrossEntropyLoss(), torch.zeros(20, 1, dtype=torch.int64), ["(12, 3)", "(12, 1)"]),
    ],
)
def test_analyze_loss_errors_name_the_shapes_of_the_users_batch(
    loss_fn: nn.Module, targets: torch.Tensor, shapes: list[str]
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    with pytest.raises(ValueError) as analyze_error:
        cl.analyze(model, loss_fn, _batches(targets), quantities=["loss"], nqm=False)
    with pytest.raises(ValueError) as trace_error:  # the same message as every other entry
        cl.trace(model, loss_fn, _batches(targets))
    message = str(analyze_error.value)
    assert all(s in message for s in shapes), message  # was: (8, 3) and (8,)
    assert "(8," not in message, message
    assert message == str(trace_error.value)


def test_analyze_sequence_loss_errors_name_the_shapes_of_the_users_batch() -> None:
    """Logits (B, T, C) in the GPT layout against targets of another length."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    X = torch.randn(12, 5, 4, dtype=torch.float64)
    y = torch.zeros(12, 6, dtype=torch.int64)
    with pytest.raises(ValueError) as error:
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["loss"], nqm=False)
    message = str(error.value)
    assert "(12, 5, 3)" in message and "(12, 6)" in message, message  # was: (8, 5, 3), (8, 6)


def test_analyze_still_measures_the_loss_of_a_batch_larger_than_its_probe() -> None:
    """The check reads the batch's shapes; the measured loss is the plain mean over all batches."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    report = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        [(X[:12], y[:12]), (X[12:], y[12:])],
        quantities=["loss"],
        nqm=False,
        progress=False,
    )
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(model(X), y))
    got = report.entries[0]["values"]["loss"]
    # a mean of 20 terms and a weighted mean of two batch means: a few roundings apart
    assert abs(got - want) <= 64 * torch.finfo(torch.float64).eps * abs(want), (got, want)


# ------------------------------------------------------------------ 2. curvlab nqm's lists
_SMALL = ["--dim", "20", "--bins", "5", "--no-ema", "--target", "0.05"]


def _nqm_args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="curvlab")
    nqm_cli.add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["nqm", "--out", str(out), *_SMALL, *extra])


@pytest.mark.parametrize("text", ["1,,2", "1,2,", ",1", " , "])
def test_nqm_refuses_an_empty_entry(tmp_path: Path, text: str) -> None:
    args = _nqm_args(tmp_path / "o", "--batch-sizes", text, "--powers", "0")
    with (
        mock.patch.object(nqm_cli, "batch_size_sweep") as sweep,
        pytest.raises(ValueError, match="--batch-sizes") as error,
    ):
        nqm_cli.run(args)  # was: swept batch sizes 1 and 2
    assert "empty" in str(error.value), error.value
    assert not sweep.called
    assert not (tmp_path / "o").exists()


def test_nqm_names_a_bad_value_before_the_clash_with_an_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "nqm_sweep.csv").write_text("an earlier run's\n")
    for extra, culprit in (
        (["--powers", "0.5,x"], "--powers"),
        (["--powers", "2"], "--powers"),
        (["--batch-sizes", "1,1"], "--batch-sizes"),
        (["--target", "-1"], "--target"),
        (["--init-var", "0"], "--init-var"),
    ):
        with pytest.raises(ValueError) as error:
            nqm_cli.run(_nqm_args(out, *extra))
        message = str(error.value)
        assert message.startswith(culprit), message  # was: "... already exists; pass --overwrite"
        assert "already exists" not in message, message
    assert (out / "nqm_sweep.csv").read_text() == "an earlier run's\n"


# ------------------------------------------------------------------ 3. the default --top-k
MODEL = textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Linear(2, 2, bias=False).double()  # 4 parameters, fewer than the default k

    def data():
        Path(__file__).with_name("data_factory_ran").write_text("")
        g = torch.Generator().manual_seed(1)
        X = torch.randn(10, 2, generator=g, dtype=torch.float64)
        return X, torch.randint(0, 2, (10,), generator=g)
    """
)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_named_top_eigenvalues_with_the_default_k_says_it_is_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "cli_messages_s20_model.py"
    path.write_text(MODEL)
    argv = ["analyze", "--model", f"{path}:make_model", "--data", f"{path}:data"]
    argv += ["--quantities", "top_eigenvalues,loss", "--no-nqm", "--no-progress"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # was: "k=5 top eigenvalues (--top-k) asked of a model with 4 trainable parameters: pass
    # k <= 4", naming an option that was not given and not the default
    assert "k=5" in err[0] and "the default" in err[0], err
    assert "--top-k K with K <= 4" in err[0] and "4 trainable parameters" in err[0], err
    assert "--quantities" in err[0], err
    assert not (tmp_path / "data_factory_ran").exists()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 4. wen_fig23's columns
@pytest.mark.parametrize(
    ("steps", "want"),
    [(50, [50]), (100, [50, 100]), (200, [50, 100, 200]), (300, [50, 100, 200, 300]), (30, [30])],
)
def test_wen_fig23_prints_each_column_once(
    monkeypatch: pytest.MonkeyPatch, steps: int, want: list[int]
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    wen = importlib.import_module("wen_fig23_classifier")
    assert wen.loss_marks(steps) == want  # was: [50, 50] for --steps 50


# ------------------------------------------------------------------ 5. the Python message
def test_mse_given_class_labels_reads_right_from_python() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError) as error:
        cl.trace(model, nn.MSELoss(), (X, torch.zeros(6, dtype=torch.int64)))
    message = str(error.value)
    assert "use nn.CrossEntropyLoss (on the command line: --loss cross_entropy)" in message, message


def test_analyze_named_top_eigenvalues_with_the_default_k_says_it_is_the_default() -> None:
    # the Python API said "k=5 top eigenvalues (--top-k) asked ..." without saying 5 is the default
    model = nn.Linear(1, 2)
    data = [(torch.randn(4, 1), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"^k=5 \(the default\) top eigenvalues"):
        cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["top_eigenvalues", "loss"])
    with pytest.raises(ValueError, match=r"^k=6 top eigenvalues"):
        cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["top_eigenvalues"], k=6)


@pytest.mark.parametrize("text", ["loss,,trace_hessian", "loss,", ",", " "])
def test_analyze_refuses_an_empty_quantities_entry(text: str, tmp_path: Path, capsys) -> None:
    # "a,,b" silently dropped the empty entry (as --batch-sizes of curvlab nqm did)
    code = main(
        ["analyze", "--model", "tests.zoo:nothing", "--quantities", text]
        + ["--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "has an empty entry" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
