"""Review s15 of the command line (``curvlab analyze``, ``nqm``, ``demo``): each test failed before
its fix.

* ``--model file.py:model`` naming an ``nn.Module`` object uses it (it was called, as a factory);
* ``--model path/to/file.py`` imports the modules beside it, under ``curvlab`` and
  ``python -m curvlab`` alike, and from another working directory; nothing stays on
  ``sys.path`` or in ``sys.modules`` after the command;
* a misspelt ``--quantities`` is refused before any factory runs;
* a class index out of range is one input error before any measurement (``analyze`` and the
  command), counted over every batch; ``ignore_index`` (-100, 255, a class index) is accepted;
* ``nqm`` and ``demo`` errors name the option typed;
* a ``save_pretrained`` folder as ``--checkpoint`` is refused naming the file inside it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvlab as cl
from curvlab.analysis._checkpoint import folder_checkpoint_message
from curvlab.cli import _is_factory, main

ROOT = Path(__file__).resolve().parents[1]

MODEL_OBJECT = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    batch = (X, y)
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    """
)


def _curvlab(
    *args: str, cwd: Path, script: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m curvlab ARGS`` (or the ``curvlab`` console script) run in ``cwd``."""
    exe = Path(sys.executable).parent / "curvlab"
    cmd = [str(exe)] if script else [sys.executable, "-m", "curvlab"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("CURVLAB_DEBUG", None)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=full_env
    )


def _errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln]
    assert all("Traceback" not in ln for ln in proc.stderr.splitlines()), proc.stderr
    return lines


def _brute_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **kw: int) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y, **kw))


# ------------------------------------------------------------------ F1: the object itself
def test_a_module_object_is_used_as_it_is(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    (tmp_path / "objmod.py").write_text(MODEL_OBJECT)
    out = tmp_path / "o"
    proc = _curvlab(
        "analyze", "--model", "objmod.py:model", "--data", "objmod.py:batches", "--out",
        str(out), "--quantities", "loss", "--no-nqm", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # was: calling the factory failed: TypeError
    ns: dict = {}
    exec(MODEL_OBJECT, ns)
    saved = json.loads((out / "report.json").read_text())
    want = _brute_loss(ns["model"], ns["X"], ns["y"])
    assert saved["entries"][0]["values"]["loss"] == pytest.approx(want, rel=1e-12)


class _CallableDataset(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return i

    def __call__(self) -> None:  # pragma: no cover - never called
        raise AssertionError("data was called")


def test_only_factories_are_called() -> None:
    def make() -> nn.Module:
        return nn.Linear(2, 2)

    data = TensorDataset(torch.zeros(2, 1), torch.zeros(2))
    for factory in (make, nn.Linear, functools.partial(nn.Linear, 2, 2), _CallableDataset):
        assert _is_factory(factory)
    for obj in (nn.Linear(2, 2), DataLoader(data), _CallableDataset(), (1, 2), [1], torch.ones(1)):
        assert not _is_factory(obj)


# ------------------------------------------------------------------ F2: modules beside the file
SIBLING = "from helper import make_model, data  # helper.py lies beside this file\n"
HELPER = textwrap.dedent(
    """
    import torch
    from torch import nn

    WIDTH = {width}

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3)).double()

    def data():
        g = torch.Generator().manual_seed(1)
        X = torch.randn(12, 4, generator=g, dtype=torch.float64)
        return X, torch.randint(0, 3, (12,), generator=g)
    """
)


def _project(folder: Path, width: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "helper.py").write_text(HELPER.format(width=width))
    (folder / "entry.py").write_text(SIBLING)
    return folder / "entry.py"


@pytest.mark.parametrize("script", [False, True], ids=["python -m curvlab", "curvlab"])
def test_a_file_imports_the_modules_beside_it(tmp_path: Path, script: bool) -> None:
    if script and not (Path(sys.executable).parent / "curvlab").exists():
        pytest.skip("no curvlab console script beside this Python")
    entry = _project(tmp_path / "proj", 5)
    elsewhere = tmp_path / "elsewhere"  # neither the file's folder nor on sys.path
    elsewhere.mkdir()
    out = tmp_path / "o"
    proc = _curvlab(
        "analyze", "--model", f"{entry}:make_model", "--out", str(out), "--quantities", "loss",
        "--no-nqm", "--no-progress", cwd=elsewhere, script=script,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # was: No module named 'helper'
    ns: dict = {}
    exec(HELPER.format(width=5), ns)
    X, y = ns["data"]()
    saved = json.loads((out / "report.json").read_text())
    assert saved["entries"][0]["values"]["loss"] == pytest.approx(
        _brute_loss(ns["make_model"](), X, y), rel=1e-12
    )


def test_the_files_folder_leaves_no_trace(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two commands in one process, each with its own ``helper.py``: each measures its own model,
    and neither leaves its folder on ``sys.path`` or its modules in ``sys.modules``."""
    torch.set_num_threads(1)
    path_before, modules_before = list(sys.path), set(sys.modules)
    losses = []
    for i, width in enumerate((5, 7)):
        entry = _project(tmp_path / f"p{i}", width)
        out = tmp_path / f"o{i}"
        argv = ["analyze", "--model", f"{entry}:make_model", "--out", str(out)]
        assert main([*argv, "--quantities", "loss", "--no-nqm", "--no-progress"]) == 0
        assert sys.path == path_before
        assert "helper" not in sys.modules and "entry" not in sys.modules
        losses.append(json.loads((out / "report.json").read_text())["entries"][0])
    capsys.readouterr()
    left = [
        name
        for name in set(sys.modules) - modules_before
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path))
    ]
    assert not left  # the user's modules (matplotlib, PIL, curvlab's own may load, and stay)
    for entry, width in zip(losses, (5, 7)):
        ns: dict = {}
        exec(HELPER.format(width=width), ns)
        X, y = ns["data"]()
        want = _brute_loss(ns["make_model"](), X, y)
        assert entry["values"]["loss"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("on_path", [False, True], ids=["cwd not on sys.path", "cwd on sys.path"])
def test_a_package_of_the_working_directory_is_removed_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, on_path: bool
) -> None:
    """``--model pkg.mod:make_model`` from the package's folder, twice, the package edited in
    between: the second command measures the edited model, and afterwards the user's own
    ``import pkg.mod`` works (the package was removed and its submodule kept, found in review)."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    if on_path:  # as under python -c, an interactive shell or Jupyter: the working directory
        # already on sys.path kept the modules (found in review: the stale model measured)
        monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pkgz").mkdir()
    (tmp_path / "pkgz" / "__init__.py").write_text("")
    losses = []
    for i, width in enumerate((3, 5)):
        (tmp_path / "pkgz" / "mod.py").write_text(HELPER.format(width=width))
        out = tmp_path / f"o{i}"
        argv = ["analyze", "--model", "pkgz.mod:make_model", "--out", str(out)]
        assert main([*argv, "--quantities", "loss", "--no-nqm", "--no-progress"]) == 0
        assert not [m for m in sys.modules if m.partition(".")[0] == "pkgz"]
        losses.append(json.loads((out / "report.json").read_text())["entries"][0])
    capsys.readouterr()
    for entry, width in zip(losses, (3, 5)):
        ns: dict = {}
        exec(HELPER.format(width=width), ns)
        X, y = ns["data"]()
        want = _brute_loss(ns["make_model"](), X, y)
        assert entry["values"]["loss"] == pytest.approx(want, rel=1e-12)
    if not on_path:
        monkeypatch.syspath_prepend(str(tmp_path))
    import pkgz.mod  # the user's own import afterwards

    assert pkgz.mod.WIDTH == 5
    for name in [m for m in sys.modules if m.partition(".")[0] == "pkgz"]:
        del sys.modules[name]


# ------------------------------------------------------------------ F3: --quantities first
def test_a_misspelt_quantity_is_refused_before_any_factory_runs(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            import torch
            from torch import nn

            def make_model():
                Path("model_factory_ran").write_text("")
                return nn.Linear(4, 3)

            def data():
                Path("data_factory_ran").write_text("")
                return torch.randn(6, 4), torch.randint(0, 3, (6,))
            """
        )
    )
    proc = _curvlab(
        "analyze", "--model", "slow.py:make_model", "--quantities", "loss,trace_hesian", "--out",
        str(tmp_path / "o"), "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = _errors(proc)
    assert "--quantities: unknown ['trace_hesian']" in line
    assert not (tmp_path / "model_factory_ran").exists()
    assert not (tmp_path / "data_factory_ran").exists()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ F4: class indices up front
def _net(vocab: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if vocab:  # logits (B, T, C) against targets (B, T): the GPT layout
        return nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).double()
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(vocab: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        if vocab:
            X = torch.randint(0, 5, (4, 6), generator=g)
            y = torch.randint(0, 3, (4, 6), generator=g)
        else:
            X = torch.randn(8, 4, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=g)
        out.append((X, y))
    return out


@pytest.mark.parametrize("vocab", [False, True], ids=["(N, C)", "(B, T, C)"])
def test_a_class_index_out_of_range_is_refused_before_any_measurement(vocab: bool) -> None:
    torch.set_num_threads(1)
    model, data = _net(vocab), _batches(vocab)
    data[2][1].view(-1)[3] = 3  # C = 3: out of range, in the last batch
    data[1][1].view(-1)[0] = -5
    data[2][1].view(-1)[1] = -100  # the default ignore_index: not counted
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    sd = model.state_dict()
    lf = cl.classes_last(nn.CrossEntropyLoss()) if vocab else nn.CrossEntropyLoss()
    try:
        with pytest.raises(ValueError, match=r"^2 target\(s\) are neither a class index in "
                           r"\[0, 3\) nor ignore_index=-100.*the first in batch 1 of data"):  # fmt: skip
            cl.analyze(model, lf, data, checkpoint=[sd, sd], progress=False)
    finally:
        handle.remove()
    # was: AnalysisError with one reason per quantity and checkpoint, after every pass
    assert seen == [min(len(data[0][0]), 8)]  # the up-front forward on a few examples only


@pytest.mark.parametrize("ignore_index", [-100, 255, 0])
def test_ignore_index_is_no_bad_label(ignore_index: int) -> None:
    torch.set_num_threads(1)
    model, data = _net(), _batches()
    for _, y in data:
        y[:2] = ignore_index  # 255: a void label, 0: a class index
    report = cl.analyze(
        model, nn.CrossEntropyLoss(ignore_index=ignore_index), data, quantities=["loss"],
        nqm=False, progress=False,
    )  # fmt: skip
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    want = _brute_loss(model, X, y, ignore_index=ignore_index)
    assert report.entries[0]["values"]["loss"] == pytest.approx(want, rel=1e-12)


def test_the_command_reports_a_class_index_out_of_range_as_one_input_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.py").write_text(
        MODEL_OBJECT + "def bad():\n    y2 = y.clone(); y2[10] = 5\n    return [(X[:7], y[:7]), "
        "(X[7:], y2[7:])]\n"
    )
    torch.save(_net().state_dict(), tmp_path / "ck0.pt")
    torch.save(_net().state_dict(), tmp_path / "ck1.pt")
    proc = _curvlab(
        "analyze", "--model", "m.py:model", "--data", "m.py:bad", "--checkpoint", "ck0.pt",
        "ck1.pt", "--out", str(tmp_path / "o"), "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    # was: exit code 1, "every requested quantity failed" and 10 identical reasons
    assert proc.returncode == 2, proc.stderr
    (line,) = _errors(proc)
    assert "1 target(s) are neither a class index in [0, 3)" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ F5: the option's name
def _exit_code(argv: list[str]) -> int:
    """``main(argv)``'s exit code, also where argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_nqm_and_demo_errors_name_the_option_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    proc = _curvlab("nqm", "--out", str(tmp_path / "a"), "--dim", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "--dim" in _errors(proc)[0]  # was: "d must be ..."
    base = ["nqm", "--batch-sizes", "2,4", "--powers", "0", "--no-ema"]
    for argv, option in [
        ([*base, "--init-var", "-1"], "--init-var"),  # was: "init_var must be ..."
        ([*base, "--init-var", "nan"], "--init-var"),
        ([*base, "--bins", "-3"], "--bins"),  # was: "bins must be a positive integer or None"
        ([*base, "--batch-sizes", "0,4"], "--batch-sizes"),  # was: "batch_sizes must be ..."
        (["demo", "--quick", "--steps", "0"], "--steps"),  # was: "steps must be >= 1"
    ]:
        assert _exit_code([*argv, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0], (argv, err)
        assert not (tmp_path / "b").exists()
    # --bins 0 is no binning (the message said "a positive integer or None")
    out = tmp_path / "c"
    assert main([*base, "--out", str(out), "--dim", "20", "--bins", "0"]) == 0
    capsys.readouterr()
    assert (out / "nqm_sweep.csv").is_file()


# ------------------------------------------------------------------ F6: a checkpoint folder
def test_a_save_pretrained_folder_names_the_file_to_pass(tmp_path: Path) -> None:
    (tmp_path / "objmod.py").write_text(MODEL_OBJECT)
    hf = tmp_path / "hf_dir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")  # never read: the folder is refused first
    proc = _curvlab(
        "analyze", "--model", "objmod.py:model", "--data", "objmod.py:batch", "--checkpoint",
        "hf_dir", "--out", str(tmp_path / "o"), "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = _errors(proc)
    assert "FileNotFoundError" not in line  # was: "FileNotFoundError: ... expected a file
    assert (
        f"--checkpoint '{Path('hf_dir') / 'model.safetensors'}'" in line
    )  # written by torch.save"


def test_a_folder_checkpoint_message_names_what_to_do(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pass the file inside it: checkpoint='.*bin'"):
        cl.analyze(_net(), nn.CrossEntropyLoss(), _batches(), checkpoint=str(one))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (sharded / name).write_bytes(b"")
    assert "sharded checkpoint" in folder_checkpoint_message(sharded)
    assert "from_pretrained" in folder_checkpoint_message(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no .safetensors" in folder_checkpoint_message(empty)


def test_the_named_safetensors_file_measures_as_the_state_dict(tmp_path: Path) -> None:
    """What the refusal names loads, with the values of the state_dict itself."""
    safetensors = pytest.importorskip("safetensors.torch")
    torch.set_num_threads(1)
    model, data = _net(), _batches()
    trained = _net()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(trained.state_dict(), str(path))
    try:
        torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - this torch's torch.load reads no safetensors
        pytest.skip("torch.load of this torch does not read .safetensors files")
    kw = {"quantities": ["loss", "grad_norm"], "nqm": False, "progress": False}
    got = cl.analyze(model, nn.CrossEntropyLoss(), data, checkpoint=str(path), **kw)
    want = cl.analyze(trained, nn.CrossEntropyLoss(), data, **kw)
    assert got.entries[0]["values"] == pytest.approx(want.entries[0]["values"], rel=1e-12)
