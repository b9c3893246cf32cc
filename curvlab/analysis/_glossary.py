"""What each reported quantity is, in words: names, symbols, definitions, scaling, estimates.

The report (:mod:`curvlab.analysis._report`) and its figures (:mod:`curvlab.analysis._plotting`)
read this table, so that every number a reader sees comes with its definition, how it scales with
the loss's reduction, whether it is exact or an estimate (and what its ± means), and a link to
the documentation page that derives it.

Example:
    >>> describe("trace_hessian").symbol
    'Tr(H)'
    >>> describe("my_extra").title  # unknown keys still get a readable entry
    'my extra'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Quantity",
    "QUANTITY_INFO",
    "describe",
    "STDERR_KEYS",
    "as_number",
    "uncertainty",
    "top_residual",
    "nqm_in_examples",
    "nqm_probe_spread",
]

# M, the loss terms, as docs/conventions.md counts them (found in review: the linear scaling said
# "N times larger for N examples", but a sequence model's factor is its scored tokens)
_TERMS = (
    "M the number of loss terms: N for N examples, N × outputs for MSE/BCE with several "
    "outputs, the scored tokens (labels not ignore_index) for sequence models"
)
_MEAN_SUM = (
    "of the objective L: under reduction='mean' the mean over the loss terms, under 'sum' their "
    f"total, M times the 'mean' value, {_TERMS}"
)
_MEAN_SUM_SQ = (
    "of the objective L: under reduction='sum' M² times the 'mean' value (it is quadratic in L), "
    + _TERMS
)
_MEAN_SUM_EMP = (
    "of the objective L as defined in docs/conventions.md: under reduction='sum' the empirical "
    "Fisher of the total, M²/N times the 'mean' one (which weighs the per-example gradients' "
    f"outer products by N/M²), N the examples and {_TERMS}; N times for one loss term per example"
)


@dataclass(frozen=True)
class Quantity:
    """One reported quantity.

    Attributes:
        title: a readable name.
        symbol: the short symbol used on axes.
        definition: what it is.
        scaling: how it depends on the reduction (or that it does not).
        estimate: ``"exact"`` or how it is estimated and what its ± means.
        doc: the docs page and anchor that derives it (relative to ``docs/``).
    """

    title: str
    symbol: str
    definition: str
    scaling: str
    estimate: str
    doc: str


_ANALYSIS = "analysis.md#quantities-curvlabanalysis_measurespy-one-registered-function-each"
_SHARPNESS = "analysis.md#sharpness-in-the-loop-the-edge-of-stability-and-the-critical-batch-size"

QUANTITY_INFO: dict[str, Quantity] = {
    "loss": Quantity(
        "loss",
        "L",
        "the objective loss_fn(model(X), y) on all the analysed examples",
        _MEAN_SUM,
        "exact",
        _ANALYSIS,
    ),
    "grad_norm": Quantity(
        "gradient norm",
        "‖∇L‖",
        "Euclidean norm of the gradient of L with respect to all trainable parameters (per "
        "layer: of that layer's parameters)",
        _MEAN_SUM,
        "exact",
        _ANALYSIS,
    ),
    "trace_hessian": Quantity(
        "trace of the Hessian",
        "Tr(H)",
        "sum of the eigenvalues of H = ∇²L, the Hessian of L (a measure of overall sharpness)",
        _MEAN_SUM,
        "Hutchinson estimate E[zᵀHz] with Rademacher probes z; ± one standard error over probes",
        "estimators.md#trace-estimators-cltrace",
    ),
    "trace_fisher": Quantity(
        "trace of the Fisher",
        "Tr(F)",
        "trace of the Monte-Carlo Fisher: w Σ_n ‖∇NLL_n(ŷ_n)‖² with one label ŷ_n drawn from the "
        "model per example and w the loss's weight (1/M under reduction='mean', 1 under 'sum'; "
        "L = w Σ_n NLL_n, docs/conventions.md) (its expectation is the trace of the Gauss-Newton "
        "matrix; Jastrzębski et al.'s Tr(F))",
        _MEAN_SUM,
        "Monte-Carlo over the sampled labels (one draw per example); this pass computes no "
        "standard error (cl.fisher_trace gives one)",
        _ANALYSIS,
    ),
    "trace_fisher_batch": Quantity(
        "Tr(F) batch proxy",
        "Tr(F^B)",
        "‖∇L(x, ŷ)‖² at B = N: the squared norm of one gradient of L over all the analysed "
        "examples (N, 'examples analysed' below; a DataLoader's batches are summed into it, not "
        "averaged) at labels ŷ drawn from the model, one per example: Jastrzębski et al.'s cheap "
        "proxy of Tr(F), whose value depends on B. Its expectation is w Tr(F), w the loss's "
        "weight (E[∇NLL_n(ŷ_n)] = 0 cancels the cross terms): Tr(F)/N under reduction='mean' "
        "with one loss term per example (Tr(F)/M for M terms), Tr(F) under 'sum'. The same name "
        "elsewhere is another B: Diagnostics' trace_fisher_batch is this at the step's batch "
        "(its first max_examples where set), cl.fisher_trace(...).batch_value the mean over the "
        "data's batches of each batch's value; compare them only at equal B",
        _MEAN_SUM_SQ,
        "one Monte-Carlo draw of the labels; no standard error",
        _ANALYSIS,
    ),
    "trace_empirical_fisher": Quantity(
        "trace of the empirical Fisher",
        "Tr(F_emp)",
        "(1/N) Σ_n ‖g_n‖², g_n the gradient of example n's share of L at its data label (under "
        "'sum': Σ_n ‖s_n‖², s_n the gradient of example n's term of the sum)",
        _MEAN_SUM_EMP,
        "exact",
        _ANALYSIS,
    ),
    "noise_scale": Quantity(
        "gradient noise scale",
        "B_simple",
        "tr(Σ)/‖ḡ‖² (McCandlish et al., 2018), Σ the covariance of the per-example gradients g_n "
        "and ḡ their mean: about the batch size beyond which larger batches stop paying off; inf "
        "where ‖ḡ‖² = 0 < tr(Σ), not given where every g_n is 0 (0/0)",
        "in examples; the same under 'mean' and 'sum' (mean-convention gradients)",
        "a ratio of sample statistics of the data given (biased for few examples); no standard "
        "error",
        "quantities.md#gradient-statistics",
    ),
    "trace_covariance": Quantity(
        "trace of the gradient covariance",
        "tr(Σ)",
        "(1/N) Σ_n ‖g_n − ḡ‖²: the total variance of the per-example gradients (mean convention)",
        "the same under 'mean' and 'sum'",
        "exact for the data given",
        "quantities.md#gradient-statistics",
    ),
    "top_eigenvalues": Quantity(
        "largest Hessian eigenvalues",
        "λ_max(H)",
        "the k largest (algebraic) eigenvalues of the Hessian ∇²L, by Lanczos; the table shows "
        "the largest",
        _MEAN_SUM,
        "Lanczos; ± the residual norm ‖Hy − λy‖ of the Ritz pair, a bound on the error of λ; "
        "a run that does not converge is a failure, never a rough value",
        "estimators.md#eigenvalues-cleigenvalues",
    ),
    "spectral_density": Quantity(
        "Hessian spectral density",
        "φ(λ)",
        "the distribution of the Hessian's eigenvalues, smoothed by Gaussians",
        _MEAN_SUM + " (the eigenvalues scale, the density integrates to 1)",
        "stochastic Lanczos quadrature averaged over the SLQ probes",
        "estimators.md#spectral-density-clspectral_density",
    ),
    "fisher_frobenius": Quantity(
        "Frobenius norm of the empirical Fisher",
        "‖F‖_F",
        "the square root of the sum of the squares of all entries of the empirical Fisher matrix",
        _MEAN_SUM_EMP,
        "exact (from the Gram matrix of per-example gradients)",
        "quantities.md#frobenius-norms-of-the-full-and-the-diagonal-fisher",
    ),
    "fisher_diag_frobenius": Quantity(
        "Frobenius norm of the empirical Fisher's diagonal",
        "‖diag F‖_F",
        "the Euclidean norm of the diagonal of the empirical Fisher (what diagonal methods see)",
        _MEAN_SUM_EMP,
        "exact",
        "quantities.md#frobenius-norms-of-the-full-and-the-diagonal-fisher",
    ),
    "noise_scale_dp": Quantity(
        "gradient noise scale from data-parallel ranks",
        "B_simple (DP)",
        "McCandlish et al.'s B_simple estimated from the plain gradients of the ranks' shards",
        "in examples",
        "ratio of unbiased estimates of tr(Σ) and ‖ḡ‖² from the ranks' and the whole batch's "
        "gradients (consistent, not unbiased), the plain ratio whatever their signs (negative "
        "where an estimate is, not given where the ‖ḡ‖² estimate is 0); no standard error",
        "analysis.md#quantities-curvlabanalysis_measurespy-one-registered-function-each",
    ),
    "trace_covariance_dp": Quantity(
        "gradient covariance trace from data-parallel ranks",
        "tr(Σ) (DP)",
        "tr(Σ) estimated from the ranks' plain gradients",
        "per example",
        "unbiased estimate from two batch sizes",
        _ANALYSIS,
    ),
    "grad_norm_sq_dp": Quantity(
        "squared gradient norm from data-parallel ranks",
        "‖ḡ‖² (DP)",
        "‖ḡ‖² estimated without the noise bias from the ranks' plain gradients",
        "per example",
        "unbiased estimate from two batch sizes",
        _ANALYSIS,
    ),
    "sharpness": Quantity(
        "sharpness",
        "λ_max(H)",
        "the largest eigenvalue of the Hessian H = ∇²L at the current parameters, by Lanczos: "
        "in Diagnostics warm-started from the previous measurement's top eigenvectors (cold with "
        "sharpness_vectors=0), in analyze cold at every checkpoint (Cohen et al., 2021: under "
        "gradient descent it rises to 2/η and hovers there, the edge of stability)",
        _MEAN_SUM,
        "Lanczos to a relative residual of 1e-3 (sharpness_tol); ± the residual norm "
        "‖Hy − λy‖ of the Ritz pair (sharpness_residual), a bound on the error of λ; "
        "sharpness_hvps counts the Hessian products",
        _SHARPNESS,
    ),
    "sharpness_residual": Quantity(
        "residual bound of the sharpness",
        "‖Hy − λy‖",
        "the residual norm ‖Hy − λy‖ of the Ritz pair (λ, y) Lanczos returned for λ_max(H): "
        "a bound on |λ − λ_true| for some eigenvalue λ_true of H (shown as the ± of the "
        "sharpness)",
        _MEAN_SUM,
        "exact (of the Ritz pair)",
        _SHARPNESS,
    ),
    "sharpness_hvps": Quantity(
        "Hessian products of the sharpness",
        "HVPs (λ_max)",
        "the number of Hessian-vector products Lanczos took to reach sharpness_tol (its cost: "
        "about one backward pass each)",
        "a count, independent of the reduction",
        "exact",
        _SHARPNESS,
    ),
    "sharpness_threshold": Quantity(
        "stability threshold of the sharpness",
        "2/η",
        "the largest curvature (momentum) SGD is stable on: 2/η; (2+2β)/((1−τ)η) with momentum β "
        "and dampening τ; (2+2β)/((1+β+β(1−τ))η) with Nesterov momentum; each less the weight "
        "decay wd (the step descends H + wd·I; the largest of the groups' decays). None when the "
        "param groups holding a trainable parameter differ in lr, momentum, dampening or "
        "nesterov, when the optimizer does not step every trainable parameter (a second "
        "optimizer, a group at lr = 0), under maximize=True and at lr = 0",
        "of the optimizer's hyper-parameters only (compare it with λ_max(H) of the same reduction)",
        "exact",
        _SHARPNESS,
    ),
    "preconditioned_sharpness": Quantity(
        "preconditioned sharpness",
        "λ_max(P⁻¹H)",
        "the largest eigenvalue of P⁻¹H with Adam's preconditioner after its last step t, "
        "P = (1−β₁ᵗ)(diag(√(v_t/(1−β₂ᵗ))) + ε), on the parameters the optimizer steps (groups "
        "at lr = 0 left out; another group's lr η_g scales its P by η/η_g, η the first "
        "measured group's); with Adam's coupled "
        "weight decay (Adam(weight_decay=wd)) that of P⁻¹(H + wd·I), the Hessian of the "
        "objective its step descends (Cohen et al., 2022: it hovers at (2+2β₁)/((1−β₁)η))",
        _MEAN_SUM,
        "Lanczos on P^-1/2 H P^-1/2 to a relative residual of 1e-3, warm-started from the "
        "previous measurement's top eigenvectors (Diagnostics only; cold with "
        "sharpness_vectors=0); ± the residual norm of the Ritz pair "
        "(preconditioned_sharpness_residual), a bound on the error of λ",
        _SHARPNESS,
    ),
    "preconditioned_sharpness_residual": Quantity(
        "residual bound of the preconditioned sharpness",
        "‖Ay − λy‖",
        "the residual norm ‖Ay − λy‖ of the Ritz pair Lanczos returned for λ_max(P⁻¹H), "
        "A = P^-1/2 H P^-1/2: a bound on the error of λ (shown as its ±)",
        _MEAN_SUM,
        "exact (of the Ritz pair)",
        _SHARPNESS,
    ),
    "preconditioned_sharpness_hvps": Quantity(
        "Hessian products of the preconditioned sharpness",
        "HVPs (λ_max(P⁻¹H))",
        "the number of Hessian-vector products Lanczos took for λ_max(P⁻¹H)",
        "a count, independent of the reduction",
        "exact",
        _SHARPNESS,
    ),
    "preconditioned_sharpness_threshold": Quantity(
        "stability threshold of Adam",
        "(2+2β₁)/((1−β₁)η)",
        "the largest preconditioned curvature Adam with a frozen preconditioner is stable on: "
        "(2+2β₁)/((1−β₁)η) (38/η for β₁ = 0.9), with AdamW's decoupled weight decay λ "
        "(1+β₁)(2−ηλ)/((1−β₁)η); η of the first param group at lr > 0 holding a measured "
        "parameter, each group's own β₁ (the smallest bound); none under "
        "maximize=True and at lr = 0",
        "of the optimizer's hyper-parameters only",
        "exact",
        _SHARPNESS,
    ),
    "critical_sharpness": Quantity(
        "critical sharpness",
        "λ_c = 2/η_c",
        "2/η_c with η_c the smallest step size along the optimizer's next update at which the "
        "batch loss rises (Kalra et al., 2026); dᵀHd/gᵀd on a quadratic with update −ηd",
        _MEAN_SUM,
        "forward passes only: a warm-started bracket and false position to 1% of η_c "
        "(critical_tol)",
        _SHARPNESS,
    ),
    "critical_sharpness_forwards": Quantity(
        "forward passes of the critical sharpness",
        "forwards (λ_c)",
        "the number of forward passes the search for η_c took",
        "a count, independent of the reduction",
        "exact",
        _SHARPNESS,
    ),
    "critical_sharpness_threshold": Quantity(
        "threshold of the critical sharpness",
        "2/η",
        "the optimizer's step raises the batch loss exactly when λ_c exceeds 2/η (η of the "
        "first param group at lr > 0 holding a parameter the update moves)",
        "of the learning rate only",
        "exact",
        _SHARPNESS,
    ),
    "noise_scale_hessian": Quantity(
        "Hessian-weighted gradient noise scale",
        "B_noise",
        "tr(HΣ)/(GᵀHG) (McCandlish et al., 2018), Σ the covariance of the per-example gradients, "
        "G their mean, H the Hessian: the critical batch size of a quadratic model of the loss",
        "in examples; the same under 'mean' and 'sum' (mean-convention gradients)",
        "tr(HΣ) by random-sign combinations of per-example gradients (unbiased; num_probes "
        "probes, one backward pass and one Hessian product each); ± one standard error",
        _SHARPNESS,
    ),
    "noise_scale_hessian_hvps": Quantity(
        "Hessian products of B_noise",
        "HVPs (B_noise)",
        "the number of Hessian-vector products B_noise took: one per probe of tr(HΣ) and one "
        "for GᵀHG",
        "a count, independent of the reduction",
        "exact",
        _SHARPNESS,
    ),
    "trace_hessian_covariance": Quantity(
        "Hessian-weighted gradient covariance",
        "tr(HΣ)",
        "tr(HΣ) with H the Hessian of the mean loss and Σ the per-example gradient covariance",
        "the same under 'mean' and 'sum' (mean convention)",
        "unbiased random-sign estimate (see B_noise); ± one standard error over its probes "
        "(trace_hessian_covariance_stderr)",
        _SHARPNESS,
    ),
    "grad_hessian_grad": Quantity(
        "curvature along the gradient",
        "GᵀHG",
        "the mean gradient's curvature GᵀHG, H the Hessian of the mean loss",
        "the same under 'mean' and 'sum' (mean convention)",
        "exact (one Hessian product)",
        _SHARPNESS,
    ),
    "train_accuracy": Quantity(
        "training accuracy",
        "train acc.",
        "fraction of the training examples the model classifies correctly (the analysed run: "
        "the first seed's when several were trained)",
        "a fraction in [0, 1]",
        "exact",
        "analysis.md#the-curvlab-command",
    ),
    "test_accuracy": Quantity(
        "test accuracy",
        "test acc.",
        "fraction of held-out examples the model classifies correctly (the analysed run: the "
        "first seed's when several were trained)",
        "a fraction in [0, 1]",
        "exact",
        "analysis.md#the-curvlab-command",
    ),
    "test_accuracy_mean": Quantity(
        "test accuracy, mean over seeds",
        "test acc. (mean)",
        "the test accuracy averaged over the runs of every seed (curvlab demo --seeds)",
        "a fraction in [0, 1]",
        "exact (of those runs)",
        "analysis.md#the-curvlab-command",
    ),
    "test_accuracy_std": Quantity(
        "test accuracy, spread over seeds",
        "test acc. (std)",
        "the sample standard deviation (n - 1) of the test accuracy over the seeds' runs",
        "a fraction",
        "exact (of those runs)",
        "analysis.md#the-curvlab-command",
    ),
    "generalization_gap": Quantity(
        "generalisation gap",
        "gap",
        "training accuracy minus test accuracy",
        "a difference of fractions",
        "exact",
        "analysis.md#the-curvlab-command",
    ),
}

STDERR_KEYS = {
    "trace_hessian": "trace_hessian_stderr",
    "noise_scale_hessian": "noise_scale_hessian_stderr",
    "trace_hessian_covariance": "trace_hessian_covariance_stderr",
    "sharpness": "sharpness_residual",
    "preconditioned_sharpness": "preconditioned_sharpness_residual",
}
"""Values reported as ``key ± values[STDERR_KEYS[key]]`` (the stderr key is not a row of its own):
one standard error, or for the sharpness the Lanczos residual bound (as for ``λ_max``)."""

_RESIDUAL_BOUNDS = frozenset({"sharpness", "preconditioned_sharpness", "top_eigenvalues"})
"""The quantities whose ± is a Lanczos residual bound, not a standard error."""

_NON_FINITE_TEXT = ("inf", "-inf", "nan")  # how report.json writes non-finite floats


def as_number(v: Any) -> float | None:
    """A report value as a float (possibly inf or NaN; also the strings ``"inf"``, ``"-inf"``,
    ``"nan"`` of a loaded report.json), ``None`` if it is no number (missing, a bool, text).

    Example:
        >>> as_number("nan") != as_number("nan"), as_number(3), as_number(None)
        (True, 3.0, None)
    """
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in _NON_FINITE_TEXT:
        return float(v)
    return None


def top_residual(entry: dict[str, Any]) -> Any:
    """λ_max's ± in a report entry: the first Lanczos residual bound of ``top_eigenvalues``
    (``None`` where there is none; as stored, possibly non-finite or its ``"nan"`` text)."""
    residuals = (entry.get("arrays", {}).get("top_eigenvalues") or {}).get("residuals")
    return residuals[0] if isinstance(residuals, list) and residuals else None


def uncertainty(name: str, value: Any, pm: Any) -> tuple[float | None, str]:
    """The ± of the value ``value`` of ``name`` (given as ``pm``): ``(pm, "")`` where it is
    finite; ``(None, note)`` where ``name`` is an estimate (:data:`STDERR_KEYS`, ``λ_max``) of a
    finite value whose ± is missing or not finite, the note saying so
    (``" (no valid standard error)"``); ``(None, "")`` where no ± applies. A value printed
    without its ± read as exact (found in review: Tr(H) = 12 with a NaN standard error printed
    "12", λ_max "4 ± nan").

    Example:
        >>> uncertainty("trace_hessian", 12.0, float("nan"))
        (None, ' (no valid standard error)')
        >>> uncertainty("top_eigenvalues", 4.0, 0.5)
        (0.5, '')
    """
    if name not in STDERR_KEYS and name not in _RESIDUAL_BOUNDS:
        return None, ""
    x = as_number(value)
    if x is None or not math.isfinite(x):
        return None, ""  # the value itself says it is no estimate to trust
    e = as_number(pm)
    if e is not None and math.isfinite(e):
        return e, ""
    what = "residual bound" if name in _RESIDUAL_BOUNDS else "standard error"
    return None, f" (no valid {what})"


def describe(name: str) -> Quantity:
    """The entry of ``name``, or a plain one for a quantity the table does not know."""
    if name in QUANTITY_INFO:
        return QUANTITY_INFO[name]
    plain = name.replace("_", " ")
    return Quantity(plain, plain, "(no description)", "", "", "analysis.md")


def nqm_in_examples(curve: dict[str, Any], prediction: dict[str, Any] | None, form: str) -> str:
    """An NQM curve's critical batch size in examples, put into ``form`` (``"{}"`` is replaced),
    or ``""`` when the prediction does not know the loss terms per example.

    The NQM's batch counts loss terms (tokens for sequence models), ``B_simple`` and ``B_noise``
    count examples: every place that shows the NQM's value states its unit.

    Example:
        >>> curve = {"critical_batch_size": 762.3, "critical_batch_size_examples": 205.2}
        >>> nqm_in_examples(curve, {"terms_per_example": 3.714}, " ({})")
        ' (205.2 examples at 3.714 loss terms per example)'
        >>> nqm_in_examples({"critical_batch_size_examples": 8.0}, {"terms_per_example": 1}, "{}")
        '8 examples at one loss term per example'
        >>> nqm_in_examples({"critical_batch_size": 8.0}, {"terms_per_example": None}, " ({})")
        ''
    """
    examples = curve.get("critical_batch_size_examples")
    terms = (prediction or {}).get("terms_per_example")
    if examples is None or terms is None:
        return ""
    per = "one loss term" if terms == 1 else f"{_short(terms)} loss terms"
    return form.format(f"{_short(examples)} examples at {per} per example")


def nqm_probe_spread(
    curve: dict[str, Any], prediction: dict[str, Any] | None, count: bool = True
) -> str | None:
    """The single SLQ probes' own critical batch sizes of an NQM curve, in words: ``"1024 to
    2048 (4 probes)"``, with ``"; k of n probes give a prediction (the others saw no positive
    curvature)"`` where some have none, ``"no single probe gives a prediction (none saw
    positive curvature)"`` where none has; ``None`` for a prediction from one probe (``count``:
    whether an all-probe range names the number of probes). Probes
    without a prediction were left out of the range without a word (found in review: [nan, nan,
    1024, nan] read "1024 to 1024 (4 probes)").

    Example:
        >>> nan = float("nan")
        >>> curve = {"critical_batch_size_per_probe": [nan, 512.0, 1024.0, nan],
        ...          "critical_batch_size_range": [512.0, 1024.0]}
        >>> nqm_probe_spread(curve, {"num_probes": 4})
        '512 to 1024; 2 of 4 probes give a prediction (the others saw no positive curvature)'
    """
    per = curve.get("critical_batch_size_per_probe")
    spread = curve.get("critical_batch_size_range")
    n = (prediction or {}).get("num_probes")
    if isinstance(per, list):
        n = len(per)
        given = [x for x in (as_number(v) for v in per) if x is not None and math.isfinite(x)]
    else:
        given = None
    if not isinstance(n, int) or n < 2:
        return None
    if given is not None and not given or given is None and not spread:
        return "no single probe gives a prediction (none saw positive curvature)"
    low, high = (min(given), max(given)) if given else (spread[0], spread[1])
    text = f"{_short(low)} to {_short(high)}"
    if given is not None and len(given) < n:
        if len(given) == 1:
            return (
                f"{_short(low)}; 1 of {n} probes gives a prediction (the others saw no positive "
                "curvature)"
            )
        return (
            f"{text}; {len(given)} of {n} probes give a prediction (the others saw no positive "
            "curvature)"
        )
    return f"{text} ({n} probes)" if count else text


def _short(v: Any) -> str:
    """A number as the report prints it (4 significant digits; strings, e.g. ``"inf"`` of a
    loaded report.json, as they are)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
