"""One name per matrix, everywhere: the vocabulary of ``matrix=`` and ``kind=`` arguments.

The matrices are ``"hessian"``, ``"ggn"`` (the generalised Gauss-Newton matrix, the true Fisher of
curvlab's losses), ``"fisher"`` (the Monte-Carlo Fisher, labels drawn from the model),
``"empirical_fisher"`` (at the data labels) and ``"residual"`` (Hessian minus GGN). The one-pass
quantities and the samplers name their kinds after the same matrices; the older short names stay as
documented aliases:

=====================  ==========================  ===========================
matrix                 ``kind=`` of quantities     ``FullFisherNoise`` kind
=====================  ==========================  ===========================
``"ggn"``              ``"exact"``                 ``"true"``
``"fisher"``           ``"mc"``                    (``"true"``, in expectation)
``"empirical_fisher"`` ``"empirical"``             ``"empirical"``
=====================  ==========================  ===========================

Example:
    >>> kinds = ("empirical", "mc", "exact")
    >>> quantity_kind("ggn", kinds), quantity_kind("mc", kinds), matrix_name("exact")
    ('exact', 'mc', 'ggn')
"""

from __future__ import annotations

__all__ = ["quantity_kind", "matrix_name", "sampler_kind"]

_KIND_OF_MATRIX = {"ggn": "exact", "fisher": "mc", "empirical_fisher": "empirical"}
_MATRIX_OF_KIND = {v: k for k, v in _KIND_OF_MATRIX.items()} | {"true": "ggn"}


def quantity_kind(kind: str, allowed: tuple[str, ...]) -> str:
    """``kind`` as the quantities name it (``"empirical"``, ``"mc"``, ``"exact"``), matrix names
    accepted as aliases.

    Raises:
        ValueError: for a name of neither vocabulary, listing both.
    """
    name = _KIND_OF_MATRIX.get(kind, kind) if isinstance(kind, str) else kind
    if name not in allowed:
        aliases = [m for m, k in _KIND_OF_MATRIX.items() if k in allowed]
        raise ValueError(f"kind must be one of {allowed} (or {tuple(aliases)}), got {kind!r}")
    return name


def matrix_name(matrix: str) -> str:
    """``matrix`` as the operators name it, the quantities' kinds accepted as aliases."""
    return _MATRIX_OF_KIND.get(matrix, matrix) if isinstance(matrix, str) else matrix


def sampler_kind(kind: str, allowed: tuple[str, ...], owner: str = "kind") -> str:
    """A sampler's ``kind``: its own names, or the matrix names (``"ggn"`` is ``"true"`` or
    ``"exact"``, whichever the sampler has; ``"fisher"`` is ``"mc"``).

    Raises:
        ValueError: for a name that is none of them, naming what was passed and the aliases
            that do mean one of ``allowed``.
    """
    if kind in allowed:
        return kind
    name = _sampler_alias(kind, allowed) if isinstance(kind, str) else None
    if name is None:
        aliases = [m for m in _KIND_OF_MATRIX if _sampler_alias(m, allowed)]
        also = f" (or the matrix names {tuple(aliases)})" if aliases else ""
        raise ValueError(f"{owner}: kind must be one of {allowed}{also}, got {kind!r}")
    return name


def _sampler_alias(kind: str, allowed: tuple[str, ...]) -> str | None:
    """The sampler kind a matrix name means (``"ggn"``: ``"exact"`` or ``"true"``, whichever the
    sampler has), ``None`` where it means none of ``allowed``."""
    if kind == "ggn":
        return next((k for k in ("exact", "true") if k in allowed), None)
    name = _KIND_OF_MATRIX.get(kind, kind)
    return name if name in allowed else None
