"""Review s8 of the command line, the demo and checkpoint loading: each test failed before its fix.

* ``curvlab demo --overwrite`` removes only the demo's own training logs, never the user's files;
* checkpoints torch's strict loading accepts load (a tied weight stored once, as HuggingFace's
  ``save_pretrained`` writes it; batch norm without ``num_batches_tracked``), with the values
  brute force gets;
* ``curvlab nqm`` refuses repeated batch sizes or powers before the sweep;
* the model's module is executed once, and a ``data()`` that raises shows its own error;
* ``--model file.py:factory`` imports a file with a dataclass under postponed annotations;
* a bad ``--out`` is refused before anything is built or measured;
* checkpoints that share a file name get labels that tell them apart.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis._checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_labels,
    load_into,
)
from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- F1: demo --overwrite
def test_demo_overwrite_removes_only_its_own_logs(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    diag = out / "diagnostics"
    user_log = diag / "my_experiment" / "metrics.jsonl"  # the user's own experiment
    user_note = diag / "SB" / "notes.txt"  # a user's file inside a demo run folder
    earlier = diag / "SB" / "metrics.jsonl"  # an earlier demo's log: replaced, not appended to
    earlier_seed = diag / "seed1" / "LB" / "metrics.jsonl"  # an earlier --seeds 2 run's log
    for path, text in [
        (user_log, "user's own log\n"),
        (user_note, "keep\n"),
        (earlier, '{"earlier": true}\n'),
        (earlier_seed, '{"earlier": true}\n'),
        (out / "notes.txt", "keep\n"),
    ]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (diag / ".curvlab-demo").write_text("")  # the marker an earlier demo leaves (review s18)
    assert main(["demo", "--quick", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert user_log.read_text() == "user's own log\n"
    assert user_note.read_text() == "keep\n"
    assert (out / "notes.txt").read_text() == "keep\n"
    log = earlier.read_text()
    assert '"earlier"' not in log and len(log.splitlines()) >= 2  # this run's measurements only
    assert not (diag / "seed1").exists()  # the earlier seed's log folder held nothing else
    assert (diag / "LB" / "metrics.jsonl").is_file()


# ---------------------------------------------------------------- F2: checkpoints
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


def test_a_tied_weight_stored_once_loads_from_either_name() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    for name in ("emb.weight", "head.weight"):
        model = _Tied()
        load_into(model, {name: w})
        assert torch.equal(model.emb.weight, w) and model.head.weight is model.emb.weight
    model = _Tied()
    load_into(model, {"emb.weight": w, "head.weight": w.clone()})  # both, equal: torch's format
    assert torch.equal(model.emb.weight, w)


def test_different_values_under_tied_names_are_refused_not_one_silently_kept() -> None:
    w = torch.randn(5, 3)
    with pytest.raises(CheckpointError, match=r"'emb.weight' and 'head.weight'.*ties"):
        load_into(_Tied(), {"emb.weight": w, "head.weight": w + 1})


def test_genuinely_missing_and_unexpected_keys_are_still_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sd = dict(model.state_dict())
    weight = sd.pop("0.weight")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['0.weight'\]"):
        load_into(model, sd)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['extra.weight'\]"):
        load_into(model, {**sd, "0.weight": weight, "extra.weight": weight})


def test_batch_norm_without_num_batches_tracked_loads_as_torch_loads_it() -> None:
    g = torch.Generator().manual_seed(0)
    torch_model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    trained = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for _ in range(3):  # non-trivial running statistics
            trained(torch.randn(16, 3, generator=g))
    sd = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    X, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    torch_model.load_state_dict(sd, strict=True)  # torch accepts it (pre-0.4.1 format)
    torch_model.eval()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(torch_model(X), y))
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    report = cl.analyze(
        fresh, nn.CrossEntropyLoss(), (X, y), checkpoint=sd, quantities=["loss"], nqm=False
    )
    assert report["loss"] == pytest.approx(expected, rel=1e-6)


GPT_MODULE = textwrap.dedent(
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    def model():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return GPT2LMHeadModel(GPT2Config(
                n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=6,
                bos_token_id=0, eos_token_id=0,
            ))

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g)
    """
)


