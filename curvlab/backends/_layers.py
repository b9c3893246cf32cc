"""Per-layer algebra for curvlab's own hooks (noise samplers, K-FAC): Linear and Conv1d/Conv2d.

A layer maps per-position input columns ``a`` (for a convolution: the unfolded patches, ordered
``(in_channel, kernel...)`` like ``weight.view(out, -1)``) to pre-activations ``z = W a + b``. With
``g = dL/dz`` per position, example ``n``'s weight gradient is ``sum_t g_nt a_nt^T`` (``out x in'``).
These helpers turn the input ``a`` saved in the forward pass and the ``g`` met in the backward pass
into

* ``sum_n (per-example gradient)**2`` (the raw diagonal of an empirical/MC Fisher), for blocks of
  examples whose per-example products fit (:func:`example_blocks`), and
* the rows whose outer products sum to the K-FAC factors (``sum rows^T rows``).

:func:`draw_labels` draws the Monte-Carlo labels every backend and quantity uses (example-major,
so that they do not depend on chunk boundaries).

Everything is batched tensor algebra on the layer's device; no host synchronisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from curvlab._precision import accumulation_dtype, common, upcast

if TYPE_CHECKING:
    from curvlab._losses import LossSpec

__all__ = [
    "PER_EXAMPLE_PRODUCTS",
    "add_squares",
    "draw_labels",
    "example_blocks",
    "squares_by_example",
    "tappable_layers",
    "input_columns",
    "input_stats",
    "is_tappable",
    "output_columns",
    "output_rows",
    "overridden",
    "per_example_rows",
    "plain_output",
    "sum_sq_grads",
    "with_zeros",
]


_OWN_METHODS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("forward",)),
    (nn.Conv1d, ("forward", "_conv_forward")),
    (nn.Conv2d, ("forward", "_conv_forward")),
    (nn.Embedding, ("forward",)),
    (nn.LayerNorm, ("forward",)),
    *(((nn.RMSNorm, ("forward",)),) if hasattr(nn, "RMSNorm") else ()),
    (nn.modules.batchnorm._BatchNorm, ("forward",)),
)
"""The torch layers whose per-example rules assume their own computation, and the methods that
define it."""


def overridden(module: nn.Module) -> str | None:
    """Why ``module`` does not compute its torch layer's function, or ``None`` if it does.

    A subclass that overrides ``forward`` (weight standardisation, an equalised-learning-rate
    scale, "same" padding computed in ``forward``) is an ``nn.Conv2d`` by ``isinstance`` but not by
    what it computes: a rule for the plain layer would give wrong per-example gradients.
    """
    for base, methods in _OWN_METHODS:
        if isinstance(module, base):
            if "forward" in module.__dict__:  # a forward assigned on the instance
                return (
                    f"{type(module).__name__} has a forward of its own (assigned on the "
                    "instance), so it may not compute what its class computes"
                )
            for method in methods:
                if getattr(type(module), method, None) is not getattr(base, method):
                    return (
                        f"{type(module).__name__} overrides {base.__name__}.{method}(), so it "
                        f"does not compute what a {base.__name__} computes"
                    )
            return None
    return None


def plain_output(module: nn.Module, x: Tensor) -> Tensor | None:
    """What the plain torch layer (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``) computes on ``x``
    with ``module``'s weight and bias, whatever ``module``'s own ``forward`` does (``None`` for
    other modules): to tell a subclass that merely recasts or renames from one that computes
    something else (weight standardisation)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return base._conv_forward(module, x, module.weight, module.bias)
    return None


def is_tappable(module: nn.Module) -> bool:
    """Whether the own hooks handle ``module`` (Linear, or Conv1d/2d with zero padding, groups=1,
    none of them a subclass with its own ``forward``: :func:`overridden`)."""
    if overridden(module) is not None:
        return False
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and (not isinstance(module.padding, str) or module.padding == "valid")
        )
    return False


def int_padding(module: nn.Module) -> tuple[int, ...]:
    """A convolution's padding as integers: ``padding="valid"`` is no padding (``"same"`` is
    not handled here: the hooks and ``kfac`` decline it)."""
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    return tuple(module.padding)


