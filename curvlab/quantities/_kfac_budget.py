"""K-FAC's memory budget: every block's factor size from the weights' shapes, before any pass.

A block of sizes ``(in', out)`` holds ``in'^2 + out^2`` numbers (``A`` and ``G``); a tied GPT-2 head
has ``out = 50257`` (a 10 GB ``G`` in float32). :func:`check_memory` adds them up and refuses a
selection over the budget with the largest layers named and the ways out (:func:`curvlab.kfac`).
"""

from __future__ import annotations

import math

from torch import nn

from curvlab._numbers import is_budget
from curvlab.backends._rules import is_hf_conv1d

__all__ = ["check_budget", "check_memory", "factor_sizes", "fmt_budget"]


def factor_sizes(layer: nn.Module) -> tuple[int, int]:
    """``(in', out)``: the sizes of a layer's ``A`` (``in' x in'``) and ``G`` (``out x out``),
    from its weight's shape (``(out, in, *kernel)``, or ``(in, out)`` for HF ``Conv1D``)."""
    shape = tuple(layer.weight.shape)
    if is_hf_conv1d(layer):
        return shape[0], shape[1]
    return math.prod(shape[1:]), shape[0]


def fmt_budget(budget: float) -> str:
    """``budget`` as the caller passed it: whole bytes without a fraction, else as given (a
    budget of 0.001 bytes read "0 bytes", found in review). Formatted as a ``float``: any real
    number :func:`check_budget` accepts (a ``fractions.Fraction`` has no ``:g`` format before
    Python 3.12, and the refusal of ``Fraction(1000, 3)`` raised a ``TypeError`` from its own
    message before review s23)."""
    value = float(budget)
    return f"{value:.0f}" if value.is_integer() else f"{value:g}"


def check_budget(budget: object) -> None:
    """Refuse a ``memory_budget=`` that is not a number of bytes, before any work.

    Accepted as :func:`curvlab.estimators._memory.check_memory_budget` accepts a budget: a real
    number ``> 0`` (``int``, ``float`` or a numpy scalar), ``float("inf")``, or ``None`` (here: no
    limit). A ``bool``, NaN, zero, a negative number, a string or a tensor is refused. Found in
    review: a numpy budget (``np.int64(2**30)``, a config's value) was refused as "not a positive
    number", although the estimators take it.

    Raises:
        ValueError: naming the value and what to pass.
    """
    if is_budget(budget):
        return
    raise ValueError(
        "kfac: memory_budget must be a number of bytes > 0 (an int, a float or a numpy scalar), "
        f"float('inf') or None (no limit), got {budget!r}"
    )


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{fmt_budget(n)} B"  # a fractional budget as given (250.5 read "250 B" before)


def check_memory(
    layers: dict[str, nn.Module],
    group: dict[str, str],
    budget: float | None,
    params: dict[str, nn.Parameter],
) -> int:
    """Bytes of all blocks' factors, from the weights' shapes; raise if over ``budget``.

    A block of sizes ``(in', out)`` holds ``in'^2 + out^2`` numbers of ``max(4, itemsize)`` bytes
    (16-bit models give float32 factors). Runs before any forward pass. ``budget``: bytes, a
    Python or numpy real number ``> 0`` (:func:`check_budget`), or ``None`` for no limit.
    """
    check_budget(budget)
    for name, key in group.items():
        if is_hf_conv1d(layers[name]) != is_hf_conv1d(layers[key]):
            # one Parameter: no params= selection keeps one layer and leaves the other out
            # (the message suggested that, found in review)
            weight = _weight_name(layers[key], {id(p): n for n, p in params.items()})
            raise ValueError(
                f"kfac: layers '{key}' and '{name}' share one weight '{weight}' but one stores "
                "it (in, out) (HuggingFace Conv1D) and the other (out, in): K-FAC cannot combine "
                "their factors into one block, and no params= selection takes one layer without "
                f"the other. Leave the weight out (params=lambda name, p: name != {weight!r}) "
                "and take its Fisher diagonal with curvlab.diag_fisher(model, loss_fn, data, "
                f"params={weight!r}); KFACNoise gives it the diagonal by itself"
            )
    sizes: dict[str, tuple[int, int, int]] = {}  # key -> (in', out, bytes)
    for key in dict.fromkeys(group.values()):
        a, g = factor_sizes(layers[key])
        item = max(4, layers[key].weight.element_size())
        sizes[key] = (a, g, (a * a + g * g) * item)
    total = sum(b for _, _, b in sizes.values())
    if budget is None or total <= budget:
        return total
    name_of = {id(p): n for n, p in params.items()}
    ranked = sorted(sizes, key=lambda k: -sizes[k][2])
    shown = []
    for key in ranked[:5]:
        a, g, b = sizes[key]
        item = b // (a * a + g * g)
        alone = " - over the budget on its own" if b > budget else ""
        shown.append(
            f"'{key}' ({type(layers[key]).__name__}, weight "
            f"'{_weight_name(layers[key], name_of)}'): "
            f"A {a}x{a} = {_fmt_bytes(a * a * item)}, G {g}x{g} = {_fmt_bytes(g * g * item)}{alone}"
        )
    drop, left = [], total  # the fewest largest blocks whose removal fits the budget
    for key in ranked:
        if left <= budget:
            break
        drop.append(_weight_name(layers[key], name_of))
        left -= sizes[key][2]
    if len(drop) <= 4:
        leave_out = f"e.g. params=lambda name, p: name not in {set(drop)!r}"
    else:
        leave_out = f"e.g. without the {len(drop)} largest layers' weights {drop[:4]!r}, ..."
    raise ValueError(
        f"kfac: the K-FAC factors of the {len(sizes)} selected layers would take "
        f"{_fmt_bytes(total)}, over memory_budget={fmt_budget(budget)} bytes ({_fmt_bytes(budget)}); "
        "nothing was computed. "
        f"Largest: {'; '.join(shown)}. Options: (1) leave layers out with params=, {leave_out} "
        "(parameter names as in model.named_parameters(); a tied head's weight carries the "
        "embedding's name); "
        "(2) raise memory_budget= (bytes; None for no limit) if the memory is there; "
        "(3) for such a layer's Fisher diagonal (memory of the weight's size) use "
        f"curvlab.diag_fisher(model, loss_fn, data, params={drop[:1]!r})."
    )


def _weight_name(layer: nn.Module, name_of: dict[int, str]) -> str:
    """The name of a layer's weight parameter (the layers here are those :func:`kfac` factors:
    a computed, parametrized weight is left out before, ``_kfac_layers._computed_weight``)."""
    return name_of.get(id(layer.weight), "?")
