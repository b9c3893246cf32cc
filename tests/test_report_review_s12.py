"""Review s12 of the report layer; each test failed on the code before its fix.

1. ``Diagnostics``' Fisher-explosion check compared raw Tr(F) under ``reduction="sum"``, a batch
   total: a 1-example last batch of an epoch followed by a full one of 50 read as a 24x rise (a
   false ``FisherExplosionWarning`` that also used up the once-per-run warning). It now compares
   Tr(F) per loss term (``Tr(F) / M`` under "sum", Tr(F) itself under "mean").
2. The NQM critical batch size: the caption of ``critical_batch_size.png`` said loss terms for a
   point drawn in examples, and the page's table and ``summary()`` gave the loss-term value with
   no unit beside ``B_simple`` in examples.
3. The glossary's scaling said "N times larger for N examples" under "sum": it is ``M``, the loss
   terms (the scored tokens of a sequence model); the empirical Fisher's norms scale by ``M²/N``.
4. The glossary said ``sharpness`` is warm-started; ``analyze`` starts it cold.
5. ``curvlab analyze --checkpoint a.pt b.pt`` (the docs' usage line) was refused.
6. A checkpoint of a compiled model wrapped in DDP (``module._orig_mod.``/``_orig_mod.module.``)
   was refused, advising another architecture.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call

import curvlab as cl
from curvlab._cli_parser import build_parser
from curvlab.analysis import Diagnostics, FisherExplosionWarning
from curvlab.analysis import _plotting as plotting
from curvlab.analysis._checkpoint import CheckpointMismatchError, load_into
from curvlab.analysis._glossary import describe
from curvlab.analysis._page import _CAPTIONS, render_html
from curvlab.analysis._report import Report

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64


def _words(path: Path) -> str:
    return " ".join(path.read_text().split())


# ---------------------------------------------------------------------- 1. the explosion check
def _epoch_run(reduction: str) -> tuple[Diagnostics, list[Any], list[int]]:
    """The reviewer's run: 201 examples in batches of 50 (the last of 1), lr = 1e-3 (nothing
    explodes), Tr(F) measured every step for two epochs. Returns the Diagnostics, the explosion
    warnings and the measured batches' sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(201, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (201,), generator=g)
    diag = Diagnostics(model, loss_fn, quantities=["trace_fisher"], every=1)
    sizes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = 0
        for _ in range(2):
            for start in range(0, 201, 50):
                xb, yb = X[start : start + 50], y[start : start + 50]
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
                diag.step(step, xb, yb)
                sizes.append(len(yb))
                step += 1
    explosions = [w for w in caught if issubclass(w.category, FisherExplosionWarning)]
    diag.close()
    return diag, explosions, sizes


def test_a_short_last_batch_under_sum_is_no_explosion() -> None:
    diag, explosions, sizes = _epoch_run("sum")
    values = [r["values"]["trace_fisher"] for r in diag.records]
    assert max(values) / values[sizes.index(1)] > 10  # the batch totals do differ 24x
    assert explosions == [] and diag.events == []
    # the window holds Tr(F) per loss term: the total over the batch's examples (one term each)
    per_term = [v / n for v, n in zip(values, sizes)]
    assert diag.state_dict()["fisher_window"] == pytest.approx(per_term[-5:], rel=1e-15)


def test_the_mean_run_compares_tr_f_itself() -> None:
    diag, explosions, _ = _epoch_run("mean")
    values = [r["values"]["trace_fisher"] for r in diag.records]
    assert explosions == [] and diag.state_dict()["fisher_window"] == values[-5:]


SUM_SCALES = [(1.0, 64), (1.0, 64), (1.0, 64), (1.0, 64), (5.0, 4)]  # (input scale, examples)


def _sum_problem() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, dtype=DT, generator=g)
    Y = torch.randn(64, 3, dtype=DT, generator=g)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, dtype=DT, generator=g))
        model.bias.zero_()
    return model, X, Y


def _ggn_trace_per_term(X: Tensor) -> float:
    """Brute force: the GGN trace of ``MSELoss(sum)`` of ``nn.Linear(4, 3)`` at inputs ``X``,
    ``2 Σ_n Σ_k ||∂f_nk/∂θ||² = 2 · 3 · Σ_n (||x_n||² + 1)``, over its ``M = 3 N`` loss terms."""
    return float(6 * (X.pow(2).sum(1) + 1).sum()) / (3 * X.shape[0])