def test_huggingface_save_pretrained_checkpoints_load_with_brute_force_losses(
    tmp_path, capsys, monkeypatch
) -> None:
    """save_pretrained leaves out the tied lm_head.weight; curvlab refused the checkpoint and
    advised another architecture. Both checkpoints share the file name model.safetensors."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    path = tmp_path / "gptmodel.py"
    path.write_text(GPT_MODULE)
    ns: dict = {}
    exec(GPT_MODULE, ns)
    g = torch.Generator().manual_seed(1)
    folders = []
    for step in (5, 10):
        model = ns["model"]()
        assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        folders.append(tmp_path / "run" / f"checkpoint-{step}")
        model.save_pretrained(folders[-1])
    files = [f / "model.safetensors" for f in folders]
    assert "lm_head.weight" not in load_file(files[0])  # the case under test
    out = tmp_path / "report"
    argv = ["analyze", "--model", f"{path}:model", "--out", str(out), "--quantities", "loss"]
    argv += ["--no-nqm", "--no-progress"]
    for f in files:
        argv += ["--checkpoint", str(f)]
    assert main(argv) == 0, capsys.readouterr().err
    entries = json.loads((out / "report.json").read_text())["entries"]
    assert [e["label"] for e in entries] == [
        "checkpoint-5/model.safetensors",
        "checkpoint-10/model.safetensors",
    ]
    X, y = ns["data"]()
    for entry, folder in zip(entries, folders):
        reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = reference(X).logits
        expected = float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
        assert entry["values"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert entries[0]["values"]["loss"] != pytest.approx(entries[1]["values"]["loss"])


# ---------------------------------------------------------------- F3: nqm repeats
def _nqm_args(out: Path, *extra: str) -> argparse.Namespace:
    from curvlab.nqm._cli import add_subparser

    parser = argparse.ArgumentParser(prog="curvlab")
    add_subparser(parser.add_subparsers(dest="command"))
    small = ["--dim", "100", "--bins", "10", "--no-ema", "--target", "0.1"]
    return parser.parse_args(["nqm", "--out", str(out), *small, *extra])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--batch-sizes", "4,4,8", "--powers", "0"], "--batch-sizes repeats 4"),
        (["--batch-sizes", "4,8", "--powers", "0,0.5,0.50"], "--powers repeats 0.5"),
    ],
)
def test_nqm_refuses_repeats_before_the_sweep_and_writes_nothing(
    tmp_path, monkeypatch, extra, match
) -> None:
    import curvlab.nqm._cli as nqm_cli

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(nqm_cli, "batch_size_sweep", no_sweep)
    with pytest.raises(ValueError, match=match):
        nqm_cli.run(_nqm_args(tmp_path / "o", *extra))
    assert not (tmp_path / "o").exists()


def test_batch_size_sweep_refuses_repeats_before_any_curve(monkeypatch) -> None:
    import curvlab.nqm._sweep as sweep

    @functools.wraps(sweep.optimal)  # the grid checks read its signature
    def no_curve(*args, **kwargs):
        raise AssertionError("a curve was computed")

    monkeypatch.setattr(sweep, "optimal", no_curve)
    nqm = cl.nqm.NQM.paper(d=50, bins=5)
    with pytest.raises(ValueError, match="batch_sizes repeats"):
        sweep.batch_size_sweep(nqm, [4, 8, 4.0])
    with pytest.raises(ValueError, match="precond_powers repeats"):
        sweep.batch_size_sweep(nqm, [4, 8], precond_powers=(0.0, 0.0))
    with pytest.raises(ValueError, match="optimizers repeat"):
        sweep.batch_size_sweep(nqm, [4, 8], optimizers=("sgd", "sgd"))


def test_nqm_refuses_an_out_below_a_file_before_the_sweep(tmp_path, monkeypatch) -> None:
    import curvlab.nqm._cli as nqm_cli

    monkeypatch.setattr(nqm_cli, "batch_size_sweep", None)  # calling it would fail
    (tmp_path / "afile").write_text("user data")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        nqm_cli.run(_nqm_args(tmp_path / "afile" / "o", "--batch-sizes", "4,8"))
    assert (tmp_path / "afile").read_text() == "user data"


# ---------------------------------------------------------------- F4, F5: the user's module
COUNTING_MODULE = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    from torch import nn

    with open(Path(__file__).with_suffix(".count"), "a") as f:
        f.write("executed\\n")

    def model():
        return nn.Linear(4, 5)

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(10, 4, generator=g), torch.randint(0, 5, (10,), generator=g)

    def broken_data():
        raise FileNotFoundError("labels.pt is not where data() looks")
    """
)

