"""Review s23 of checkpoint loading (``curvlab.analysis._checkpoint``, ``analyze``, the CLI).

1. A module's extra state (``get_extra_state``: key ``"0._extra_state"``) made its own
   ``state_dict`` refused ("missing keys ['0._extra_state']", or "holds no state_dict" inside
   ``{"model": ...}``), although ``load_state_dict(strict=True)`` takes it.
2. A dict or a function ``map_location`` naming a device this machine lacks (or failing) was
   blamed on the file as "corrupt or not a torch.save file", after the data was read twice.
3. A float32 value that overflows float16 when cast into a float16 model was refused after the
   data was read, as a checkpoint of a training that diverged.
4. A lazy ``--model`` refused checkpoints the CLI takes for the same model built (Lightning's
   ``"model."`` prefix, a missing ``num_batches_tracked``, a tied weight stored once).
5. A 0-dim parameter stored as shape ``[1]`` was refused as mis-shaped; torch loads it.
6. The ``weights_only`` refusal kept only torch's first line: neither the class it refused
   (``argparse.Namespace``) nor a way to load the file.
7. A ``state_dict`` on the meta device failed with torch's "Tensor.item() cannot be called on
   meta tensors".

Every value is checked against a float64 brute force written here (``torch.func``).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.analysis._checkpoint import CheckpointError, check_fits
from curvlab.cli import main

CE = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64).to(dtype)
    return X, torch.randint(0, 3, (10,), generator=g)


class Unread:
    """Data that fails the test if it is read: every refusal here comes before the data."""

    def __iter__(self):
        raise AssertionError("the data was read before the checkpoint was refused")


def _brute_loss(build, sd: dict, X: torch.Tensor, y: torch.Tensor) -> float:
    """The mean cross-entropy of a fresh ``build()`` at the tensors of ``sd`` (eval mode)."""
    net = build().eval()
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return float(nn.functional.cross_entropy(functional_call(net, tensors, (X,)), y))


def _loss(report: cl.Report) -> float:
    (entry,) = report.entries
    assert entry["errors"] == {}
    return entry["values"]["loss"]


# ---------------------------------------------------------------- 1. extra state
class Counted(nn.Linear):
    """A linear layer with extra state (``{"calls": n}``) in its ``state_dict``."""

    def __init__(self, *args, calls: int = 0) -> None:
        super().__init__(*args, dtype=torch.float64)
        self.calls = calls

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state) -> None:
        self.calls = state["calls"]


def _counted(seed: int, calls: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Counted(3, 4, calls=calls), nn.Tanh(), nn.Linear(4, 3).double())


@pytest.mark.parametrize("form", ["state_dict", "file", "wrapped"])
def test_a_checkpoint_with_extra_state_loads(tmp_path: Path, form: str) -> None:
    sd = _counted(5, calls=9).state_dict()
    assert "0._extra_state" in sd
    _counted(1).load_state_dict(sd, strict=True)  # torch takes it
    checkpoint = {"state_dict": sd, "file": str(tmp_path / "ck.pt"), "wrapped": {"model": sd}}
    torch.save(sd, tmp_path / "ck.pt")
    model = _counted(1, calls=3)
    X, y = _data()
    report = cl.analyze(
        model, CE, (X, y), checkpoint=checkpoint[form], quantities=["loss"], nqm=False
    )
    want = _brute_loss(lambda: _counted(0), sd, X, y)
    assert abs(_loss(report) - want) <= 1e-14 * abs(want)
    assert model[0].calls == 3  # the model's own extra state is set back: no trace


# ---------------------------------------------------------------- 2. map_location
def _plain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = _plain()
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize(
    "location, named",
    [
        ({"cpu": "banana"}, r"map_location\['cpu'\] 'banana' is not a device"),
        ({"cpu": "cuda:99"}, r"map_location\['cpu'\] 'cuda:99'"),
        ({"cpu": "cpu:3"}, r"map_location\['cpu'\] 'cpu:3': there is one CPU device"),
    ],
)
def test_a_dict_map_location_to_a_missing_device_is_named(
    tmp_path: Path, location: dict, named: str
) -> None:
    model, path = _saved(tmp_path)
    with pytest.raises(ValueError, match=named) as info:
        cl.analyze(
            model,
            CE,
            Unread(),
            checkpoint=str(path),
            map_location=location,
            quantities=["loss"],
            nqm=False,
        )
    assert not isinstance(info.value, CheckpointError)  # the file is not blamed
    assert "corrupt" not in str(info.value)


def test_a_failing_map_location_function_is_named_before_the_data(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)

    def to_missing_device(storage, location):
        raise RuntimeError("no such device")

    with pytest.raises(ValueError, match="map_location .*to_missing_device.* no such device") as i:
        cl.analyze(
            model,
            CE,
            Unread(),
            checkpoint=[str(path), str(path)],
            map_location=to_missing_device,
            quantities=["loss"],
            nqm=False,
        )
    assert not isinstance(i.value, CheckpointError) and "corrupt" not in str(i.value)
    assert "map_location='cpu'" in str(i.value)


def test_a_working_dict_or_function_map_location_loads(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    X, y = _data()
    sd = torch.load(path, weights_only=True)
    want = _brute_loss(_plain, sd, X, y)
    for location in ({"cpu": "cpu"}, {"cpu": torch.device("cpu")}, lambda s, loc: s):
        torch.manual_seed(7)
        report = cl.analyze(
            _plain(),
            CE,
            (X, y),
            checkpoint=str(path),
            map_location=location,
            quantities=["loss"],
            nqm=False,
        )
        assert abs(_loss(report) - want) <= 1e-14 * abs(want)


# ---------------------------------------------------------------- 3. the model's dtype
def _half_pair() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).half()
    sd = {k: v.float() for k, v in model.state_dict().items()}
    return model, sd


def test_a_value_beyond_the_models_dtype_is_refused_before_the_data() -> None:
    model, sd = _half_pair()
    sd["0.bias"][0] = 1e5  # finite in float32; float16's largest value is 65504
    with pytest.raises(CheckpointError, match=r"'0\.bias'.*float32.*float16.*65504") as info:
        cl.analyze(model, CE, Unread(), checkpoint=sd, quantities=["loss"], nqm=False)
    assert "diverged" not in str(info.value)


def test_the_cast_is_checked_as_torch_rounds() -> None:
    """float16's largest value is 65504 = (2 - 2**-10) * 2**15, its spacing there 2**5 = 32: a
    float32 value below 65504 + 16 rounds to 65504, one at 65520 (a tie) to even, i.e. inf."""
    model, sd = _half_pair()
    top, half_spacing = (2 - 2**-10) * 2**15, 2**4
    sd["0.bias"][0] = top + half_spacing - 1
    fitted = check_fits(model, sd)
    assert torch.isfinite(fitted["0.bias"].half()).all()
    sd["0.bias"][0] = top + half_spacing
    assert not torch.isfinite(sd["0.bias"].half()).all()  # what load_state_dict would copy
    with pytest.raises(CheckpointError, match="'0.bias'"):
        check_fits(model, sd)


# ---------------------------------------------------------------- 4. the CLI's lazy --model
PROJECT = textwrap.dedent(
    """
    import torch
    from torch import nn

    def built():
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)
        ).double()

    def lazy():
        return nn.Sequential(
            nn.LazyLinear(4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)
        ).double()

    def _tied(first):
        net = nn.Sequential(
            first, nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4),
            nn.Linear(4, 3),
        ).double()
        net[5].weight = net[3].weight  # two 4x4 layers, one weight
        return net

    def tied_built():
        torch.manual_seed(3)
        return _tied(nn.Linear(3, 4))

    def tied_lazy():
        return _tied(nn.LazyLinear(4))

    def data():
        g = torch.Generator().manual_seed(1)
        X = torch.randn(10, 3, generator=g, dtype=torch.float64)
        return X, torch.randint(0, 3, (10,), generator=g)
    """
)


def _net(tied: bool) -> nn.Sequential:
    layers = [nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()]
    if not tied:
        return nn.Sequential(*layers, nn.Linear(4, 3)).double()
    net = nn.Sequential(*layers, nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 3))
    net[5].weight = net[3].weight
    return net.double()


def _trained_state(tied: bool) -> dict:
    torch.manual_seed(11)
    net = _net(tied)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(7)
    return dict(net.state_dict())


@pytest.mark.parametrize("case", ["lightning", "no_num_batches_tracked", "tied_once"])
def test_a_lazy_cli_model_takes_what_the_built_one_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    tied = case == "tied_once"
    sd = _trained_state(tied)
    if case == "lightning":
        saved = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}
    elif case == "no_num_batches_tracked":
        saved = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    else:
        saved = {k: v for k, v in sd.items() if k != "5.weight"}  # as save_pretrained does
    torch.save(saved, tmp_path / "ck.pt")
    project = tmp_path / "ck_s23_project.py"
    project.write_text(PROJECT)
    X, y = _data()
    # functional_call takes a tied tensor once (and no count, which eval mode does not read)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked") and k != "5.weight"}
    want = _brute_loss(lambda: _net(tied), sd, X, y)
    for factory in ("tied_built", "tied_lazy") if tied else ("built", "lazy"):
        out = tmp_path / factory
        argv = ["analyze", "--model", f"{project}:{factory}", "--data", f"{project}:data"]
        argv += ["--checkpoint", str(tmp_path / "ck.pt"), "--quantities", "loss", "--no-nqm"]
        assert main([*argv, "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
        (entry,) = json.loads((out / "report.json").read_text())["entries"]
        assert entry["errors"] == {}
        assert abs(entry["values"]["loss"] - want) <= 1e-14 * abs(want), factory


# ---------------------------------------------------------------- 5. a 0-dim parameter as [1]
class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_a_0_dim_parameter_stored_as_shape_1_loads() -> None:
    torch.manual_seed(0)
    sd = dict(Scaled().state_dict())
    sd["scale"] = torch.tensor([2.0], dtype=torch.float64)  # torch 0.3's 0-dim tensors
    Scaled().load_state_dict(sd, strict=True)  # torch takes it
    X, y = _data()
    torch.manual_seed(5)
    report = cl.analyze(Scaled(), CE, (X, y), checkpoint=sd, quantities=["loss"], nqm=False)
    want = _brute_loss(Scaled, {**sd, "scale": torch.tensor(2.0, dtype=torch.float64)}, X, y)
    assert abs(_loss(report) - want) <= 1e-14 * abs(want)


# ---------------------------------------------------------------- 6. weights_only
def test_the_weights_only_refusal_names_the_class_and_the_way_out(tmp_path: Path) -> None:
    model, _ = _saved(tmp_path)
    path = tmp_path / "args.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as info:
        cl.analyze(model, CE, Unread(), checkpoint=str(path), quantities=["loss"], nqm=False)
    text = str(info.value)
    assert "argparse.Namespace" in text
    assert "torch.serialization.safe_globals([argparse.Namespace])" in text
    assert "weights_only=False" in text and "re-save the state_dict" in text
    X, y = _data()
    with torch.serialization.safe_globals([argparse.Namespace]):  # the way out it names
        report = cl.analyze(model, CE, (X, y), checkpoint=str(path), quantities=["loss"], nqm=False)
    want = _brute_loss(_plain, model.state_dict(), X, y)
    assert abs(_loss(report) - want) <= 1e-14 * abs(want)


# ---------------------------------------------------------------- 7. the meta device
def test_a_state_dict_on_the_meta_device_is_refused_clearly(tmp_path: Path) -> None:
    model, _ = _saved(tmp_path)
    sd = {k: v.to("meta") for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"meta device \(\['0\.weight'"):
        cl.analyze(model, CE, Unread(), checkpoint=sd, quantities=["loss"], nqm=False)
