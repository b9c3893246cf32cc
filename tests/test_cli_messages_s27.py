"""Review s27 (CL-1): ``curvlab analyze`` on a checkpoint that ``weights_only=True`` refuses (a
Lightning ``.ckpt`` whose ``hyper_parameters`` hold an ``argparse.Namespace``) offered only
Python-API ways out ("run the call inside ``with torch.serialization.safe_globals(...)``", "load
it yourself ... and pass the state_dict"), which a command line cannot follow. It now names the
command line's: re-save the state_dict, or call ``torch.serialization.add_safe_globals`` in the
``--model`` module, which then loads the file (loss equal to the plain state_dict's, float64
brute force)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab.cli import main

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    def data():
        g = torch.Generator().manual_seed(1)
        X = torch.randn(16, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        return [(X[:8], y[:8]), (X[8:], y[8:])]
    """
)

ALLOWING = textwrap.dedent(
    """
    import argparse
    import torch
    torch.serialization.add_safe_globals([argparse.Namespace])
    """
)


@pytest.fixture(autouse=True)
def _one_thread_and_safe_globals():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    safe = list(torch.serialization.get_safe_globals())
    yield
    torch.set_num_threads(threads)
    torch.serialization.clear_safe_globals()  # the module's add_safe_globals is process-wide
    torch.serialization.add_safe_globals(safe)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _lightning(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    sd = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().state_dict()
    path = tmp_path / "light.ckpt"
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "hyper_parameters": {"args": argparse.Namespace(lr=0.1)},
            "epoch": 3,
        },
        path,
    )
    return path, sd


def _loss(sd: dict[str, torch.Tensor]) -> float:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


def test_the_cli_names_its_own_ways_out_and_the_allowing_module_works(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt, sd = _lightning(tmp_path)
    plain = tmp_path / "cli_s27_plain.py"
    plain.write_text(MODEL)
    rest = ["--data", f"{plain}:data", "--checkpoint", str(ckpt), "--quantities", "loss"]
    rest += ["--no-nqm", "--no-progress"]
    argv = ["analyze", "--model", f"{plain}:make_model", *rest, "--out", str(tmp_path / "o1")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "argparse.Namespace" in err[0], err
    # the command line's ways out, not the Python API's
    assert "torch.serialization.add_safe_globals([argparse.Namespace])" in err[0], err
    assert "--model module" in err[0], err
    assert "re-save the state_dict" in err[0], err
    assert "with torch.serialization.safe_globals" not in err[0], err
    assert "pass the state_dict" not in err[0], err
    assert not (tmp_path / "o1").exists()
    # the way out it names works: the --model module allows the class at import
    allowing = tmp_path / "cli_s27_allowing.py"
    allowing.write_text(ALLOWING + MODEL)
    out = tmp_path / "o2"
    argv = ["analyze", "--model", f"{allowing}:make_model", *rest, "--out", str(out)]
    assert _exit_code(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert _found_loss(report, _loss(sd)), report


def _found_loss(report, want: float) -> bool:
    """Whether a ``loss`` entry of the report equals ``want`` (1e-12)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "loss" and isinstance(v, (int, float)):
                    found.append(float(v))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(report)
    return any(abs(v - want) <= 1e-12 * abs(want) for v in found)


def test_the_python_api_keeps_its_own_ways_out(tmp_path: Path) -> None:
    from curvlab.analysis._checkpoint import CheckpointError, resolve_state_dict

    ckpt, _ = _lightning(tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_state_dict(str(ckpt), "cpu")
    msg = str(info.value)
    assert "with torch.serialization.safe_globals([argparse.Namespace])" in msg
    assert "pass the state_dict" in msg