def tappable_layers(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    modules: list[tuple[str, nn.Module]] | None = None,
) -> dict[str, tuple[nn.Module, str, str | None]] | None:
    """``module name -> (module, weight name, bias name)`` if the own hooks cover every parameter.

    ``params`` are the trainable parameters by name; ``modules`` is ``list(model.named_modules())``
    when the caller has it already. Returns ``None`` when some trainable parameter lives in a
    module the hooks cannot handle, or is shared between modules; callers then fall back to
    BackPACK or to a separate pass.
    """
    by_id = {id(p): n for n, p in params.items()}
    covered: set[str] = set()
    layers: dict[str, tuple[nn.Module, str, str | None]] = {}
    for mname, module in modules if modules is not None else model.named_modules():
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        if not own:
            continue
        if parametrize.is_parametrized(module):
            # a computed weight (weight_norm, spectral_norm): reading ``module.weight`` runs the
            # parametrization, and spectral_norm's power step updates its buffers in train mode
            # (twice per training step before, found in review); its own parameters are others
            return None
        # the layer's own weight, never module.weight: a weight deleted and set in the forward
        # (``self.lin.weight = self.big[:3]``) is absent on a fresh model (a raw AttributeError,
        # review s22) and not a parameter of the layer after a forward: a separate pass
        weight = module._parameters.get("weight")
        if not is_tappable(module) or weight is None or not weight.requires_grad:
            return None
        wname = by_id.get(id(weight))
        bias = module._parameters.get("bias")
        bname = by_id.get(id(bias)) if bias is not None and bias.requires_grad else None
        if bias is not None and not bias.requires_grad:
            return None
        if wname is None or wname in covered or (bname is not None and bname in covered):
            return None
        covered.update(n for n in (wname, bname) if n is not None)
        layers[mname] = (module, wname, bname)
    if covered != set(params):
        return None
    return layers


def _columns(module: nn.Module, a: Tensor) -> Tensor:
    """Convolution input columns ``(n, in', T)`` (zero padding, groups 1), one contiguous copy.

    Built from strided views of the padded input (``Tensor.unfold``), several times faster than
    ``torch.nn.functional.unfold`` on CPU; entries are ordered ``(in_channel, kernel...)`` like
    ``weight.view(out, -1)``, positions row-major like the output.
    """
    if isinstance(module, nn.Conv1d):
        (k,), (s,), (d,), (p,) = (
            module.kernel_size,
            module.stride,
            module.dilation,
            int_padding(module),
        )
        view = F.pad(a, (p, p)).unfold(2, d * (k - 1) + 1, s)[..., ::d]  # (n, c, L', k)
        n, c, length = view.shape[:3]
        return view.permute(0, 1, 3, 2).reshape(n, c * k, length)
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    ph, pw = int_padding(module)
    padded = F.pad(a, (pw, pw, ph, ph))
    view = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, c, ho, wo = view.shape[:4]
    return view.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def input_columns(module: nn.Module, a: Tensor) -> Tensor:
    """``(n, in', T)``: the columns the weight multiplies, per example and position."""
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
    return _columns(module, a)


def output_columns(module: nn.Module, g: Tensor) -> Tensor:
    """``(n, out, T)``: the pre-activation gradients per example and position."""
    n = g.shape[0]
    if isinstance(module, nn.Linear):
        return g.reshape(n, -1, g.shape[-1]).transpose(1, 2)
    return g.reshape(n, g.shape[1], -1)


def input_stats(module: nn.Module, a: Tensor) -> tuple[str, Tensor, int]:
    """The input side of K-FAC from one forward pass: ``(kind, value, n*T)``.

    ``kind == "rows"``: ``value`` holds the ``n*T`` input rows (fewer rows than the width
    ``in'``); ``kind == "gram"``: ``value = sum_{n,t} a_nt a_nt^T`` (``in' x in'``), computed
    without materialising the rows of a convolution. 16-bit inputs are upcast (float32 sums).
    """
    a = upcast(a)
    if isinstance(module, nn.Linear):
        rows = a.reshape(-1, a.shape[-1])
        if rows.shape[0] < rows.shape[1]:
            return "rows", rows, rows.shape[0]
        return "gram", rows.t() @ rows, rows.shape[0]
    cols = _columns(module, a)  # (n, in', T)
    count = cols.shape[0] * cols.shape[2]
    if count < cols.shape[1]:
        return "rows", cols.transpose(1, 2).reshape(-1, cols.shape[1]), count
    return "gram", torch.einsum("nit,njt->ij", cols, cols), count


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """``(n*T, out)``: one pre-activation gradient row per example and position (16-bit upcast)."""
    g = upcast(g)
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])


