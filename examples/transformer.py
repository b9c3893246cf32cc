"""A tiny GPT trained with in-loop diagnostics, then its checkpoints analysed into a report.

The model is the nanoGPT-style decoder of the W4 benchmark (token + position embeddings, pre-LayerNorm
blocks with causal ``scaled_dot_product_attention``, GELU MLPs, an output head tied to the token
embedding), smaller: vocabulary 32, context 24, width 48, two blocks. The data are sequences of a
fixed random bigram language (each token's successor drawn from 3 likely candidates), of varying
length, padded with the label ``-100`` that ``CrossEntropyLoss`` ignores: exactly what a GPT
training loop feeds to ``loss_fn(logits, targets)`` in the (B, T, V) layout.

1. Training (AdamW, batch 32) with :class:`curvlab.Diagnostics` measuring the loss, Tr(F) with
   sampled labels, Tr of the empirical Fisher and the gradient noise scale every ``--every`` steps
   into ``--out/diagnostics``; a checkpoint every ``--save-every`` steps.
2. :func:`curvlab.analyze` on the checkpoints (held-out batch): Tr(F), Tr(H), the top eigenvalues,
   the spectral density and the NQM prediction, saved as an HTML/JSON report in ``--out/report``.
3. For the final model: the top-3 Hessian eigenvalues of each block alone (``params=``), and the
   gradient noise per layer (:func:`curvlab.gradient_stats`), into ``--out/per_block.json``.

Every run starts a fresh log: if ``--out`` already holds an earlier run's outputs (``diagnostics/``,
``checkpoints/``, ``report/``, ``per_block.json``) the script stops before any work, since
:class:`curvlab.Diagnostics` appends to an existing ``metrics.jsonl`` and the two runs would mix;
``--overwrite`` deletes those four first (and nothing else in ``--out``).

Usage:
    python examples/transformer.py [--steps 300] [--out DIR] [--overwrite] [--quick]

``--quick`` is a seconds-long run (for tests): ``--steps 20 --train 256 --every 10 --save-every 10``
where not given (options given explicitly are kept), a smaller held-out batch and analysis.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from example_args import positive_int

import curvlab as cl
from benchmarks.workloads import TinyGPT

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""


def bigram_data(n: int, vocab: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` padded sequences of a random bigram language: inputs ``(n, length)``, targets with -100."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    seq = torch.empty(n, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(length):
        pick = torch.randint(0, 3, (n,), generator=gen)
        seq[:, t + 1] = table[seq[:, t], pick]
    X, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    X[pad] = 0
    y[pad] = -100
    return X, y


def train(args: argparse.Namespace, out: Path) -> tuple[nn.Module, list[Path], tuple]:
    vocab, length = 32, 24
    X, y = bigram_data(args.train, vocab, length, seed=0)
    held_out = bigram_data(32 if args.quick else 128, vocab, length, seed=1)
    torch.manual_seed(1)
    model = TinyGPT(vocab=vocab, length=length, d=48, layers=2, heads=4)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    diag = cl.Diagnostics(
        model,
        loss_fn,
        quantities=["loss", "trace_fisher", "trace_empirical_fisher", "noise_scale"],
        every=args.every,
        log_dir=out / "diagnostics",
    )
    gen = torch.Generator().manual_seed(2)
    checkpoints: list[Path] = []
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, X.shape[0], (32,), generator=gen)
        xb, yb = X[idx], y[idx]
        logits = model(xb)
        loss = loss_fn(logits.reshape(-1, vocab), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record = diag.step(step, xb, yb)
        if record is not None:
            v = record["values"]
            print(
                f"step {step:4d}  loss {v['loss']:.3f}  Tr(F) {v['trace_fisher']:.3g}  "
                f"noise scale {v['noise_scale']:.3g}"
            )
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            path = out / "checkpoints" / f"step{step + 1:05d}.pt"
            torch.save(model.state_dict(), path)
            checkpoints.append(path)
    diag.close()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    return model, checkpoints, (loss_fn, held_out)


OUTPUTS = ("diagnostics", "checkpoints", "report", "per_block.json")
FULL = {"steps": 300, "train": 2048, "every": 25, "save_every": 100}
QUICK = {"steps": 20, "train": 256, "every": 10, "save_every": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--quick``'s or the full run's values where an option is not given.

    Raises:
        SystemExit: a usage error (argparse's), e.g. for ``--steps 0``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=None, help="default 300 (quick 20)")
    parser.add_argument(
        "--train",
        type=positive_int,
        default=None,
        help="training sequences (default 2048, quick 256)",
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=None,
        help="Diagnostics period in steps (default 25, quick 10)",
    )
    parser.add_argument(
        "--save-every", type=positive_int, default=None, help="default 100 (quick 10)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUTPUT / "transformer",
        help="folder for the log, checkpoints and report (default examples/output/transformer)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's diagnostics/, checkpoints/, report/ and per_block.json in "
        "--out first (without it the script refuses to mix two runs)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long run (tests); options given explicitly are kept",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def earlier_outputs(out: Path) -> list[Path]:
    """The outputs of an earlier run in ``out`` (:data:`OUTPUTS` that exist)."""
    return [out / name for name in OUTPUTS if (out / name).exists()]


def fresh_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready for a new run, before any work.

    Args:
        out: ``--out``; created if missing.
        overwrite: ``--overwrite``: delete an earlier run's :data:`OUTPUTS` (nothing else).

    Raises:
        FileExistsError: if ``out`` holds an earlier run's outputs and ``overwrite`` is False
            (Diagnostics would append this run's records to the earlier run's log).
    """
    earlier = earlier_outputs(out)
    if earlier and not overwrite:
        raise FileExistsError(
            f"--out {out} holds an earlier run ({', '.join(p.name for p in earlier)}); pass "
            "--overwrite to delete them first, or choose another --out"
        )
    for path in earlier:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = args.out
    try:
        fresh_out(out, args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"transformer.py: error: {err}") from None
    model, checkpoints, (loss_fn, held_out) = train(args, out)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cl.analysis.AnalysisWarning)
        report = cl.analyze(
            model,
            loss_fn,
            held_out,
            checkpoint=[str(p) for p in checkpoints],
            num_probes=10 if not args.quick else 3,
            k=3,
            num_steps=40 if not args.quick else 10,
        )
    report.save(out / "report")  # fresh_out() removed an earlier one
    print(f"analysed {len(checkpoints)} checkpoints in {time.perf_counter() - start:.1f} s")
    for entry in report.to_dict()["entries"]:
        vals = entry.get("values", entry)
        print(
            f"  {entry.get('label', '?'):>14}: Tr(H) {vals.get('trace_hessian', float('nan')):.3g}"
            f"  Tr(F) {vals.get('trace_fisher', float('nan')):.3g}"
        )

    blocks = {}
    for i in range(len(model.blocks)):
        res = cl.eigenvalues(model, loss_fn, held_out, k=3, params=f"blocks.{i}")
        blocks[f"blocks.{i}"] = [float(v) for v in res.values]
    stats = cl.gradient_stats(model, loss_fn, held_out)
    per_layer = {
        name: {"trace_covariance": s.trace_covariance, "snr": s.snr}
        for name, s in stats.layers.items()
    }
    summary = {
        "top_eigenvalues_per_block": blocks,
        "noise_scale": stats.noise_scale,
        "noise_per_layer": per_layer,
        "backend": stats.backend,
    }
    (out / "per_block.json").write_text(json.dumps(summary, indent=2))
    for name, vals in blocks.items():
        print(f"  top-3 Hessian eigenvalues of {name}: " + ", ".join(f"{v:.3g}" for v in vals))
    print(f"  gradient noise scale B_simple {stats.noise_scale:.3g} (backend {stats.backend})")
    print(f"wrote {out / 'report'} and {out / 'per_block.json'}")


if __name__ == "__main__":
    main()
