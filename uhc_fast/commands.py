"""The ``estimate``, ``inspect`` and ``info`` subcommands of the ``uhc-fast`` command line.

``uhc_fast.cli`` calls :func:`register`; ``python -m uhc_fast.commands ...`` runs these commands
alone (what ``torchrun -m`` needs when launching a distributed job without the full CLI).
"""

from __future__ import annotations

import argparse
import json
import sys

from .constants import DEFAULT_EPS
from .methods import NAMES as METHODS
from .options import BACKEND_NAMES
from .stream import OUT_DTYPES

EXIT_ERROR = 2


def register(subparsers) -> None:
    """Add ``estimate``, ``inspect`` and ``info`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "estimate",
        help="stream soft labels for every sample of a manifest into a .npy",
        description="Estimate soft labels over the union of the teachers' classes for every sample of a "
        "manifest, chunk by chunk, into a (B, K) .npy plus a JSON sidecar. Resumable; runs under torchrun. "
        "A top-k manifest (teachers with 'indices' and 'values' files: docs/topk.md) merges each sample's "
        "listed ids instead, into (B, M) ids (<out stem>.indices.npy) and soft labels (methods ce, sd).",
    )
    p.add_argument("manifest", help="the job's manifest JSON (see docs/manifest.md)")
    p.add_argument("--out", required=True, help="output .npy (the sidecar is the same path with .json)")
    p.add_argument("--method", default="ce", choices=tuple(METHODS), help="estimation method (default: ce)")
    p.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: about 16M elements)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(OUT_DTYPES),
        help="stored soft-label dtype (default: float32)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="store only the k largest soft labels per sample, with their class indices in <out stem>.indices.npy",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="teacher logits are divided by it (default 1)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the uniform prior teacher")
    p.add_argument("--tol", type=float, default=None, help="convergence threshold of iterative methods")
    p.add_argument("--max-iter", type=int, default=None, help="iteration cap of iterative methods")
    p.add_argument(
        "--eps", type=float, default=DEFAULT_EPS, help=f"probability floor before logs (default {DEFAULT_EPS:g})"
    )
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted job, keeping the finished chunks whose inputs are unchanged",
    )
    p.add_argument("--force", action="store_true", help="delete existing outputs of this path and start over")
    p.add_argument(
        "--wait", action="store_true", help="if another job is writing --out, wait for it to finish instead of failing"
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="always show progress (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="never show progress")
    p.set_defaults(func=cmd_estimate)

    p = subparsers.add_parser(
        "inspect",
        help="check a manifest and describe the job: teachers, coverage, connectivity, size",
        description="Validate a manifest without estimating anything and describe the job.",
    )
    p.add_argument("manifest", help="the job's manifest JSON")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "info",
        help="backends, devices and versions",
        description="Show which backends and devices are usable here, and why not.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=cmd_info)


def _fail(command: str, err: BaseException) -> int:
    print(f"uhc-fast {command}: error: {err}", file=sys.stderr)
    return EXIT_ERROR


def cmd_estimate(args: argparse.Namespace) -> int:
    from .stream import JobError, ManifestError, estimate_manifest

    try:
        result = estimate_manifest(
            args.manifest,
            args.out,
            args.method,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            top_k=args.top_k,
            temperature=args.temperature,
            alpha=args.alpha,
            tol=args.tol,
            max_iter=args.max_iter,
            eps=args.eps,
            backend=args.backend,
            device=args.device,
            resume=args.resume,
            force=args.force,
            wait=args.wait,
            progress=args.progress,
        )
    except (ManifestError, JobError, ValueError, OSError) as err:
        return _fail("estimate", err)
    if result.rank != 0:
        return 0
    if result.status == "already complete":
        print(
            f"{result.out}: already complete (same inputs and settings); nothing to do (--force to redo)",
            file=sys.stderr,
        )
        return 0
    rate = result.samples_run / result.seconds if result.seconds > 0 else 0.0
    ranks = f" on {result.world_size} ranks" if result.world_size > 1 else ""
    resumed = f", {result.chunks_before} were already done" if result.chunks_before else ""
    if result.chunks_changed:
        resumed += f", {result.chunks_changed} recomputed because their inputs changed"
    extra = f" + {result.indices}" if result.indices else ""
    print(
        f"wrote {result.out}{extra} and {result.sidecar}: {result.chunks_total} chunks{resumed}{ranks}; "
        f"{result.samples_run} samples in {result.seconds:.1f}s ({rate:.0f} samples/s on rank 0)",
        file=sys.stderr,
    )
    return 0


def describe_manifest(manifest) -> dict:
    """A JSON-able description of a loaded manifest: teachers, coverage, connectivity, job size."""
    from .stream import default_chunk_size

    m = manifest
    if m.topk:
        slots = m.slots
        return {
            "manifest": str(m.path) if m.path else None,
            "mode": "topk",
            "samples": m.num_samples,
            "vocab_size": m.vocab_size,
            "teachers": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "k": t.shape[1],
                    "weight": t.weight,
                    "indices": str(t.indices.path),
                    "values": str(t.values.path),
                    "ids_dtype": str(t.indices.dtype).replace("torch.", ""),
                    "dtype": str(t.dtype).replace("torch.", ""),
                    "vocab_map": str(t.map_path) if t.map_path else None,
                    "bytes": t.shape[0] * t.row_bytes,
                }
                for t in m.teachers
            ],
            "size": {
                "slots_per_sample": slots,
                "input_bytes": m.input_bytes,
                "output_bytes": {dt: m.num_samples * slots * (d.itemsize + 4) for dt, d in OUT_DTYPES.items()},
                "default_chunk_size": default_chunk_size(m),
            },
            "digest": m.digest,
        }
    ts = m.teacher_set
    coverage = ts.mask.sum(0).tolist()
    names = list(m.class_names)
    nnz = sum(t.shape[1] for t in m.teachers)
    return {
        "manifest": str(m.path) if m.path else None,
        "samples": m.num_samples,
        "classes": m.num_classes,
        "teachers": [
            {
                "name": t.name,
                "kind": t.kind,
                "classes": len(t.classes),
                "weight": t.weight,
                "outputs": str(t.path),
                "dtype": str(t.dtype).replace("torch.", ""),
                "bytes": t.shape[0] * t.row_bytes,
            }
            for t in m.teachers
        ],
        "coverage": {
            "min_teachers_per_class": int(min(coverage)),
            "max_teachers_per_class": int(max(coverage)),
            "mean_teachers_per_class": sum(coverage) / len(coverage),
            "uncovered": [names[k] for k in ts.uncovered],
        },
        "connectivity": {
            "connected": ts.is_connected,
            "components": len(ts.components),
            "component_sizes": [len(c) for c in ts.components],
            "smallest_components": [[names[k] for k in c[:10]] for c in ts.components[1:6]],
        },
        "size": {
            "values_per_sample": nnz,
            "input_bytes": m.input_bytes,
            "output_bytes": {dt: m.num_samples * m.num_classes * d.itemsize for dt, d in OUT_DTYPES.items()},
            "default_chunk_size": default_chunk_size(m),
        },
        "digest": m.digest,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from .stream import ManifestError, load_manifest

    try:
        m = load_manifest(args.manifest)
    except (ManifestError, OSError) as err:
        return _fail("inspect", err)
    d = describe_manifest(m)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    if d.get("mode") == "topk":
        _print_topk(d)
        return 0
    print(f"manifest  {d['manifest']}")
    print(f"samples   {d['samples']}")
    print(f"classes   {d['classes']} in the union")
    print(f"teachers  {len(d['teachers'])}")
    width = max(len(t["name"]) for t in d["teachers"])
    for t in d["teachers"]:
        print(
            f"  {t['name']:<{width}}  {t['kind']:<6}  {t['classes']:>6} classes  {t['dtype']:<8}  "
            f"weight {t['weight']:g}  {_bytes(t['bytes']):>9}  {t['outputs']}"
        )
    c = d["coverage"]
    print(
        f"coverage  {c['min_teachers_per_class']}..{c['max_teachers_per_class']} teachers per class "
        f"(mean {c['mean_teachers_per_class']:.2f})"
    )
    if c["uncovered"]:
        print(f"  uncovered (zero mass): {c['uncovered'][:20]}{' ...' if len(c['uncovered']) > 20 else ''}")
    g = d["connectivity"]
    if g["connected"]:
        print("overlap   connected: the teachers determine the soft labels")
    else:
        print(
            f"overlap   DISCONNECTED into {g['components']} components of sizes {g['component_sizes'][:10]}: "
            "the split of mass between them is set by the alpha prior (pass --alpha)"
        )
        for comp in g["smallest_components"]:
            print(f"  e.g. {comp}")
    s = d["size"]
    print(
        f"size      {s['values_per_sample']} teacher values per sample, inputs {_bytes(s['input_bytes'])}, "
        f"outputs {_bytes(s['output_bytes']['float32'])} (float32) / {_bytes(s['output_bytes']['float16'])} "
        f"(float16); default chunk {s['default_chunk_size']} samples"
    )
    return 0


def _print_topk(d: dict) -> None:
    print(f"manifest  {d['manifest']}")
    print("mode      top-k: each sample's soft labels over the union of the ids its teachers list")
    print(f"samples   {d['samples']}")
    print(f"vocab     {d['vocab_size'] if d['vocab_size'] is not None else 'no bound given'}")
    print(f"teachers  {len(d['teachers'])}")
    width = max(len(t["name"]) for t in d["teachers"])
    for t in d["teachers"]:
        mapped = f"  map {t['vocab_map']}" if t["vocab_map"] else ""
        print(
            f"  {t['name']:<{width}}  {t['kind']:<8}  k={t['k']:<5} {t['ids_dtype']}/{t['dtype']:<8}  "
            f"weight {t['weight']:g}  {_bytes(t['bytes']):>9}  {t['values']}{mapped}"
        )
    s = d["size"]
    print(
        f"size      {s['slots_per_sample']} listed ids per sample at most, inputs {_bytes(s['input_bytes'])}, "
        f"outputs at most {_bytes(s['output_bytes']['float32'])} (float32 + int32 ids); "
        f"default chunk {s['default_chunk_size']} samples"
    )


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .backends import info

    report = info()
    report["uhc_fast_version"] = __version__
    report["cuda_available"] = torch.cuda.is_available()
    report["distributed"] = {
        "available": torch.distributed.is_available(),
        "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
        "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
    }
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print(f"uhc_fast {__version__}, torch {report['torch_version']}")
    devices = report["cuda_devices"]
    print(f"CUDA devices: {', '.join(devices) if devices else 'none'}")
    print("backends:")
    for name in ("torch", "cpu", "cuda", "triton"):
        entry = report.get(name, {})
        if entry.get("available"):
            print(f"  {name:<7} available  devices {entry.get('devices')}  methods {entry.get('methods')}")
        else:
            print(f"  {name:<7} unavailable: {entry.get('reason')}")
    print("auto picks: " + ", ".join(f"{dev} -> {name}" for dev, name in report["auto"].items()))
    dist = report["distributed"]
    print(
        f"torch.distributed: {'available' if dist['available'] else 'unavailable'} "
        f"(gloo {'yes' if dist['gloo'] else 'no'}, nccl {'yes' if dist['nccl'] else 'no'})"
    )
    return 0


def _bytes(n: int) -> str:
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (the full CLI is :func:`uhc_fast.cli.build_parser`)."""
    parser = argparse.ArgumentParser(prog="uhc-fast", description="uhc_fast: estimate, inspect, info")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