def per_example_rows(module: nn.Module, a: Tensor, grads: list[Tensor]) -> list[Tensor]:
    """Per-example gradients as rows, one tensor per parameter: the weight's (row-major
    ``(out, in')``), then the bias's if the layer has one.

    ``grads`` holds the output gradients of one or more backward passes (label draws); the rows
    are stacked draw by draw, ``(len(grads) * n, numel)``, each draw's products written in place
    into its rows (no concatenated copy: a parameter's rows are the largest tensor formed), and
    the input is unfolded once. An autocast pass's tensors (a float32 input, a bfloat16 gradient)
    meet in float32.
    """
    a, grads = common(a, grads[0])[0], [common(a, g)[1] for g in grads]
    cols = input_columns(module, a).transpose(1, 2)  # (n, T, in')
    n = cols.shape[0]
    gcols = [output_columns(module, g) for g in grads]  # (n, out, T) per draw
    out = gcols[0].shape[1]
    dtype = torch.promote_types(gcols[0].dtype, cols.dtype)
    weight = cols.new_empty((len(grads) * n, out * cols.shape[2]), dtype=dtype)
    bias = cols.new_empty((len(grads) * n, out), dtype=dtype) if module.bias is not None else None
    for d, gc in enumerate(gcols):
        rows = slice(d * n, (d + 1) * n)
        torch.bmm(gc, cols, out=weight[rows].view(n, out, cols.shape[2]))
        if bias is not None:
            torch.sum(gc, dim=2, out=bias[rows])
    return [weight] if bias is None else [weight, bias]


