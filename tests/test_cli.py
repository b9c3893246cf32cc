"""The `curvlab` command: --help, analyze on a user's model, one-line errors, a shortened demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def make_wide_model():
        return nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    """
)


@pytest.fixture
def user_module(tmp_path):
    path = tmp_path / "usermodel.py"
    path.write_text(USER_MODULE)
    torch.manual_seed(0)
    ns: dict = {}
    exec(USER_MODULE, ns)
    ckpts = []
    for i in range(2):
        model = ns["make_model"]()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(i + 1)
        ckpts.append(tmp_path / f"ckpt{i}.pt")
        torch.save({"state_dict": model.state_dict()}, ckpts[-1])
    return path, ckpts


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["demo", "analyze", "nqm"]),
        (["demo"], ["--out", "--quick", "--steps", "--overwrite", "--seed"]),
        (["analyze"], ["--model", "--checkpoint", "--data", "--loss", "--quantities", "--out"]),
        (["nqm"], ["--out"]),
    ],
)
def test_help_is_complete(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in expected:
        assert option in text, option


def test_analyze_a_trajectory_from_the_command_line(user_module, tmp_path, capsys):
    path, ckpts = user_module
    out = tmp_path / "report"
    rc = main(
        [
            "analyze",
            "--model",
            f"{path}:make_model",
            "--checkpoint",
            str(ckpts[0]),
            "--checkpoint",
            str(ckpts[1]),
            "--data",
            f"{path}:data",
            "--quantities",
            "loss,trace_fisher,grad_norm",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    saved = json.loads((out / "report.json").read_text())
    assert [e["label"] for e in saved["entries"]] == ["ckpt0.pt", "ckpt1.pt"]
    assert saved["entries"][0]["values"]["loss"] != saved["entries"][1]["values"]["loss"]
    assert (out / "report.html").exists() and (out / "trajectory.png").exists()
    assert "trace_fisher" in capsys.readouterr().out
    # the model's module provides data() when --data is left out
    rc = main(
        [
            "analyze",
            "--model",
            f"{path}:make_model",
            "--quantities",
            "loss",
            "--out",
            str(tmp_path / "r2"),
            "--no-progress",
        ]
    )
    assert rc == 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_errors_are_one_clear_line_with_exit_code_2(user_module, tmp_path, capsys):
    path, ckpts = user_module
    base = ["analyze", "--data", f"{path}:data", "--quantities", "loss", "--no-progress"]
    out = str(tmp_path / "o")
    assert (
        main([*base, "--model", f"{path}:make_model", "--checkpoint", "missing.pt", "--out", out])
        == 2
    )
    assert "missing.pt' does not exist" in _error_line(capsys)
    assert (
        main(
            [
                *base,
                "--model",
                f"{path}:make_wide_model",
                "--checkpoint",
                str(ckpts[0]),
                "--out",
                out,
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    assert "mis-shaped keys" in line and "0.weight (checkpoint [8, 4] vs model [9, 4])" in line
    assert main([*base, "--model", "no_such_pkg.mod:f", "--out", out]) == 2
    assert "cannot import module 'no_such_pkg.mod'" in _error_line(capsys)
    assert main([*base, "--model", f"{path}:nothing", "--out", out]) == 2
    assert "has no attribute 'nothing'" in _error_line(capsys)
    assert main([*base, "--model", "no-colon", "--out", out]) == 2
    assert "package.module:factory" in _error_line(capsys)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "mine.txt").write_text("mine")  # an empty folder is written into
    assert main([*base, "--model", f"{path}:make_model", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in _error_line(capsys)
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--model", f"{path}:make_model"])
    assert info.value.code == 2
    assert "--out" in _error_line(capsys)
    assert main(["demo", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in _error_line(capsys)


def test_console_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curvlab.cli",
            "analyze",
            "--model",
            "x.y:z",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("curvlab: error:") and "Traceback" not in proc.stderr


def test_shortened_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "report.json").read_text())
    labels = [e["label"] for e in saved["entries"]]
    assert labels == ["SB", "LB", "LB+diag-Fisher"]
    for e in saved["entries"]:
        assert e["values"]["trace_fisher"] > 0 and 0 <= e["values"]["test_accuracy"] <= 1
    assert set(saved["histories"]) == set(labels)
    sb = saved["histories"]["SB"]["series"]
    assert len(sb["loss"]["value"]) == saved["histories"]["SB"]["updates"] > 0
    assert len(sb["trace_fisher"]["value"]) >= 2
    assert (out / "training.png").stat().st_size > 1000
    assert (out / "diagnostics" / "SB" / "metrics.jsonl").exists()
    printed = capsys.readouterr().out
    assert "report.html" in printed
    # the terminal states the regime as the report does: 2 epochs, LB cannot fit the data
    regime = saved["meta"]["demo_regime"]
    assert regime in printed and "not expected to help" in regime
    assert saved["histories"]["LB"]["updates"] == 4  # ceil(2 epochs x 256 / 128): none dropped
    # --overwrite replaces the training logs (they were appended to: two runs in one log)
    log = out / "diagnostics" / "SB" / "metrics.jsonl"
    lines = len(log.read_text().splitlines())
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert len(log.read_text().splitlines()) == lines


def test_analyze_refuses_noise_scale_dp_up_front(tmp_path, capsys) -> None:
    """The command runs in one process: noise_scale_dp (the ranks' gradients) always failed after
    loading; now a usage error, and --help no longer offers it."""
    from curvlab.cli import main

    code = main(
        ["analyze", "--model", "tests.zoo:nothing", "--quantities", "loss,noise_scale_dp"]
        + ["--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "noise_scale_dp needs torch.distributed" in capsys.readouterr().err
