"""The floor model: what one sample of each method must cost, in bytes moved and in arithmetic.

Counts are per sample, from the layout's sizes (``workloads.stats``): ``nnz`` packed inputs, K classes,
N teachers, G groups (classes covered by the same teachers), E (group, teacher) entries, P (teacher
pair, group) entries, ``sum_l d_l^2`` (``d_l``: teachers covering class l). "ops" are elementary
floating-point operations (an add, a multiply, a compare; a fused multiply-add counts one); a
transcendental (exp, log, log1p, expm1) and a division are counted apart, since they cost 10 to 30
ops each in vectorised code. The compiled CPU backend executes every op once per SIMD lane group (8
samples per AVX-512 vector of doubles), so its time floor is ``ops / (8 x vector ops per second)``.

Bytes: every method reads each input value once and writes K soft labels once:
``nnz * itemsize_in + K * itemsize_out``. Nothing else needs to touch memory: a tile's scratch (a few
hundred KB at most, mostly less) stays in the L2 cache.

    python -m benchmarks.floor            # the model for the bench_native workloads, as Markdown
"""

from __future__ import annotations

from dataclasses import dataclass

# the transcendental functions' and divisions' weight in ops, for a single "arithmetic" figure
TRANSCENDENTAL_OPS = 20
DIVISION_OPS = 8


@dataclass(frozen=True)
class Cost:
    """One sample's cost: ``bytes`` moved, ``ops`` elementary operations, ``transcendental`` calls and
    ``divisions``; ``per_step`` the part of ``ops`` one Newton step costs (iterative methods)."""

    bytes: int
    ops: int
    transcendental: int
    divisions: int
    per_step: dict

    @property
    def weighted_ops(self) -> int:
        return self.ops + TRANSCENDENTAL_OPS * self.transcendental + DIVISION_OPS * self.divisions


