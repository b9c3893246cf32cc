"""The public surface: what docs/ documents, and nothing internal beside it.

A module whose file name starts with ``_`` is internal (docs/architecture.md, "What is public");
every other module is public, and every name in a public module's ``__all__`` is documented in
README.md or docs/.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = [
    "curvlab",
    "curvlab.analysis",
    "curvlab.analysis.hf",
    "curvlab.analysis.lightning",
    "curvlab.backends",
    "curvlab.cli",
    "curvlab.demo",
    "curvlab.demo.mnist1d",
    "curvlab.distributed",
    "curvlab.estimators",
    "curvlab.noise",
    "curvlab.nqm",
    "curvlab.operators",
    "curvlab.quantities",
    "curvlab.regularizers",
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_is_private_or_listed_as_public() -> None:
    found = set()
    for path in (ROOT / "curvlab").rglob("*.py"):
        name = _module_name(path)
        if any(part.startswith("_") and part != "__main__" for part in name.split(".")):
            continue
        if name.endswith("__main__"):
            continue
        found.add(name)
    assert found == set(PUBLIC), (
        "a new public module: add it to PUBLIC and document it, or give its file a leading "
        f"underscore; differences: {sorted(found ^ set(PUBLIC))}"
    )


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_is_documented(module: str) -> None:
    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    docs += (ROOT / "README.md").read_text()
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", [])
    missing = [
        n
        for n in names
        if not n.startswith("__") and not re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", docs)
    ]
    assert not missing, f"{module}: public but undocumented: {missing}"
    for n in names:
        assert hasattr(mod, n), f"{module}.__all__ lists {n!r}, which it does not define"


def test_public_modules_have_an_all() -> None:
    for module in PUBLIC:
        if module == "curvlab.cli":
            continue
        assert hasattr(importlib.import_module(module), "__all__"), module


def test_diagnostics_takes_its_options_as_a_config_or_keywords() -> None:
    import torch

    import curvlab as cl
    from curvlab.analysis import DiagnosticsConfig

    model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
    cfg = DiagnosticsConfig(seed=3, explosion_factor=4.0)
    diag = cl.Diagnostics(model, loss_fn, every=2, config=cfg, explosion_factor=5.0)
    assert diag.config.seed == 3 and diag.config.explosion_factor == 5.0 and diag.every == 2
    assert cl.Diagnostics(model, loss_fn, max_examples=4).config.max_examples == 4
    with pytest.raises(TypeError, match="unknown option.*'explosion_facter'.*explosion_factor"):
        cl.Diagnostics(model, loss_fn, explosion_facter=5.0)
    with pytest.raises(TypeError, match="config must be a DiagnosticsConfig"):
        cl.Diagnostics(model, loss_fn, config={"seed": 1})
