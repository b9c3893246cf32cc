"""The HTML page of a :class:`~curvlab.analysis.Report` (``report.html``).

The page states what was analysed (how many checkpoints, whether they are one trajectory or
independent runs), every value with its ± where it is an estimate, every quantity in words with
its definition, scaling and a link to its docs page (:mod:`curvlab.analysis._glossary`), failures,
the runs' settings, the NQM prediction with the checkpoint it comes from, the figures with
captions, and the measurement settings.

Docs links point to ``$CURVLAB_DOCS_URL`` when set (e.g. the project's published docs), else to
the ``docs/`` folder of the source checkout curvlab runs from, else they are shown as plain paths.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

from curvlab.analysis._glossary import (
    QUANTITY_INFO,
    STDERR_KEYS,
    describe,
    nqm_in_examples,
    nqm_probe_spread,
    top_residual,
    uncertainty,
)

__all__ = ["render_html", "docs_link"]

_CAPTIONS = {
    "training.png": "Training loss per update and Tr(F) measured by Diagnostics during training, "
    "one line per run; the x axis is in epochs so that runs of different batch sizes align.",
    "spectrum.png": "Hessian spectral density by stochastic Lanczos quadrature (log scale), one "
    "curve per checkpoint; dashed lines mark the top eigenvalues found by Lanczos.",
    "layers.png": "Per-layer values (horizontal bars), one colour per checkpoint; layers are "
    "named by module name and type; error bars on the per-layer Tr(H) are ± one standard error "
    "of its Hutchinson estimate. A layer without a bar at a checkpoint was not measured there.",
    "trajectory.png": "Scalar quantities at each checkpoint: a connected line for a trajectory, "
    "separate points for independent runs; error bars are ± one standard error of the Hutchinson "
    "estimate for Tr(H) and the Lanczos residual bound for λ_max(H).",
    "nqm.png": "Noisy quadratic model built from the measured Hessian spectrum: steps to reach "
    "the target risk against batch size (SGD solid, preconditioned SGD dashed); vertical lines "
    "in the style of their curve mark the critical batch sizes. The batch size counts loss "
    "terms: tokens for sequence models (divide by the tokens per sequence to read sequences).",
    "sharpness.png": "Largest Hessian eigenvalue (and, with Adam, that of the preconditioned "
    "Hessian P⁻¹H; the critical sharpness 2/η_c along the optimizer's update) against the step "
    "(or per checkpoint: connected for a trajectory, one labelled point per independent run), "
    "with the optimizer's stability threshold dashed: at the edge of stability the sharpness "
    "rises to its threshold and hovers there.",
    "critical_batch_size.png": "The critical batch size three ways, in examples: McCandlish et "
    "al.'s B_simple = tr(Σ)/|G|² and the Hessian-weighted B_noise = tr(HΣ)/(GᵀHG) (± one "
    "standard error), and the noisy quadratic model's prediction from the measured spectrum, "
    "whose batch counts loss terms (tokens for sequence models), converted to examples by the "
    "loss terms per example (where the report does not know them it is drawn in loss terms, "
    "as its legend and the axis then say). The NQM's absolute scale is arbitrary: it starts "
    "every direction at the unmeasured initial variance init_var = 1, and its critical batch "
    "size changes with it (roughly as 1/init_var); compare its ratios between checkpoints, not "
    "its value with B_simple's or B_noise's. Values of 0 or below (B_noise is negative where "
    "tr(HΣ) and GᵀHG differ in sign, which an indefinite Hessian gives) are drawn on a "
    "symmetric-log axis.",
}

_NON_FINITE_NOTE = (
    "Non-finite values (inf, NaN) are left out of the figures; a note under a figure names them."
)

_META = {
    "quantities": "quantities asked for",
    "loss": "loss function",
    "reduction": "loss reduction",
    "examples": "examples analysed (N)",
    "parameters": "trainable parameters (D)",
    "checkpoints": "checkpoints",
    "checkpoints_are": "the checkpoints are",
    "seed": "seed (probes, sampled labels)",
    "num_probes": "Hutchinson probes for Tr(H)",
    "top_k": "top eigenvalues (k)",
    "lanczos_steps": "Lanczos steps per SLQ probe",
    "density_probes": "SLQ probes of the spectral density",
    "chunk_size": "examples per pass",
    "nqm_target": "NQM target (fraction of the initial risk)",
    "precond_power": "NQM preconditioner power p (P = H^p)",
    "mode": "model mode during measurement",
}


def docs_link(doc: str) -> str | None:
    """The URL of ``docs/<doc>`` (see the module docstring), or ``None`` if there is none."""
    base = os.environ.get("CURVLAB_DOCS_URL")
    if base:
        return base.rstrip("/") + "/" + doc
    local = Path(__file__).resolve().parents[2] / "docs"
    page, _, anchor = doc.partition("#")
    if (local / page).is_file():
        return (local / page).as_uri() + (f"#{anchor}" if anchor else "")
    return None


def _has_non_finite(x: Any) -> bool:
    """Whether ``x`` holds an inf or NaN (a float, or the string of a loaded report.json)."""
    if isinstance(x, float):
        return not math.isfinite(x)
    if isinstance(x, str):
        return x in ("inf", "-inf", "nan")
    if isinstance(x, dict):
        return any(_has_non_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_non_finite(v) for v in x)
    return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _value(entry: dict[str, Any], name: str) -> str:
    """A value with its ± (standard error, or the Lanczos residual bound) where there is one;
    an estimate whose ± is missing or not finite says so (``"12 (no valid standard error)"``):
    it read as exact, and λ_max as ``"4 ± nan"`` (found in review)."""
    values = entry["values"]
    if name not in values:
        return "–"
    v = values[name]
    pm = values.get(STDERR_KEYS[name]) if name in STDERR_KEYS else None
    more = ""
    if name == "top_eigenvalues":
        if not isinstance(v, list) or not v:
            return _fmt(v)
        pm = top_residual(entry)
        more = f" (then {_fmt(v[1:4])}{' …' if len(v) > 4 else ''})" if len(v) > 1 else ""
        v = v[0]
    error, note = uncertainty(name, v, pm)
    return _fmt(v) + (note if error is None else f" ± {_fmt(error)}") + more


def _row_names(entries: list[dict[str, Any]]) -> list[str]:
    present: list[str] = []
    for e in entries:
        present += [n for n in e["values"] if n not in present]
    hidden = set(STDERR_KEYS.values())  # shown as the ± of their quantity, as in summary()
    ordered = [n for n in QUANTITY_INFO if n in present and n not in hidden]
    return ordered + [n for n in present if n not in ordered and n not in hidden]


def _quantity_cell(name: str) -> str:
    q = describe(name)
    return (
        f"<td class='q'><a href='#def-{html.escape(name)}'>{html.escape(q.title)}</a> "
        f"<span class='sym'>{html.escape(q.symbol)}</span></td>"
    )


def _definitions(names: list[str]) -> str:
    esc = html.escape
    items = []
    for name in names:
        q = describe(name)
        url = docs_link(q.doc)
        doc = f"<a href='{esc(url)}'>docs/{esc(q.doc)}</a>" if url else f"docs/{esc(q.doc)}"
        items.append(
            f"<dt id='def-{esc(name)}'>{esc(q.title)} <span class='sym'>{esc(q.symbol)}</span>"
            f" <code>{esc(name)}</code></dt><dd>{esc(q.definition)}."
            + (f"<br><i>Scaling</i>: {esc(q.scaling)}." if q.scaling else "")
            + (f"<br><i>Estimate</i>: {esc(q.estimate)}." if q.estimate else "")
            + f"<br><i>More</i>: {doc}</dd>"
        )
    return "<h2>What the quantities are</h2><dl>" + "".join(items) + "</dl>"


def _runs(histories: dict[str, Any]) -> str:
    if not histories:
        return ""
    esc = html.escape
    cols = (
        ("batch_size", "batch size"),
        ("updates", "updates"),
        ("epochs", "epochs"),
        ("lr", "learning rate"),
        ("noise", "added gradient noise"),
        ("seconds", "training time (s)"),
    )
    used = [(k, t) for k, t in cols if any(k in h for h in histories.values())]
    head = "<tr><th>run</th>" + "".join(f"<th>{esc(t)}</th>" for _, t in used) + "</tr>"
    rows = "".join(
        f"<tr><td>{esc(run)}</td>"
        + "".join(
            f"<td{' class=txt' if k == 'noise' else ''}>{esc(_fmt(h.get(k, '–')))}</td>"
            for k, _ in used
        )
        + "</tr>"
        for run, h in histories.items()
    )
    return f"<h2>Runs</h2><p>How each run was trained.</p><table>{head}{rows}</table>"


def _nqm(report: Any) -> str:
    esc = html.escape
    predictions = [(e["label"], e["nqm"]) for e in report.entries if e.get("nqm")]
    if not predictions and report.nqm:
        predictions = [(report.nqm.get("checkpoint", report.entries[-1]["label"]), report.nqm)]
    if not predictions:
        return ""
    independent = report.meta.get("checkpoints_are") == "independent runs"
    if len(predictions) == 1 and len(report.entries) > 1:
        label = predictions[0][0]
        last = str(label) == str(report.entries[-1]["label"])
        if independent:  # the run is named, never "the last" (found in review: the first
            # run's prediction was called the last's when the last run's had failed)
            scope = (
                f"One prediction, from the spectrum of the run <b>{esc(str(label))}</b> (one of "
                f"{len(report.entries)} independent runs; the others have none)."
            )
        else:
            where = (
                f"the last of {len(report.entries)} checkpoints"
                if last
                else f"one of {len(report.entries)} checkpoints; the others have none"
            )
            scope = f"One prediction, from the spectrum of <b>{esc(str(label))}</b> ({where})."
    elif len(predictions) > 1:
        scope = "One prediction per run, each from that run's own Hessian spectrum."
    else:
        scope = f"From the spectrum of <b>{esc(str(predictions[0][0]))}</b>."
    rows = []
    for label, pred in predictions:
        for curve_label, curve in pred.get("curves", {}).items():
            spread_text = nqm_probe_spread(curve, pred) or "– (one SLQ probe)"
            examples = nqm_in_examples(curve, pred, "{}") or "– (loss terms per example unknown)"
            rows.append(
                f"<tr><td>{esc(str(label))}</td><td>{esc(curve_label)}</td>"
                f"<td>{esc(_fmt(curve.get('critical_batch_size')))}</td>"
                f"<td class='txt'>{esc(examples)}</td>"
                f"<td>{esc(spread_text)}</td></tr>"
            )
    note = esc(predictions[0][1].get("note", ""))
    # the NQM's batch counts loss terms, B_simple and B_noise examples: every column says its
    # unit (found in review: 762.3 tokens shown without one beside B_simple in sequences)
    return (
        f"<h2>NQM prediction</h2><p>{scope} {note} The critical batch size uses the spectrum "
        "of all SLQ probes together; the last column shows the predictions of each probe alone, "
        "a measure of how much one probe's spectrum varies (the pooled value is steadier, and "
        "need not lie inside that range since the prediction is nonlinear in the spectrum). "
        "Its batch counts loss terms (tokens for sequence models), B_simple's and B_noise's "
        "examples: the table gives both units where the loss terms per example are known. "
        # its scale is arbitrary: shown beside B_simple and B_noise without a word, it read as a
        # third measurement of them (found in review s20)
        "<b>Its absolute scale is arbitrary</b>: the NQM starts every direction at the initial "
        "variance init_var = 1, which is not measured, and its critical batch size changes with "
        "it (roughly as 1/init_var). Compare its ratios (between checkpoints or optimisers, at "
        "equal init_var), never its value with the measured B_simple or B_noise.</p>"
        "<table><tr><th>checkpoint</th><th>optimiser</th>"
        "<th>critical batch size (loss terms)</th><th>in examples</th>"
        f"<th>single-probe predictions (loss terms)</th></tr>{''.join(rows)}</table>"
    )


def _demo(meta: dict[str, Any]) -> str:
    """``curvlab demo``'s settings, headline and regime, on top (the terminal prints the same)."""
    parts = [meta[k] for k in ("demo_settings", "demo_headline", "demo_regime") if k in meta]
    if not parts:
        return ""
    return "<h2>The demo's runs</h2>" + "".join(f"<p>{html.escape(str(p))}</p>" for p in parts)