def ce_step(st: dict) -> dict:
    """One Newton step of `ce` on the dual (csrc/core/ce.h), by part: the point (D_g, q, teacher masses),
    the KKT test and gradient, the Newton system (link weights over groups, teacher pairs, the grounded
    elimination) and one line-search trial: the full step's sums per group and the curvature bound
    that accepts it without F's log1p per group (the exact change, a log1p per group, is formed
    only where the bound cannot decide: rare after the first step, left out of the floor)."""
    n, g, e, p = st["N"], st["G"], st["E"], st["P"]
    return {
        "point": {"ops": 2 * e + g, "transcendental": n, "divisions": g},
        "kkt + gradient": {"ops": 3 * e + 2 * g, "transcendental": 0, "divisions": n},
        "system": {"ops": g + p + n * n + (n - 1) ** 3 // 3, "transcendental": 0, "divisions": 0},
        "trial": {"ops": 2 * e + 5 * g + 2 * n, "transcendental": n, "divisions": 0},
    }


def model(st: dict, steps: float = 3.0, trials: float = 1.0, in_itemsize: int = 4, out_itemsize: int = 4) -> dict:
    """Per method, its :class:`Cost` for a layout with sizes ``st`` (``steps`` Newton steps of `ce`, mf-p
    and mf-lu, ``trials`` line-search trials per step)."""
    n, k, nnz, g, e = st["N"], st["K"], st["nnz"], st["G"], st["E"]
    d2 = st["d2_classes"]
    moved = nnz * in_itemsize + k * out_itemsize
    read = 3 * nnz  # validate (sum, finiteness, sign) and renormalise every input value once
    out = {}
    out["sd"] = Cost(moved, read + nnz + 2 * k, 0, 1, {})
    # mf-lf: log of every probability, zbar and b (O(nnz)), c = S b (N^2), u (O(nnz)), softmax over K
    out["mf-lf"] = Cost(moved, read + 4 * nnz + n * n + 3 * k, nnz + k, k, {})
    step = ce_step(st)
    per_step_ops = sum(part["ops"] for name, part in step.items() if name != "trial") + trials * step["trial"]["ops"]
    per_step_tr = step["point"]["transcendental"] + trials * step["trial"]["transcendental"]
    per_step_div = (
        step["point"]["divisions"] + step["kkt + gradient"]["divisions"] + trials * step["trial"]["divisions"]
    )
    setup = read + nnz + 2 * k + e  # evidence per class, per group (sum and max), the start's masses
    ce = Cost(
        moved,
        int(setup + steps * per_step_ops + 2 * e + g + k),  # + the final point and the K soft labels
        int(n + steps * per_step_tr + n),
        int(steps * per_step_div + g),
        {
            name: part["ops"] + TRANSCENDENTAL_OPS * part["transcendental"] + DIVISION_OPS * part["divisions"]
            for name, part in step.items()
        },
    )
    out["ce"] = ce
    # mf-p: from ce's answer; per step O(nnz) fit / gradient, a Hessian summed over classes
    # (sum_l d_l^2), its Cholesky (N^3 / 3), and line-search trials of O(nnz) each
    mfp_step = 6 * nnz + d2 + n**3 // 3 + trials * 4 * nnz
    out["mf-p"] = Cost(
        moved,
        ce.ops + int(steps * mfp_step),
        ce.transcendental + int(steps * n),
        ce.divisions + int(steps * (k + n)),
        {"step": mfp_step},
    )
    # mf-lu: logits as mf-lf; per step the projection (O(nnz) + a teacher Laplacian over classes, sum_l d_l^2,
    # and its elimination), the (2N x 2N) Schur complement over classes (4 sum_l d_l^2) and its Cholesky;
    # each line-search trial is a projection
    project = 4 * nnz + d2 + n**3 // 3
    mflu_step = project + 6 * nnz + 4 * d2 + (2 * n) ** 3 // 3 + trials * project
    out["mf-lu"] = Cost(
        moved, read + 4 * nnz + int(steps * mflu_step) + 3 * k, nnz + k, int(steps * (2 * k)) + k, {"step": mflu_step}
    )
    return out


def markdown(layouts: dict[str, dict], steps: dict[str, float] | None = None) -> str:
    """A Markdown table of the model for named layouts (``steps``: measured mean Newton steps per layout)."""
    lines = [
        "| workload | N | K | nnz | G | E | P | Σ d_l² | method | bytes | ops | transc. | div. | weighted ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in layouts.items():
        costs = model(st, steps=(steps or {}).get(name, 3.0))
        for method, c in costs.items():
            lines.append(
                f"| {name} | {st['N']} | {st['K']} | {st['nnz']} | {st['G']} | {st['E']} | {st['P']} | "
                f"{st['d2_classes']} | {method} | {c.bytes / 1e3:.1f} KB | {c.ops / 1e3:.0f}k | "
                f"{c.transcendental / 1e3:.1f}k | {c.divisions / 1e3:.1f}k | {c.weighted_ops / 1e3:.0f}k |"
            )
    return "\n".join(lines)


def ce_step_table(layouts: dict[str, dict]) -> str:
    """The weighted ops of one `ce` Newton step, by part, per layout."""
    parts = list(ce_step(next(iter(layouts.values()))))
    lines = ["| workload | " + " | ".join(parts) + " | one step |", "|---|" + "---|" * (len(parts) + 1)]
    for name, st in layouts.items():
        step = model(st)["ce"].per_step
        lines.append(
            f"| {name} | "
            + " | ".join(f"{step[p] / 1e3:.1f}k" for p in parts)
            + f" | {sum(step.values()) / 1e3:.1f}k |"
        )
    return "\n".join(lines)


def main() -> int:
    import uhc_fast

    from . import bench_native, workloads

    layouts = {}
    for name, spec in bench_native.WORKLOADS.items():
        sets = workloads.class_sets(spec["family"], spec["K"], spec["N"], fraction=spec["fraction"])
        layouts[name] = workloads.stats(uhc_fast.TeacherSet(sets, num_classes=spec["K"]))
    print(markdown(layouts))
    print()
    print(ce_step_table(layouts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