DATACLASS_MODULE = "from __future__ import annotations\n" + COUNTING_MODULE.replace(
    "def model():\n    return nn.Linear(4, 5)",
    "from dataclasses import dataclass\n\n@dataclass\nclass Config:\n    width: int = 5\n\n"
    "def model():\n    return nn.Linear(4, Config().width)",
)


@pytest.fixture
def counting_module(tmp_path):
    path = tmp_path / "countmodel.py"
    path.write_text(COUNTING_MODULE)
    return path


def _analyze_loss(module: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", f"{module}:model", "--out", str(out), "--quantities", "loss"] + [
        "--no-progress",
        *extra,
    ]


def test_the_models_module_is_executed_once_per_command(counting_module, tmp_path, capsys) -> None:
    count = counting_module.with_suffix(".count")
    for n, extra in enumerate([[], ["--data", f"{counting_module}:data"]]):
        assert main(_analyze_loss(counting_module, tmp_path / f"o{n}", *extra)) == 0
        assert count.read_text().splitlines() == ["executed"] * (n + 1)
    capsys.readouterr()


def test_a_file_with_a_dataclass_imports_and_leaves_no_module_behind(tmp_path, capsys) -> None:
    path = tmp_path / "dcmodel.py"
    path.write_text(DATACLASS_MODULE)
    assert "@dataclass" in DATACLASS_MODULE
    assert main(_analyze_loss(path, tmp_path / "o")) == 0, capsys.readouterr().err
    assert "loss" in capsys.readouterr().out
    assert "dcmodel" not in sys.modules