def _intro(entries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report's first sentence: what was analysed, and how to read ±."""
    esc = html.escape
    kind = meta.get("checkpoints_are", "")
    return (
        f"{len(entries)} checkpoint{'s' if len(entries) != 1 else ''}"
        + (f" ({esc(str(kind))})" if kind else "")
        + (
            f" of a model with {esc(_fmt(meta['parameters']))} trainable parameters"
            if "parameters" in meta
            else ""
        )
        + (
            f", loss {esc(str(meta['loss']))}(reduction='{esc(str(meta.get('reduction')))}')"
            if "loss" in meta
            else ""
        )
        + (f" on {esc(_fmt(meta['examples']))} examples" if "examples" in meta else "")
        + ". Values are those of the objective L on all the analysed examples; ± is one standard "
        "error (Tr(H), B_noise, tr(HΣ)) or the Lanczos residual bound (λ_max, the sharpness), "
        "and an estimate without a valid one says so; the definitions are below."
    )


def render_html(report: Any, figures: list[tuple[str, str]]) -> str:
    """The page of ``report`` with the saved ``figures`` (``(file name, title)`` pairs)."""
    esc = html.escape
    entries = report.entries
    meta = report.meta
    head = "".join(f"<th>{esc(str(e['label']))}</th>" for e in entries)
    names = _row_names(entries)
    rows = "".join(
        f"<tr>{_quantity_cell(n)}"
        + "".join(f"<td>{esc(_value(e, n))}</td>" for e in entries)
        + "</tr>"
        for n in names
    )
    intro = _intro(entries, meta)
    errors = "".join(
        f"<li>{esc(str(e['label']))}: <code>{esc(k)}</code>: {esc(v)}</li>"
        for e in entries
        for k, v in e.get("errors", {}).items()
    )
    failed = (
        f"<h2>Failed quantities</h2><p>These were asked for but could not be computed; the "
        f"table omits them.</p><ul>{errors}</ul>"
        if errors
        else ""
    )
    imgs = "".join(
        f"<h2>{esc(t)}</h2><figure><img src='{esc(f)}' alt='{esc(t)}' style='max-width:100%'>"
        f"<figcaption>{esc(_CAPTIONS.get(f, ''))}</figcaption></figure>"
        for f, t in figures
    )
    if figures and _has_non_finite([entries, report.histories]):
        imgs = f"<p>{esc(_NON_FINITE_NOTE)}</p>" + imgs
    meta_rows = "".join(
        f"<tr><td>{esc(_META.get(str(k), str(k)))}</td><td>{esc(_fmt(v))}</td></tr>"
        for k, v in meta.items()
        if k != "layer_types"
    )
    defined = names + (
        ["spectral_density"]
        if any(e.get("arrays", {}).get("spectral_density") for e in entries)
        else []
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>curvlab report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;line-height:1.4}"
        "td,th{padding:2px 8px;text-align:right;vertical-align:top}"
        "td:first-child,th:first-child{text-align:left}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}"
        ".sym{color:#555;font-family:serif}dt{font-weight:bold;margin-top:0.6em}"
        "figcaption{color:#444;font-size:0.9em}td.txt{text-align:left}table.meta td{text-align:left}</style>"
        "</head><body><h1>curvlab report</h1>"
        f"<p>{intro}</p>{_demo(meta)}"
        f"<table><tr><th>quantity</th>{head}</tr>{rows}</table>"
        + failed
        + _runs(report.histories)
        + _nqm(report)
        + imgs
        + _definitions(defined)
        + f"<h2>How it was measured</h2><table class='meta'>{meta_rows}</table></body></html>"
    )
