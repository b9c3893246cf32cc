"""Full-Fisher noise without per-example gradients (Wen et al., Eq. 5 and appendix A.9).

Conventions (:mod:`curvlab._losses`): ``L = w * sum_n NLL_n``, ``w = 1/(N c)`` ("mean") or 1 ("sum");
``e = 1/(N c^2)`` ("mean") or 1 ("sum") is the weight of the empirical Fisher
``F_emp = e * sum_n grad NLL_n grad NLL_n^T`` (docs/conventions.md: ``(1/N) sum_n g_n g_n^T`` with
``g_n = grad NLL_n / c`` under "mean"). Both kinds cost one backward pass of a weighted loss:

``kind="true"``:  ``eps = scale * sqrt(w) * grad_theta sum_n NLL_n(y_hat_n)``, ``y_hat_n ~ p(y|x_n)``.
    Proof that ``Cov(eps) = scale^2 * GGN(L)`` exactly: write ``s_n = grad NLL_n(y_hat_n) =
    J_n^T r_n`` with ``r_n = d NLL_n / d f_n``. The labels are independent across examples, and for
    these likelihoods ``E[r_n] = 0`` (the score has mean zero) and ``E[r_n r_n^T] = d^2 NLL_n / d f_n^2``
    (Fisher identity of the categorical/Bernoulli likelihood in its logits and of the Gaussian with
    variance 1/2 used for MSE, ``Cov(2 (f - y_hat)) = 4 * I/2 = 2 I``). Hence ``E[eps] = 0`` and
    ``Cov(eps) = scale^2 w sum_n J_n^T E[r_n r_n^T] J_n = scale^2 * w * sum_n GGN(NLL_n)
    = scale^2 * GGN(L)``. The GGN is the true Fisher of these losses (and the expectation of the
    MC Fisher); no per-example gradient is formed.

``kind="empirical"``: ``eps = scale * sqrt(e) * grad_theta sum_n r_n NLL_n(y_n)`` with Rademacher
    ``r_n`` (Wen et al., A.9). Given the batch, ``E[eps] = 0`` and ``Cov(eps) =
    scale^2 e sum_n grad NLL_n grad NLL_n^T = scale^2 * F_emp`` exactly, since ``E[r_n r_m] =
    delta_nm``.

Inside :class:`~curvlab.noise.NoisyOptimizer`'s capturing step the same vectors are folded into the
user's own backward pass, at no extra pass over the model: when the loss is called, the noise's
gradient at the loss input is computed there (a gradient of the loss alone, on a detached copy)
and added to the gradient that reaches that point in the backward pass, multiplied by a
GradScaler's scale. For ``"true"``: ``scale * sqrt(w) * d NLL(f, y_hat) / d f`` at the loss input
(labels drawn per row). For ``"empirical"``: ``coef * w * r_n * d NLL_n / d z_n`` at the model
output ``z`` (``coef = scale * sqrt(e) / w``: ``scale * sqrt(N)`` under "mean", ``scale`` under
"sum"), one sign per example (the output's first axis), so that a loop may flatten, shift or
select tokens (``loss_fn(logits[mask], y[mask])``) between the output and the loss; on the loss
input's rows a selection of tokens would have given each token its own sign. The addition is
made once, in a backward pass that builds no graph (a penalty's inner gradient passes
untouched), so other terms of the loss keep their own gradients.

The gradient at the fold is ``k S`` times the loss's, ``S`` a GradScaler's scale (which its
``unscale_`` takes off ``.grad`` again) and ``k`` a factor the loop puts on the loss (``0.25 *
loss``, ``loss / accumulation_steps``), which stays in ``.grad``: the noise must be multiplied by
``S`` alone. ``k`` is the loop's word (``loss_factor=``), which must be the factor the loss
actually carries: where the backward pass's roots show it without a host synchronisation
(Python numbers and one-element CPU tensors the loss is multiplied or divided by, an explicit
gradient for the root, no factor at all: :func:`curvlab.noise._roots._loss_gradient`) a stated
factor it contradicts is a ``ValueError`` before the pass runs (:func:`check_loss_factor`;
before review s22 the noise was silently scaled by their ratio), and where it does not (a factor
in a tensor on an accelerator) the stated factor is trusted. Not told, the fold reads the
backward pass's roots (:func:`curvlab.noise._roots._loss_gradient`) and folds only where the
loss output's gradient is a GradScaler's scale alone (``k`` exactly 1, also ``loss / 1``). A step with another
factor draws in the separate pass (the one ``step(inputs=, targets=)`` runs; the fold scaled the
noise by the factor before), and where that pass cannot rebuild the loss input (shifted tokens)
the error names the factor and ``loss_factor=``. A module backward hook of the user's on the model
would act on the folded noise too: such a step also draws in the separate pass
(:meth:`FullFisherNoise.capture`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import num_examples
from curvlab._finite import NonFiniteError
from curvlab._losses import LossSpec, check_counted, loss_spec
from curvlab._notrace import buffer_snapshot, each_forward_on, user_backward_hook
from curvlab._precision import accumulation_dtype, upcast
from curvlab.noise._base import (
    KindedSampler,
    check_batch,
    ddp_reduces,
    folded_noise_reduced,
    objective_gradient,
)
from curvlab.noise._capture import Taps

__all__ = ["FullFisherNoise"]

_KINDS = ("true", "empirical")


def rademacher(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``n`` independent signs ``+-1`` on ``like``'s device and dtype."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def check_accumulation(taps: Taps) -> None:
    """Refuse to fold noise into a backward pass that adds to non-zero gradients already there,
    unless the loop said by what factor it scales the loss (gradient accumulation: ``loss /
    steps``). Called in the backward pass, before this pass has written any ``.grad``; only
    ``.grad`` tensors left in place (accumulation, ``zero_grad(set_to_none=False)``) are read,
    with one host synchronisation (none after the default ``zero_grad()``)."""
    if taps.loss_factor is not None:
        return
    grads = [p.grad for p in taps.model.parameters() if p.requires_grad and p.grad is not None]
    if grads and bool(torch.stack([g.ne(0).any() for g in grads]).any()):
        raise RuntimeError(
            "FullFisherNoise folds its noise into this step's backward pass, and the gradients "
            "already hold earlier backward passes (gradient accumulation?): the noise would be "
            "scaled by whatever factor the loop puts on this loss (loss / accumulation_steps). "
            "Say it: `with noisy.capture(loss_factor=1 / accumulation_steps):` around the last "
            "micro-batch"
        )


def check_loss_factor(stated: float, found: tuple[float, float] | None) -> None:
    """Refuse a ``loss_factor=`` that the step's autograd graph contradicts, before its backward
    pass runs.

    The fold multiplies the noise by the gradient at the loss output (``k S``: the factor ``k``
    the loss actually carries, a GradScaler's scale ``S``) divided by the stated factor, so a
    stated factor other than ``k`` scales the noise by ``k / stated`` (its covariance by the
    square) without a word: the ``1 / accumulation_steps`` of docs/training-loops.md stated for
    a token-weighted accumulation loop (``loss * n_i / N``) gave ``E|eps|^2`` 0.0461 for the
    documented ``scale^2 Tr(F_emp)`` 0.512, a loop that sums the micro-batch means but states
    ``1 / k`` 4.61 (found in review s22). ``found``: ``(k, rounding)`` read off the graph by
    :func:`curvlab.noise._roots._loss_gradient` (constants that are Python numbers or CPU tensors
    of one element, an explicit gradient for the root; the GradScaler's product passed unread),
    or ``None`` where the graph does not show it without a host synchronisation (a factor held
    in a tensor on an accelerator, HuggingFace's ``num_items_in_batch`` there, the loss used
    twice): the stated factor is trusted then. The two agree within a relative ``1e-6`` plus the
    rounding of the tensors read (a factor held in a 16-bit tensor); a sign is no disagreement
    (``-loss``: the noise's sign flips, its covariance is the same).

    Raises:
        ValueError: ``|k|`` and ``stated`` differ.
    """
    if found is None:
        return
    k, rounding = found
    if math.isfinite(k) and abs(abs(k) - stated) <= (1e-6 + rounding) * max(abs(k), stated):
        return
    ratio = abs(k) / stated
    raise ValueError(
        f"FullFisherNoise folds its noise into this step's backward pass, told by loss_factor="
        f"{stated:.6g} that the loop multiplies the loss by {stated:.6g}, but the autograd graph "
        f"shows the pass gives the loss output the gradient {k:.6g} (times a GradScaler's scale): "
        f"the folded noise would be {ratio:.6g}x the documented one (its covariance "
        f"{ratio * ratio:.6g}x). State the factor the loss actually carries, "
        f"`noisy.capture(loss_factor={abs(k):.6g})` (a token-weighted accumulation loop, "
        "loss * n_i / N, carries n_last / N on the captured last micro-batch, not 1 / "
        "accumulation_steps; a loop that adds the micro-batches' means undivided carries 1), "
        "or leave loss_factor out on a step without gradient accumulation (a factor on the "
        "loss then sends the step to a separate pass). A loss scaler other than torch's "
        "GradScaler (or FSDP's ShardedGradScaler) multiplying the loss by a number counts as a "
        "factor here: FullFisherNoise cannot fold under it, leave loss_factor out"
    )


class FullFisherNoise(KindedSampler):
    """Noise with the full Fisher as covariance, one backward pass per sample.

    ``kind="true"``: mean zero and covariance exactly ``scale**2 * G`` with ``G`` the GGN (true
    Fisher) of the objective on the batch, taken over labels drawn from the model. ``kind=
    "empirical"``: given the batch, mean zero and covariance exactly ``scale**2 * F_emp``, the
    empirical Fisher of docs/conventions.md, from Rademacher-weighted per-example losses. The formulas and
    the proof are in :mod:`curvlab.noise._full`. The samples are sums of ``N`` independent terms, so
    close to, but not exactly, Gaussian. With the default Wen et al. scale this reproduces the
    small-batch gradient covariance (Eq. 5).

    Every sample needs its own backward pass, so nothing is cached (``recompute_every`` does not
    apply). Inside :class:`~curvlab.noise.NoisyOptimizer` the vector is folded into the training
    step's own backward pass (:meth:`capture`), which then assumes the loss being differentiated is
    ``loss_fn(model(inputs), targets)``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> eps = FullFisherNoise("true", scale=0.1).sample(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> eps["weight"].shape
        torch.Size([2, 3])
    """

    kinds = _KINDS
    default_kind = "true"

    reusable = False
    folds = True
    # one gradient of a batch objective: with a train-mode BatchNorm coupling the examples its
    # covariance is the batch's GGN (empirical Fisher) through that coupling, still exact
    per_example = False

    def _objective(
        self,
        spec: LossSpec,
        output: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
        fold: bool = False,
    ) -> Tensor:
        """``scale * sqrt(w) * sum NLL(y_hat)`` ("true") or ``scale * sqrt(e) * sum_n r_n NLL_n``.

        ``targets`` (optional for "true") mark ignored positions; ``w = 1/M`` and ``e = N/M^2``
        count the non-ignored tokens. ``fold``: inside a training step (:func:`_weight`).
        """
        coef, total = self._terms(spec, output, targets, generator, fold)
        return coef * total

    def _terms(
        self,
        spec: LossSpec,
        output: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
        fold: bool = False,
    ) -> tuple[Tensor | float, Tensor]:
        """:meth:`_objective` as ``(coefficient, sum)``; the weights in float32 at least.

        Raises:
            ValueError: every label ignored under ``"mean"``, unless ``fold`` (:func:`_weight`);
                a class index neither in ``[0, C)`` nor ``ignore_index``, unless ``fold``.
        """
        if targets is not None and not fold:
            # before the labels are drawn: "true" draws a class at every position not marked
            # ignore_index, so a void label 255 under ignore_index=-100 became a token of its own
            # (E|eps|^2 = 69.06 for a GGN trace of 20.93, found in review) where every other
            # sampler refuses it. One host synchronisation, in the separate pass only; folded
            # into a training step, the user's own loss call refuses such labels
            spec.check_classes(output, targets)
        n = output.shape[0]
        w = _weight(spec, output, targets, fold)
        if self.kind == "true":
            sampled = spec.sample_targets(output, generator, targets)
            return self.scale * w**0.5, spec.nll_sum(output, sampled, drawn=True)
        assert targets is not None
        signs = rademacher(n, generator, output)
        coef = self.scale * (w * w * n if spec.reduction == "mean" else w) ** 0.5
        return coef, (signs * spec.per_example_nll(output, targets)).sum()

    def estimate(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """One sample (dict name -> Tensor), from one forward and one backward pass of its own;
        float32 for 16-bit parameters (the gradient of the 16-bit backward pass, upcast).

        For a 16-bit output the sample is ``sqrt(coef)`` times the gradient of ``sqrt(coef) *
        sum`` (:meth:`_terms`): the gradient reaching the output is then not ``coef (p - y)``,
        which float16 holds as a subnormal (``"empirical"`` on a float16 model with one
        sequence of 65,536 tokens: 2.7% off).

        The forward runs on copies of the buffers a forward updates (norm statistics,
        ``spectral_norm``'s vectors, integer and boolean buffers of at most 64 KiB: call
        counters), as the call found them, and the model keeps its own: the separate pass of
        ``NoisyOptimizer.step(inputs=, targets=)`` leaves the training step's function as it was
        (before review s19 each sample left a call counter one further on, and a zero-scale
        noise trained another model than the plain loop).

        Reads at most two values on the host (:meth:`_terms`: the count of class indices out of
        range, and under ``"mean"`` the count of scored labels, :func:`_weight`): inside
        ``NoisyOptimizer.step`` that is on every step that draws in this pass, where the fold
        of :meth:`capture` reads none (docs/noise.md, "Host reads in a step").
        """
        loss_spec(loss_fn)
        check_batch(inputs, targets, needs_targets=self.kind == "empirical")
        roots: list[Tensor | float] = []

        def objective(spec: LossSpec, output: Tensor, labels: Tensor | None) -> Tensor:
            coef, total = self._terms(spec, output, labels, generator)
            if accumulation_dtype(output.dtype) == output.dtype:
                return coef * total
            roots.append(coef**0.5)
            return roots[0] * total

        with each_forward_on(model, buffer_snapshot(model.modules())):
            grads = objective_gradient(
                model, loss_fn, inputs, targets, objective, type(self).__name__
            )
        # float32 for 16-bit parameters, as every other sampler's draws (docs/training-loops.md:
        # never a silently 16-bit number; before review s18 they came back in bfloat16/float16);
        # NoisyOptimizer adds them to the 16-bit .grad, which rounds as any addition does
        if not roots:
            return {n: upcast(g) for n, g in grads.items()}
        return {n: upcast(g) * roots[0] for n, g in grads.items()}

    def draw(
        self, model: nn.Module, state: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The sample computed by :meth:`estimate` (each state is used once)."""
        return state

    def capture(self, model: nn.Module, loss_fn: nn.Module, generator: torch.Generator) -> Taps:
        """Fold the noise into the user's backward pass (see module docstring).

        The noise is added to a gradient in the backward pass, computed when the loss is called:
        ``"true"`` at the loss input (labels drawn per row); ``"empirical"`` at the model's output
        (one sign per example, its first axis), so that the loop may flatten, shift or select
        tokens between the output and the loss, or at the loss input when the output is not a
        Tensor (nor ``.logits``) with the examples first, whose rows must then be the examples
        or consecutive blocks of them (else a clear error). Additive, so other terms of the
        loss (a penalty, an auxiliary loss) keep their own gradients; a backward pass that builds
        a graph (a penalty's inner gradient) passes through untouched; the noise is added once.

        Not folded, drawn in the separate pass instead (``step(inputs=, targets=)``'s, exact):
        a step of a model with an embedding that has ``scale_grad_by_freq``, or with a module
        backward hook of the user's (``register_full_backward_hook``,
        ``register_full_backward_pre_hook``, the legacy ``register_backward_hook``, or a global
        one: :func:`curvlab._notrace.user_backward_hook`), which would act on the noise as on
        the step's gradient (a pre-hook doubling the last Linear's output gradient gave a noise
        covariance 4x the loss's Fisher, found in review s19); the separate pass runs without it.
        So is a step with a full backward hook (or pre-hook) on a module called between the
        model's output and the loss, outside the model (``loss_fn(post(model(x)), y)``: the
        capture finds it in the autograd graph and folds nothing): ``"true"`` folded its noise at
        the loss input, below the hook, 2.0x the separate pass's under a hook doubling
        ``grad_input`` (found in review s20); the separate pass does not call that module.
        So is a step whose loss carries a factor of 0 (or one that is not finite) found in the
        autograd graph (``loss * 0.0``, a warm-up weight of 0), also with ``loss_factor=``: the
        fold would scale the noise by it (:meth:`~curvlab.noise._capture.Taps.gradient_vanished`).

        The fold multiplies the noise by the gradient at the loss output over the stated
        ``loss_factor=``: a stated factor that the autograd graph contradicts (read without a
        host synchronisation, :func:`check_loss_factor`) raises a ``ValueError`` before the
        backward pass; one it does not show (a factor in a tensor on an accelerator) is trusted.

        Refused: a step whose forward runs through a ``DistributedDataParallel`` wrapper of the
        model over several processes (the model given to ``NoisyOptimizer`` unwrapped, under
        ``process_group="local"``; a DDP-wrapped one is refused when the ``NoisyOptimizer`` is
        made): DDP's all-reduce would average the folded noise over the ranks
        (:func:`~curvlab.noise._base.folded_noise_reduced`). The error comes in that forward,
        on every rank, before any backward pass.

        Raises:
            ValueError: in the step's backward call, a ``loss_factor=`` other than the factor
                the loss carries (:func:`check_loss_factor`); in the step's forward, a
                ``DistributedDataParallel`` wrapper of several processes around the model.
        """
        spec = loss_spec(loss_fn)
        # an embedding with scale_grad_by_freq divides its rows' gradients in the user's backward
        # pass, and would divide the folded noise too: such a step draws in the separate pass,
        # where the option is off (the noise's covariance is the Fisher of the loss)
        rescaled = any(
            isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq
            for m in model.modules()
        )
        taps: Taps
        # the model output (empirical: until the loss call), the noise, where it goes, and
        # whether it was added; cleared with the capture (it holds the output's graph)
        fold: dict[str, Any]  # taps.scratch (below)

        def add(where: str) -> Callable[[Tensor], Tensor]:
            def hook(g: Tensor) -> Tensor:
                if torch.is_grad_enabled() or fold.get("at") != where or taps.noise_added:
                    return g
                if taps.in_own_pass():  # a penalty's gradient inside the step: not the step's
                    return g
                check_accumulation(taps)
                if taps.loss_factor is None and not taps._checking:
                    # a backward pass whose roots were not seen (on_roots): the gradient here
                    # may hold a factor on the loss; the separate pass draws the noise
                    return g
                taps.noise_added = True
                # the gradient here is k S times the loss's (k the loop's loss_factor, S a
                # GradScaler's scale): the noise is multiplied by S alone, in float32 before it
                # meets a 16-bit gradient (else it underflows), and unscaled with .grad
                s = 1.0 if taps.loss_scale is None else taps.loss_scale / (taps.loss_factor or 1.0)
                return g + (fold["delta"] * s).to(g.dtype)

            return hook

        def unfold() -> None:
            """Add nothing in this step's backward pass: the separate pass draws the noise, from
            the generator as the capture found it (what ``step(inputs=...)`` draws)."""
            fold["at"] = None  # the hooks add nothing; noise_added stays false
            if taps.rewind is not None:
                generator.set_state(taps.rewind)

        def on_roots(unit: bool, factor: tuple[float, float] | None) -> None:
            """Before the step's backward pass: a factor on the loss (``0.25 * loss``, ``loss /
            accumulation_steps``) scales the gradient at the fold, and with it the noise
            (``E|eps|^2`` was ``0.25**2`` times the separate pass's): without
            ``loss_factor=`` such a step draws in the separate pass (exact) instead. So does a
            factor of 0 (or one that is not finite) found on the way to the loss
            (:meth:`Taps.gradient_vanished`), also with ``loss_factor=``: a warm-up weight of 0
            on a loss whose accumulation factor was stated would fold no noise at all. A
            ``loss_factor=`` other than the factor the graph shows (``factor``, where it is
            readable without a host synchronisation: :func:`check_loss_factor`) raises."""
            if fold.get("at") is None or taps.noise_added:
                return
            if taps.gradient_vanished():
                check_accumulation(taps)  # gradient accumulation: the documented error first
                unfold()  # (its separate_cause names the zero gradient)
                return
            if taps.loss_factor is not None:
                # the fold multiplies the noise by loss_scale / loss_factor: a stated factor
                # other than the one the graph shows rescaled the noise silently (1/k stated
                # for a token-weighted loss * n_last / N: E|eps|^2 0.0461 for 0.512, found in
                # review s22); one the graph does not show (a GPU tensor) stays trusted
                check_loss_factor(taps.loss_factor, factor)
                return
            if unit:
                return
            check_accumulation(taps)  # gradient accumulation: the documented error first
            unfold()
            taps.separate_cause = (  # named if the separate pass cannot rebuild the loss input
                "folds its noise into the step's backward pass, but that pass gives the loss "
                "output a gradient other than 1 (times a GradScaler's scale): a factor on the "
                "loss (0.25 * loss, loss / accumulation_steps) or an explicit gradient for its "
                "backward() would scale the folded noise",
                "Say the factor to keep the noise in the one pass: `with noisy.capture("
                "loss_factor=k):` around your backward, or noisy.step(closure, loss_factor=k), "
                "for a loss of k * loss_fn(...)",
            )

        def through_ddp() -> None:
            """Refuse a forward that runs through a DDP wrapper of the model (of several
            processes), whose all-reduce would average the folded noise over the ranks. DDP
            marks the wrapper whose forward is running (``_active_ddp_module``, torch >= 2.0;
            absent: nothing to read)."""
            ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
            if ddp is None or not ddp_reduces(ddp):
                return
            if any(m is model for m in ddp.module.modules()):
                raise folded_noise_reduced(
                    f"NoisyOptimizer with {type(self).__name__}",
                    "runs its forward through DistributedDataParallel in this step",
                )

        def on_output(output: Tensor) -> None:  # "empirical": the examples' axis
            through_ddp()
            if self.kind != "empirical":
                return
            n = None if taps.model_input is None else num_examples(taps.model_input)
            if n is not None and output.ndim > 0 and output.shape[0] == n:
                fold["output"], fold["version"] = output, output._version
                output.register_hook(add("output"))

        def on_loss(output: Tensor, target: Any) -> None:
            if not output.requires_grad or rescaled:
                return
            # a module backward hook of the user's on the model (a gradient-scaling or
            # gradient-reversal layer) acts on the folded noise as on the step's gradient: such
            # a step draws in the separate pass, which runs without it (the noise's covariance
            # was 4x the loss's Fisher under a backward pre-hook doubling the last Linear's
            # output gradient, found in review s19). Once per step, before anything is drawn
            hooked = user_backward_hook(model)
            if hooked is not None:
                if taps.separate_cause is None:
                    taps.separate_cause = (
                        f"folds its noise into the step's backward pass, where {hooked} of "
                        "yours would change the noise with the step's gradients",
                        "Remove the hook for the noisy steps",
                    )
                return
            if taps.folded:
                raise RuntimeError(
                    "the loss function was called twice inside one noise-capturing step; call it "
                    "once per step"
                )
            labels = target if isinstance(target, Tensor) else None
            z = fold.pop("output", None)
            if z is not None and z._version != fold.pop("version"):
                z = None  # changed in place after the forward: its hook sees another gradient
            # "empirical" reads the examples on the output's first axis (both folds below): a
            # sequence-first output ((T, N, V), also with T == N) does not hold them there
            first = self.kind == "empirical" and taps.output_examples_first()
            if not first:
                z = None
            if self.kind == "true":
                try:
                    with torch.enable_grad():  # in float32: 16-bit logits are upcast
                        leaf = upcast(output.detach()).requires_grad_(True)
                        objective = self._objective(spec, leaf, labels, generator, fold=True)
                        (fold["delta"],) = torch.autograd.grad(objective, leaf)
                except NonFiniteError:
                    # non-finite logits (a float16 overflow a GradScaler will skip): no fold and
                    # no error in the user's loss call; a GradScaler never steps on such a
                    # batch, so a step that does run (no scaler) raises there
                    taps.nonfinite = True
                    return
                where = "input"
            else:
                assert labels is not None
                n = taps.batch_size()
                coef = self.scale * (n**0.5 if spec.reduction == "mean" else 1.0)
                w = _weight(spec, output, labels, fold=True)
                signs = rademacher(n, generator, upcast(output.detach()))
                # scale sqrt(e) sum_n r_n grad NLL_n = coef w sum_n r_n grad NLL_n, with
                # coef = scale sqrt(e) / w = scale sqrt(N) ("mean": e = N/M^2, w = 1/M) or scale
                grads = _example_grads(spec, output, labels, z)
                if grads is not None:  # the NLL's gradient at the model output
                    where, g = "output", grads
                    per = 1
                else:  # at the loss input: its rows are the examples or blocks of them
                    rows = output.shape[0]
                    shape = taps.model_output_shape
                    if (
                        rows % n
                        or not first
                        or (shape is not None and output.numel() != shape.numel())
                    ):
                        raise RuntimeError(
                            f"FullFisherNoise('empirical') gives each example one random sign, "
                            f"but the loss input has {rows} rows for {n} examples and does not "
                            "show which rows are whose: it is not the model's output or a "
                            "reshape of it (selected or shifted tokens?), or the model's output "
                            "does not hold the examples on its first axis (a sequence-first "
                            "model: (T, N, ...)), and that output cannot carry the signs "
                            "(changed in place before the loss, or not a Tensor with the "
                            "examples on its first axis). Call the loss on the model's "
                            "output (flattened if you like) with ignored positions marked by "
                            "ignore_index, leave the output unchanged, or call noisy.step("
                            "inputs=..., targets=...) after your own backward pass, outside the "
                            "capture"
                        )
                    where, per = "input", rows // n
                    with torch.enable_grad():
                        leaf = upcast(output.detach()).requires_grad_(True)
                        (g,) = torch.autograd.grad(spec.nll_sum(leaf, labels), leaf)
                r = signs.repeat_interleave(per).reshape((-1,) + (1,) * (g.dim() - 1))
                fold["delta"] = (coef * w) * r * g
            if where == "input":
                output.register_hook(add("input"))
            fold["at"] = where
            taps.folded = True

        taps = Taps(
            model,
            loss_fn,
            on_loss=on_loss,
            on_output=on_output,  # both kinds: the DDP check (through_ddp)
            layouts=self.layouts(),
            on_roots=on_roots,
        )
        fold = taps.scratch
        return taps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, scale={self.scale:.6g})"


def _weight(spec: LossSpec, output: Tensor, targets: Tensor | None, fold: bool) -> float | Tensor:
    """``w`` of :meth:`LossSpec.nll_weight`, for a batch whose labels may all be ignored.

    Where every label is ``ignore_index`` under ``"mean"`` the mean loss is 0/0 and ``w = 1/M``
    is ``inf``: the noise came out 0 (``"true"``) or NaN (``"empirical"``) without a word, where
    the other samplers raise (found in review). A sample drawn in its own pass (``fold``
    false) raises :func:`curvlab._losses.check_counted`'s error, one host synchronisation where
    the count is a Tensor. Folded into a training step, which never waits for the host
    (docs/noise.md), ``w`` is 0 there instead: the noise is 0, as the step's own gradient of
    torch's loss (whose value is NaN), where the empirical fold wrote NaN into every gradient.
    Under ``"sum"`` the noise of a sum of nothing is 0, rightly.

    Raises:
        ValueError: every label ignored under ``"mean"``, not ``fold``.
    """
    if spec.reduction == "mean" and targets is not None and not fold:
        count = spec.count(output, targets)
        if isinstance(count, Tensor):
            check_counted(spec, float(count))
    w = spec.nll_weight(output, output.shape[0], targets)
    if fold and isinstance(w, Tensor):
        w = w.nan_to_num(nan=0.0, posinf=0.0)  # 1/0: no label counted (no host read)
    return w


def _example_grads(
    spec: LossSpec, output: Tensor, labels: Tensor, z: Tensor | None
) -> Tensor | None:
    """``d sum NLL / d z`` (float32 at least) at the model output ``z`` of the loss input
    ``output`` (each example's rows depend on its own slice of ``z`` alone), or ``None`` when
    there is no such ``z`` or the loss input does not depend on it."""
    if z is None:
        return None
    try:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(spec.nll_sum(upcast(output), labels), z, retain_graph=True)
    except RuntimeError:  # the loss input is not computed from the model's output
        return None
    return upcast(g)