def test_a_data_factory_that_raises_shows_its_own_error(counting_module, tmp_path, capsys) -> None:
    text = counting_module.read_text().replace("def data():", "def unused_data():")
    text = text.replace("def broken_data():", "def data():")
    counting_module.write_text(text)
    argv = ["analyze", "--model", f"{counting_module}:model", "--out", str(tmp_path / "o")]
    assert main([*argv, "--quantities", "loss", "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "data() of the --model module" in line
    assert "FileNotFoundError: labels.pt is not where data() looks" in line
    assert "no data" not in line
    assert counting_module.with_suffix(".count").read_text().count("executed") == 1
    assert not (tmp_path / "o").exists()


def test_a_module_that_fails_to_import_is_not_left_in_sys_modules(tmp_path, capsys) -> None:
    path = tmp_path / "failingmodel.py"
    path.write_text("raise RuntimeError('broken on import')\n")
    argv = ["analyze", "--model", f"{path}:model", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "RuntimeError: broken on import" in _error_line(capsys)
    assert "failingmodel" not in sys.modules


# ---------------------------------------------------------------- F6: --out up front
def test_a_bad_out_is_refused_before_the_model_is_built(
    counting_module, tmp_path, capsys, monkeypatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("user data")
    base = ["analyze", "--model", f"{counting_module}:model", "--quantities", "loss"]
    assert main([*base, "--out", str(afile), "--overwrite"]) == 2
    assert "exists and is not a folder" in _error_line(capsys)
    assert main([*base, "--out", str(afile / "sub")]) == 2
    assert "is a file, not a folder" in _error_line(capsys)

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", unwritable)
    assert main([*base, "--out", str(tmp_path / "new")]) == 2
    line = _error_line(capsys)
    assert "cannot be written" in line and "Permission denied" in line
    assert not counting_module.with_suffix(".count").exists()  # the model was never imported
    assert afile.read_text() == "user data"


def test_demo_refuses_a_file_as_out_before_training(tmp_path, capsys, monkeypatch) -> None:
    import curvlab.demo._train as train

    def no_training(*args, **kwargs):
        raise AssertionError("training ran")

    monkeypatch.setattr(train, "_train_all", no_training)
    afile = tmp_path / "afile"
    afile.write_text("user data")
    assert main(["demo", "--quick", "--out", str(afile), "--overwrite", "--no-progress"]) == 2
    assert "exists and is not a folder" in _error_line(capsys)
    assert afile.read_text() == "user data"
    with pytest.raises(NotADirectoryError):
        train.run_demo(afile, train.DemoConfig.quick(), overwrite=True, progress=False)


# ---------------------------------------------------------------- F7: labels
def test_labels_keep_checkpoints_with_one_file_name_apart() -> None:
    assert checkpoint_labels(["a/ckpt0.pt", "b/ckpt1.pt"]) == ["ckpt0.pt", "ckpt1.pt"]
    assert checkpoint_labels(["runA/last.pt", "runB/last.pt", "runB/best.pt", None]) == [
        "runA/last.pt",
        "runB/last.pt",
        "best.pt",
        "model",
    ]
    assert checkpoint_labels(["x/runA/last.pt", "y/runA/last.pt"]) == [
        "x/runA/last.pt",
        "y/runA/last.pt",
    ]
    assert checkpoint_labels(["last.pt", "old/last.pt"]) == ["last.pt", "old/last.pt"]
    assert checkpoint_labels([Path("r/a.pt"), Path("r/a.pt")]) == ["a.pt", "a.pt"]  # one file
    assert checkpoint_labels([{"w": torch.zeros(1)}, {"w": torch.ones(1)}]) == [
        "checkpoint 0",
        "checkpoint 1",
    ]


def test_cli_report_labels_same_named_checkpoints_apart(tmp_path, capsys) -> None:
    path = tmp_path / "labelmodel.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "def model():\n    return nn.Linear(4, 3)\n"
        "def data():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)\n"
    )
    g = torch.Generator().manual_seed(2)
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        sd = {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
        torch.save(sd, tmp_path / run / "last.pt")
    out = tmp_path / "o"
    argv = ["analyze", "--model", f"{path}:model", "--out", str(out), "--quantities", "loss"]
    argv += ["--no-nqm", "--no-progress"]
    argv += ["--checkpoint", str(tmp_path / "runA" / "last.pt")]
    argv += ["--checkpoint", str(tmp_path / "runB" / "last.pt")]
    assert main(argv) == 0
    assert "runA/last.pt" in capsys.readouterr().out
    labels = [e["label"] for e in json.loads((out / "report.json").read_text())["entries"]]
    assert labels == ["runA/last.pt", "runB/last.pt"]


# ---------------------------------------------------------------- minor
def test_unknown_quantities_list_only_what_the_command_measures(
    counting_module, tmp_path, capsys
) -> None:
    argv = ["analyze", "--model", f"{counting_module}:model", "--out", str(tmp_path / "o")]
    argv += ["--quantities"]
    assert main([*argv, "loss,bogus"]) == 2
    line = _error_line(capsys)
    assert "unknown ['bogus']" in line and "trace_hessian" in line
    for refused in ("noise_scale_dp", "preconditioned_sharpness", "critical_sharpness"):
        assert refused not in line
    assert not (tmp_path / "o").exists()
    count = counting_module.with_suffix(".count")
    count.unlink()
    assert main([*argv, "critical_sharpness"]) == 2
    assert "optimizer" in _error_line(capsys)
    assert not count.exists()  # refused before the model's module was imported


def test_hf_trainer_example_has_help(tmp_path) -> None:
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "NoisyOptimizer" in proc.stdout
