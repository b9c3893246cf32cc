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

``"true"`` (the true Fisher, which is the GGN for curvlab's losses) is an alias of ``"ggn"``
everywhere: ``matrix="true"`` is ``"ggn"``, ``kind="true"`` is ``"exact"`` for the quantities and
the samplers that have ``"exact"`` (``FullFisherNoise`` has ``"true"`` itself). Every name is
resolved here, so every ``matrix=`` and ``kind=`` argument accepts the same names.

Example:
    >>> kinds = ("empirical", "mc", "exact")
    >>> quantity_kind("ggn", kinds), quantity_kind("mc", kinds), matrix_name("exact")
    ('exact', 'mc', 'ggn')
"""

from __future__ import annotations

__all__ = ["quantity_kind", "matrix_name", "matrix_aliases", "sampler_kind"]

_KIND_OF_MATRIX = {"ggn": "exact", "fisher": "mc", "empirical_fisher": "empirical"}
_KIND_ALIASES = _KIND_OF_MATRIX | {"true": "exact"}
"""Every other name a quantity's or a sampler's ``kind=`` accepts -> its own kind name (the
matrix names, and ``"true"``: the true Fisher, the GGN; found in review s22: ``matrix="true"``
was the GGN but every ``kind="true"`` was refused)."""
_MATRIX_OF_KIND = {v: k for k, v in _KIND_OF_MATRIX.items()} | {"true": "ggn"}
"""Every other name a ``matrix=`` argument accepts -> the matrix's name."""


def quantity_kind(kind: str, allowed: tuple[str, ...]) -> str:
    """``kind`` as the quantities name it (``"empirical"``, ``"mc"``, ``"exact"``), matrix names
    accepted as aliases.

    Raises:
        ValueError: for a name of neither vocabulary, listing both.
    """
    name = _KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if name not in allowed:
        aliases = [m for m, k in _KIND_ALIASES.items() if k in allowed]
        raise ValueError(f"kind must be one of {allowed} (or {tuple(aliases)}), got {kind!r}")
    return name


def matrix_name(matrix: str) -> str:
    """``matrix`` as the operators name it, the quantities' kinds (and ``"true"``) accepted as
    aliases; any other value is returned as it is (the caller refuses it)."""
    return _MATRIX_OF_KIND.get(matrix, matrix) if isinstance(matrix, str) else matrix


def matrix_aliases(matrices: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The aliases that mean one of ``matrices`` (for the errors that list the names accepted)."""
    return tuple(a for a, m in _MATRIX_OF_KIND.items() if m in matrices)


def sampler_kind(kind: str, allowed: tuple[str, ...], owner: str = "kind") -> str:
    """A sampler's ``kind``: its own names, or the matrix names (``"ggn"`` is ``"true"`` or
    ``"exact"``, whichever the sampler has, and so is ``"true"``; ``"fisher"`` is ``"mc"``).

    Raises:
        ValueError: for a name that is none of them, naming what was passed and the aliases
            that do mean one of ``allowed``.
    """
    if kind in allowed:
        return kind
    name = _sampler_alias(kind, allowed) if isinstance(kind, str) else None
    if name is None:
        aliases = [m for m in _KIND_ALIASES if m not in allowed and _sampler_alias(m, allowed)]
        also = f" (or the matrix names {tuple(aliases)})" if aliases else ""
        raise ValueError(f"{owner}: kind must be one of {allowed}{also}, got {kind!r}")
    return name


def _sampler_alias(kind: str, allowed: tuple[str, ...]) -> str | None:
    """The sampler kind a matrix name or alias means (``"ggn"`` and ``"true"``: ``"exact"`` or
    ``"true"``, whichever the sampler has), ``None`` where it means none of ``allowed``."""
    if _KIND_ALIASES.get(kind) == "exact":  # the GGN: "ggn", "true"
        return next((k for k in ("exact", "true") if k in allowed), None)
    name = _KIND_ALIASES.get(kind, kind)
    return name if name in allowed else None