def sum_sq_grads(
    module: nn.Module, a: Tensor, g: Tensor, with_grad: bool = False
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``sum_n (grad_n W)**2`` and ``sum_n (grad_n b)**2`` of the gradients met in one backward.

    Args:
        module: a layer accepted by :func:`is_tappable`.
        a: the layer input saved in the forward pass.
        g: the gradient of the objective with respect to the layer output.
        with_grad: also return the summed gradients ``sum_n grad_n W`` and ``sum_n grad_n b``
            (what autograd would accumulate in ``.grad``), from the same per-example products.

    Returns:
        The weight's (shaped like ``module.weight``) and the bias's sums (``None`` without bias),
        followed by the weight's and the bias's gradients when ``with_grad``; at least float32
        (an autocast pass's float32 input and bfloat16 gradient meet in float32).
    """
    a, g = common(a, g)
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear) and a.dim() == 2:
        g2 = g * g
        sq_w = g2.t() @ (a * a)
        sq_b = g2.sum(0) if has_bias else None
        if not with_grad:
            return sq_w, sq_b
        return sq_w, sq_b, g.t() @ a, g.sum(0) if has_bias else None
    shape = module.weight.shape
    if isinstance(module, nn.Linear) and module.weight.numel() >= PER_EXAMPLE_PRODUCTS:
        n = a.shape[0]
        G = g.reshape(n, -1, g.shape[-1])  # (n, T, out)
        sq_w, grad_w = squares_by_example(G, a.reshape(n, -1, a.shape[-1]), with_grad)
        sq_b = grad_b = None
        if has_bias:
            gb = G.sum(1)
            sq_b = (gb * gb).sum(0)
            grad_b = gb.sum(0) if with_grad else None
        if not with_grad:
            return sq_w, sq_b
        return sq_w, sq_b, grad_w, grad_b
    sq_w = grad_w = sq_b = grad_b = None
    for lo, hi in _example_blocks(module, a, g):
        cols = input_columns(module, a[lo:hi])  # (n, in', T)
        gcols = output_columns(module, g[lo:hi])  # (n, out, T)
        # (n, in', out): this operand order runs about 20% faster on CPU than (n, out, in')
        per_example = torch.bmm(cols, gcols.transpose(1, 2))
        if with_grad:
            grad_w = _add(grad_w, per_example.sum(0))
        sq_w = _add(sq_w, per_example.square_().sum(0))
        if has_bias:
            gb = gcols.sum(2)
            sq_b = _add(sq_b, (gb * gb).sum(0))
            if with_grad:
                grad_b = _add(grad_b, gb.sum(0))
    sq_w = sq_w.t().reshape(shape)
    if not with_grad:
        return sq_w, sq_b
    return sq_w, sq_b, grad_w.t().reshape(shape), grad_b


PER_EXAMPLE_PRODUCTS = 2**20
"""Weights of at least this many entries (with positions: sequences, HF ``Conv1D``) get their
per-example gradients one example at a time, each one matrix product whose square is added in
place (:func:`squares_by_example`): on a CPU about 3x faster than one batched product and a
squared copy for GPT-2's layers (measured, 2 cores), and no ``(n, out, in)`` temporary."""


def squares_by_example(
    G: Tensor, A: Tensor, with_grad: bool, in_out: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``sum_n (G_n^T A_n)**2`` and (``with_grad``) ``sum_n G_n^T A_n``, each ``(out, in)``
    (``in_out``: their transposes, ``(in, out)``, computed as such, for weights stored that way).

    ``G`` is ``(n, T, out)``, ``A`` is ``(n, T, in)``: the output gradients and inputs of a linear
    map at each example's ``T`` positions. One product per example, squared into the running sum
    in place (computing the ``(in, out)`` layout directly is faster than a transposed copy: on
    GPT-2's ``c_proj`` 9 ms instead of 16 ms for four examples).
    """
    sq = grad = None
    for i in range(G.shape[0]):
        P = A[i].t() @ G[i] if in_out else G[i].t() @ A[i]
        if with_grad and grad is None:  # the first product becomes the gradient's sum: no copy
            grad, sq = P, P * P
            continue
        if with_grad:
            grad.add_(P)
        sq = P.square_() if sq is None else sq.addcmul_(P, P)
    if sq is None:  # no example
        shape = (A.shape[-1], G.shape[-1]) if in_out else (G.shape[-1], A.shape[-1])
        sq = G.new_zeros(shape)
        grad = sq.clone() if with_grad else None
    return sq, grad


def add_squares(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + sum_n value[n]**2`` for a fresh ``(n, ...)`` tensor ``value`` (squared in place).

    Large entries one example at a time (no ``(n, ...)`` squared copy, no ``sum`` temporary).
    """
    if value.shape[0] and value[0].numel() >= PER_EXAMPLE_PRODUCTS:
        for i in range(value.shape[0]):
            v = value[i]
            total = v.square_() if total is None else total.addcmul_(v, v)
        return total
    return _add(total, value.square_().sum(0))


_BLOCK_BYTES = {"cpu": 4 * 2**20}  # other devices: no bound on the inputs (products bounded)
"""Size of one block of unfolded inputs: on a CPU, a block that stays in cache and in memory the
allocator keeps is several times faster than one big temporary (fresh pages fault on every call)."""


def add_examples(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + sum_n value[n]`` for a ``(n, ...)`` tensor ``value``, left unchanged.

    On a CPU, large float32/float64 entries one example at a time into ``total`` (a reduction
    over the examples would allocate, zero-fill and copy a parameter-sized output per call: GPT-2
    small's tied embedding, 70 ms a block); elsewhere one reduction (one kernel on a GPU, and a
    16-bit sum accumulated in float32).
    """
    if (
        value.shape[0]
        and value[0].numel() >= PER_EXAMPLE_PRODUCTS
        and value.device.type == "cpu"
        and value.dtype.itemsize >= 4
    ):
        for i in range(value.shape[0]):
            total = value[i].clone() if total is None else total.add_(value[i])
        return total
    return _add(total, value.sum(0))


_PRODUCT_BYTES = {"cpu": 4 * 2**20}
"""Size of one block of per-example weight gradients ``(n, in', out)`` on a CPU (the batched
product :func:`sum_sq_grads` squares); other devices: :data:`_PRODUCT_BYTES_ELSEWHERE`."""

_PRODUCT_BYTES_ELSEWHERE = 256 * 2**20
"""Per-example weight gradients held at once on devices other than the CPU (a GPU): with all
examples at once, ``Linear(1000, 1000)`` on 1024 sequences took 4 GB (found in review)."""


def example_blocks(
    n: int, width: int, out: int, positions: int, itemsize: int, device: torch.device
) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of examples whose per-example products fit one block each.

    A block holds the examples' per-example weight gradients ``(n, width, out)`` (the batched
    product) within :data:`_PRODUCT_BYTES` on a CPU (:data:`_PRODUCT_BYTES_ELSEWHERE` on other
    devices) and, on a CPU, their unfolded inputs ``(n, width, positions)`` within
    :data:`_BLOCK_BYTES`; a block has at least one example. Sized by the product, not only by
    the inputs: on short sequences the product is the larger (``Linear(1000, 1000)`` on 4
    positions: 4 MB against 16 kB per example), and blocks sized by the inputs alone put 256
    examples' gradients, 1 GB, in one block (found in review).

    Args:
        n: examples.
        width: the input width ``in'`` of the weight (a convolution: ``in_channels`` times the
            kernel's entries).
        out: the output width.
        positions: positions per example (1 without a sequence axis).
        itemsize: bytes per entry of the product.
        device: where it is computed.
    """
    if n == 0:
        return [(0, 0)]
    product = _PRODUCT_BYTES.get(device.type, _PRODUCT_BYTES_ELSEWHERE)
    step = product // max(width * out * itemsize, 1)
    inputs = _BLOCK_BYTES.get(device.type)
    if inputs is not None:
        step = min(step, inputs // max(width * positions * itemsize, 1))
    step = max(1, step)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _example_blocks(module: nn.Module, a: Tensor, g: Tensor) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of examples whose unfolded inputs and per-example gradients fit one
    block each (:func:`example_blocks`)."""
    n = a.shape[0]
    if n == 0:
        return [(0, 0)]
    out = g.shape[-1] if isinstance(module, nn.Linear) else g.shape[1]
    positions = g.numel() // (n * out)  # (shapes only: indexing a tensor costs a view each)
    width = module.weight.numel() // module.weight.shape[0]  # in' (the row of the weight)
    itemsize = accumulation_dtype(torch.promote_types(a.dtype, g.dtype)).itemsize  # ``common``
    return example_blocks(n, width, out, positions, itemsize, a.device)


def draw_labels(
    spec: LossSpec,
    output: Tensor,
    generator: torch.Generator | None,
    targets: Tensor | None,
    samples: int,
) -> list[Tensor]:
    """``samples`` label sets drawn from the model, example-major: each example's draws in a row.

    Draw ``i`` of example ``n`` is the ``n * samples + i``-th draw from ``generator``'s stream
    (:meth:`~curvlab._losses.LossSpec.sample_targets` on the output repeated ``samples`` times
    per example), so the draws paired with an example do not depend on where chunks start: a
    chunk of examples ``[lo, hi)`` takes the same stretch of the stream as inside a larger
    chunk. Drawing all of a chunk's first labels, then all of its second (sample-major), paired
    them by chunk boundaries: ``mc_samples=2`` changed ``diag_fisher(kind="mc")`` by up to 109%
    between ``chunk_size`` values (found in review). One draw is ``sample_targets`` itself.
    Cross-entropy repeats the output for blocks of at most ``n / samples`` examples (its
    class probabilities, float64 in the CPU's sampler, then take about the memory of one draw
    of the chunk; the stream is the same, torch's uniform draws being taken in order); the
    other losses' temporaries are the size of their draws, drawn in one call.

    Args:
        spec: the loss.
        output: the prepared output ``(n, ...)``.
        generator: the stream to draw from (``None``: the global RNG).
        targets: the data labels (ignored positions stay ignored), or ``None``.
        samples: draws per example (``>= 1``).

    Returns:
        ``samples`` label sets, each shaped like one draw of ``sample_targets`` on ``output``.
    """
    if samples == 1:
        return [spec.sample_targets(output, generator, targets)]
    output = output.detach()
    n = output.shape[0]
    step = max(1, n // samples) if spec.kind == "cross_entropy" else max(n, 1)
    draws: Tensor | None = None
    for lo in range(0, max(n, 1), step):
        hi = min(lo + step, n)
        part = targets[lo:hi].repeat_interleave(samples, 0) if targets is not None else None
        d = spec.sample_targets(output[lo:hi].repeat_interleave(samples, 0), generator, part)
        d = d.reshape(hi - lo, samples, *d.shape[1:])
        if draws is None:  # sample-major storage: every draw a contiguous tensor
            draws = d.new_empty(samples, n, *d.shape[2:])
        draws[:, lo:hi] = d.transpose(0, 1)
    assert draws is not None
    return list(draws.unbind(0))


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)


def with_zeros(values: dict[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """``values`` in the order of ``params``, zeros for parameters the loss does not reach."""
    return {n: values[n] if n in values else torch.zeros_like(p) for n, p in params.items()}