def _sum_run(save_at: int | None, drop: str | None = None) -> tuple[list, list, list]:
    """Steps 0-4 under ``MSELoss(reduction="sum")``; at step 4 the inputs grow 5x (the GGN trace
    per loss term 27.9x, the Monte-Carlo Tr(F) per term 13.5x) on a batch of 4 examples instead of
    64 (the batch total 0.84x: the old check saw no rise). At ``save_at``
    the Diagnostics is replaced by one loaded from its state (without its ``drop`` entry)."""
    model, X, Y = _sum_problem()
    loss_fn = nn.MSELoss(reduction="sum")
    kw: dict[str, Any] = {"quantities": ["trace_fisher"], "every": 1, "seed": 0}
    diag = Diagnostics(model, loss_fn, **kw)
    values, warned = [], []
    for step, (scale, n) in enumerate(SUM_SCALES):
        if step == save_at:
            buf = io.BytesIO()
            torch.save(diag.state_dict(), buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
            if drop is not None:
                del state[drop]  # a state saved by an earlier curvlab
            diag.close()
            diag = Diagnostics(model, loss_fn, **kw)
            diag.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values.append(diag.step(step, X[:n] * scale, Y[:n])["values"]["trace_fisher"])
        warned += [step for w in caught if issubclass(w.category, FisherExplosionWarning)]
    events = [{k: v for k, v in e.items() if k != "time"} for e in diag.events]
    diag.close()
    return values, warned, events


def test_a_genuine_explosion_under_sum_is_still_seen() -> None:
    _, X, _ = _sum_problem()
    exact = [_ggn_trace_per_term(X[:n] * s) for s, n in SUM_SCALES]
    assert exact[4] >= 10 * max(exact[:4])  # brute force: the curvature per term explodes
    values, warned, events = _sum_run(None)
    assert values[4] < 10 * min(values[:4])  # the batch totals alone would not say so
    terms = [3 * n for _, n in SUM_SCALES]
    per_term = [v / m for v, m in zip(values, terms)]
    assert warned == [4]
    (event,) = events
    assert event == {
        "event": "fisher_explosion",
        "step": 4,
        "trace_fisher": values[4],
        "window_min": min(per_term[:4]),
        "factor": per_term[4] / min(per_term[:4]),
        "loss_terms": 12,
        "trace_fisher_per_term": per_term[4],
    }


@pytest.mark.parametrize("save_at", [1, 3, 4])
def test_a_resumed_sum_run_warns_where_the_uninterrupted_one_does(save_at: int) -> None:
    assert _sum_run(save_at) == _sum_run(None)


def test_an_earlier_sum_state_loads_with_an_empty_window() -> None:
    """A "sum" window saved before this fix held batch totals: it is dropped, not compared with
    the values per loss term (a "mean" window, already per loss term, is kept)."""
    values, warned, events = _sum_run(4, drop="fisher_window_per_term")
    assert values == _sum_run(None)[0] and warned == [] and events == []
    model, X, Y = _sum_problem()
    for reduction, kept in (("sum", []), ("mean", [3.0, 4.0])):
        diag = Diagnostics(model, nn.MSELoss(reduction=reduction), ["trace_fisher"], every=1)
        state = {**diag.state_dict(), "fisher_window": [3.0, 4.0]}
        del state["fisher_window_per_term"]
        diag.load_state_dict(state)
        assert diag.state_dict()["fisher_window"] == kept
        diag.close()


def test_sum_counts_the_scored_tokens_of_a_sequence_batch() -> None:
    """Cross-entropy over (N, T, V) logits with ignored positions: M is the scored tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 5)).double()
    x = torch.randint(0, 5, (6, 4))
    y = torch.randint(1, 5, (6, 4))
    y[0, 1:] = 0
    y[4, 2:] = 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum", ignore_index=0)
    diag = Diagnostics(model, loss_fn, ["trace_fisher"], every=1)
    value = diag.step(0, x, y)["values"]["trace_fisher"]
    assert diag.state_dict()["fisher_window"] == [value / int((y != 0).sum())]
    diag.close()


# ---------------------------------------------------------------------- 1, distributed
WORLD = 2


def _rank_batch(rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(20 + rank)
    n = 3 + 2 * rank  # 3 and 5 examples
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    y[0] = -100  # one ignored label per rank
    return X, y


def _world(rank: int, init_file: str, out_dir: str) -> None:
    from tests.distributed_checks import join_gloo, leave_process

    join_gloo(rank, WORLD, init_file, 60)
    report: dict[str, Any] = {}
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        X, y = _rank_batch(rank)
        diag = Diagnostics(model, nn.CrossEntropyLoss(reduction="sum"), ["trace_fisher"], every=1)
        value = diag.step(0, X, y)["values"]["trace_fisher"]
        report = {"value": value, "window": diag.state_dict()["fisher_window"]}
        diag.close()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sum_under_torch_distributed_divides_by_every_ranks_terms(tmp_path: Path) -> None:
    """Tr(F) is that of both shards; M is counted over both: 2 + 4 scored labels."""
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        _world,
        args=(str(tmp_path / "init"), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the spawned world ran past 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    terms = sum(int((_rank_batch(r)[1] != -100).sum()) for r in range(WORLD))
    assert terms == 6
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert "error" not in report, report
        assert report["window"] == [report["value"] / terms]


# ---------------------------------------------------------------------- 2. NQM units
def _nqm_report(terms_per_example: float | None) -> Report:
    curve: dict[str, Any] = {
        "batch_size": [1.0, 2.0, 4.0],
        "steps": [8.0, 4.0, 3.0],
        "critical_batch_size": 762.3,
        "critical_batch_size_range": [700.0, 800.0],
    }
    if terms_per_example is not None:
        curve["critical_batch_size_examples"] = 762.3 / terms_per_example
    nqm = {"curves": {"SGD": curve}, "num_probes": 4, "terms_per_example": terms_per_example}
    entry = {
        "label": "m",
        "values": {"noise_scale": 12.5, "noise_scale_hessian": 30.0},
        "per_layer": {},
        "arrays": {},
        "errors": {},
    }
    return Report(entries=[entry], meta={}, nqm=nqm)


def test_the_summary_states_the_nqm_units() -> None:
    line = _nqm_report(3.714).summary().splitlines()[-1]
    assert line == (
        "NQM critical batch size at m, SGD: 762.3 (from the pooled spectrum of 4 SLQ probes; each "
        "probe alone predicts 700 to 800) loss terms, i.e. 205.3 examples at 3.714 loss terms per "
        "example"
    )
    line = _nqm_report(None).summary().splitlines()[-1]
    assert line.endswith("predicts 700 to 800) loss terms") and "examples" not in line


def test_the_page_states_the_nqm_units() -> None:
    page = render_html(_nqm_report(3.714), [])
    table = page[page.index("<h2>NQM prediction</h2>") :]
    assert "<th>critical batch size (loss terms)</th><th>in examples</th>" in table
    assert "<th>single-probe predictions (loss terms)</th>" in table
    assert "<td>762.3</td><td class='txt'>205.3 examples at 3.714 loss terms per example</td>" in (
        table
    )
    unknown = render_html(_nqm_report(None), [])
    assert "– (loss terms per example unknown)" in unknown


def test_the_caption_says_what_the_figure_draws(tmp_path: Path, monkeypatch) -> None:
    drawn = []
    original = plotting._figure

    def capture(width: float, height: float) -> Any:
        fig = original(width, height)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(plotting, "_figure", capture)
    plotting.plot_critical_batch(_nqm_report(3.714).to_dict(), tmp_path / "c.png")
    (ax,) = drawn[-1].axes
    nqm = [c for c in ax.containers if c.get_label().startswith("NQM")][0]
    assert list(nqm.lines[0].get_ydata()) == pytest.approx([762.3 / 3.714])  # examples
    assert ax.get_ylabel() == "critical batch size (examples)"
    caption = _CAPTIONS["critical_batch_size.png"]
    assert caption.startswith("The critical batch size three ways, in examples")
    assert "(in loss terms: tokens for sequence models)" not in caption
    assert "converted to examples by the loss terms per example" in caption
    docs = _words(ROOT / "docs" / "analysis.md")
    assert "the NQM prediction, the last in loss terms" not in docs
    assert "the NQM prediction, all in examples" in docs


# ---------------------------------------------------------------------- 3, 4. the glossary
class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


def test_the_scaling_text_names_the_loss_terms() -> None:
    """N = 7 sequences, M = 23 scored tokens: "sum" is 23x "mean", the empirical Fisher's norms
    M²/N = 75.6x (the text said N times for all of them)."""
    torch.manual_seed(1)
    model = _Seq().double()
    X = torch.randint(0, 5, (7, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(1, 5, (7, 4), generator=torch.Generator().manual_seed(2))
    y[0, 2:] = -100
    y[3, 1:] = -100
    n, m = 7, int((y != -100).sum())
    assert m == 23
    names = ["loss", "grad_norm", "top_eigenvalues", "trace_fisher", "fisher_norms"]
    r = {
        red: cl.analyze(
            model,
            nn.CrossEntropyLoss(reduction=red),
            (X, y),
            quantities=names,
            k=1,
            nqm=False,
            seed=0,
            progress=False,
            on_error="raise",
        )
        for red in ("mean", "sum")
    }
    for name in ("loss", "grad_norm", "top_eigenvalues", "trace_fisher"):
        a, b = r["sum"][name], r["mean"][name]
        a, b = (a[0], b[0]) if isinstance(a, list) else (a, b)
        assert a / b == pytest.approx(m, rel=1e-9), name
        text = describe(name).scaling
        assert "M times the 'mean' value" in text and "scored tokens" in text, name
        assert "N times larger" not in text
    for name in ("fisher_frobenius", "fisher_diag_frobenius"):
        assert r["sum"][name] / r["mean"][name] == pytest.approx(m * m / n, rel=1e-9)
        assert "M²/N times the 'mean' one" in describe(name).scaling
    assert "M²/N" in describe("trace_empirical_fisher").scaling


def test_the_sharpness_definition_is_true_for_analyze_and_diagnostics() -> None:
    """analyze measures every checkpoint cold: the same parameters twice take the same Hessian
    products (a warm start from the first would take fewer)."""
    text = describe("sharpness").definition
    assert "in Diagnostics warm-started" in text and "in analyze cold at every checkpoint" in text
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(20, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(1))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        checkpoint=[sd, sd],
        quantities=["sharpness"],
        nqm=False,
        progress=False,
        on_error="raise",
    )
    hvps = [e["values"]["sharpness_hvps"] for e in report.entries]
    assert hvps[0] == hvps[1]
    assert "Diagnostics" in describe("preconditioned_sharpness").estimate


# ---------------------------------------------------------------------- 5. the CLI
def test_checkpoint_takes_several_paths_and_repeats() -> None:
    parser = build_parser(lambda a: 0, lambda a: 0)
    base = ["analyze", "--model", "m.py:f", "--out", "o"]
    args = parser.parse_args([*base, "--checkpoint", "a.pt", "b.pt", "--checkpoint", "c.pt"])
    assert args.checkpoint == ["a.pt", "b.pt", "c.pt"]
    assert parser.parse_args([*base, "--checkpoint", "a.pt"]).checkpoint == ["a.pt"]
    assert parser.parse_args(base).checkpoint is None
    docs = _words(ROOT / "docs" / "analysis.md")
    assert "[--checkpoint PATH [PATH ...]]" in docs
    assert "--checkpoint a.pt b.pt" in docs and "--checkpoint a.pt --checkpoint b.pt" in docs


# ---------------------------------------------------------------------- 6. wrapper prefixes
def _brute(model: nn.Module, params: dict[str, Tensor], X: Tensor, y: Tensor) -> list[float]:
    """Loss, gradient norm and the largest Hessian eigenvalue of mean cross-entropy, dense."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def loss(flat: Tensor) -> Tensor:
        ps = {k: t.view(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(model, ps, (X,)), y)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    g = torch.func.grad(loss)(flat)
    H = torch.func.hessian(loss)(flat)
    return [float(loss(flat)), float(g.norm()), float(torch.linalg.eigvalsh(H)[-1])]


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module.", "module.module."])
def test_stacked_wrapper_prefixes_load(prefix: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(10, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(1))
    plain = {k: v * 2 for k, v in model.state_dict().items()}
    names = ["loss", "grad_norm", "top_eigenvalues"]
    kw = {"quantities": names, "k": 1, "nqm": False, "progress": False, "on_error": "raise"}
    got = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        checkpoint={prefix + k: v for k, v in plain.items()},
        **kw,
    )
    want = cl.analyze(model, nn.CrossEntropyLoss(), (X, y), checkpoint=plain, **kw)
    values = [got["loss"], got["grad_norm"], got["top_eigenvalues"][0]]
    assert values == [want["loss"], want["grad_norm"], want["top_eigenvalues"][0]]
    assert values == pytest.approx(_brute(model, plain, X, y), rel=1e-8)
    assert torch.equal(model[0].weight, plain["0.weight"] / 2)  # the model is left as it was


def test_a_key_that_fits_as_it_is_is_not_stripped() -> None:
    """A model whose own keys start with a wrapper's prefix ("model.") loads as it is."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)

    holder = Holder()
    sd = {k: torch.full_like(v, 3.0) for k, v in holder.state_dict().items()}
    load_into(holder, sd)
    assert torch.equal(holder.model.weight, torch.full((2, 2), 3.0))


def test_the_mismatch_error_speaks_of_prefixes() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sd = model.state_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, {"backbone." + k: v for k, v in sd.items()})
    message = str(info.value)
    assert "carry the prefix 'backbone.', which the model's lack (4 fit without it)" in message
    assert "k.removeprefix('backbone.')" in message
    extra = {"module._orig_mod." + k: v for k, v in sd.items()}
    extra["module._orig_mod.head.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(
            "unexpected keys ['head.weight'] (named after stripping the checkpoint's wrapper prefix "
            "'module._orig_mod.')"
        ),
    ):
        load_into(model, extra)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, {k: v for k, v in list(sd.items())[:2]})
    assert "prefix" not in str(info.value)
    assert "Build the model with the architecture" in str(info.value)
