"""Distil two teachers' stored top-k outputs into one student, over a shared vocabulary.

Language-model distillation stores, per position, each teacher's top-k token ids and their
probabilities (renormalised over those k ids): the full distributions over a large vocabulary are
too big to keep. Each stored row is then the teacher's distribution *conditioned on its top-k
ids*, and different teachers keep different ids. Averaging the rows (what pipelines usually do,
and the paper's `sd`) over-weights the ids that both teachers kept; `ce` solves, per position,
for the one distribution over the union of the kept ids that explains both teachers' rows
(:func:`uhc_fast.estimate_topk`).

Here the world is synthetic, so the truth is known: contexts ``x`` with a true next-token
distribution ``softmax(W x)`` over a 5000-token vocabulary; two teachers with their own small
errors (``W + E_i``) store their top-32 and top-8 (different storage budgets) in float16; the
merged soft labels train a linear student with
a distillation loss over each row's union ids (:func:`uhc_fast.distillation_loss` on the sparse
pair ``(ids, soft)``). Run::

    python examples/topk_distillation.py            # about a minute on 2 CPU cores
    python examples/topk_distillation.py --quick
"""

from __future__ import annotations

import argparse
import time

import torch

import uhc_fast

VOCAB = 5000
DIM = 32
TOP_K = (32, 8)  # what each teacher's pipeline kept (storage budgets differ)


def make_world(seed: int = 0):
    """The true model ``W`` and two teachers' versions of it (each with its own error)."""
    gen = torch.Generator().manual_seed(seed)
    truth = 0.6 * torch.randn(VOCAB, DIM, generator=gen)
    teachers = [truth + 0.03 * torch.randn(VOCAB, DIM, generator=gen) for _ in range(2)]
    return truth, teachers


def contexts(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def stored_top_k(model: torch.Tensor, x: torch.Tensor, k: int):
    """What a distillation pipeline keeps of a teacher: top-k ids (int32) and their probabilities
    renormalised over them (float16)."""
    probs = torch.softmax(x @ model.T, dim=1)
    p, ids = torch.topk(probs, k, dim=1)
    return ids.to(torch.int32), (p / p.sum(dim=1, keepdim=True)).to(torch.float16)


def union_tv(ids: torch.Tensor, soft: torch.Tensor, true_probs: torch.Tensor) -> float:
    """Mean total variation between the soft labels and the truth renormalised over each row's ids."""
    listed = ids >= 0
    true = torch.where(listed, true_probs.gather(1, ids.clamp_min(0)), 0.0)
    true = true / true.sum(dim=1, keepdim=True)
    return float(0.5 * (true - torch.where(listed, soft, 0.0)).abs().sum(dim=1).mean())


def train_student(
    x: torch.Tensor, ids: torch.Tensor, soft: torch.Tensor, epochs: int, seed: int = 0
) -> torch.nn.Module:
    """A linear softmax model over the whole vocabulary, trained on sparse targets."""
    torch.manual_seed(seed)
    student = torch.nn.Linear(DIM, VOCAB, bias=False)
    optimiser = torch.optim.Adam(student.parameters(), lr=0.02)
    for _ in range(epochs):
        for batch in torch.randperm(x.shape[0]).split(512):
            optimiser.zero_grad()
            loss = uhc_fast.distillation_loss(student(x[batch]), (ids[batch], soft[batch]))
            loss.backward()
            optimiser.step()
    return student


@torch.no_grad()
def evaluate(student: torch.nn.Module, truth: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """KL(truth || student) and agreement of the argmax, on held-out contexts."""
    log_true = torch.log_softmax(x @ truth.T, dim=1)
    log_student = torch.log_softmax(student(x), dim=1)
    kl = float((log_true.exp() * (log_true - log_student)).sum(dim=1).mean())
    top1 = float((log_true.argmax(dim=1) == log_student.argmax(dim=1)).float().mean())
    return kl, top1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="5000 samples, 3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.epochs = 5000, 3
    truth, teachers = make_world()
    x, held_out = contexts(args.samples, 1), contexts(4000, 2)
    true_probs = torch.softmax(x @ truth.T, dim=1)

    # what the pipeline stored: per teacher (B, k) ids and float16 probabilities
    stored = [stored_top_k(model, x, k) for model, k in zip(teachers, TOP_K, strict=True)]
    ids, values = [s[0] for s in stored], [s[1] for s in stored]
    results = {}
    print(f"{args.samples} contexts, vocabulary {VOCAB}, two teachers' top-{TOP_K[0]} and top-{TOP_K[1]} (float16)")
    print(
        "| soft labels | merge (samples/s) | mean union | TV to the truth on the union "
        "| student KL(truth || student) | student top-1 = true top-1 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for method in ("sd", "ce"):
        start = time.perf_counter()
        merged_ids, soft, info = uhc_fast.estimate_topk(ids, values, method, vocab_size=VOCAB, return_info=True)
        rate = args.samples / (time.perf_counter() - start)
        tv = union_tv(merged_ids, soft, true_probs)
        student = train_student(x, merged_ids, soft, args.epochs)
        kl, top1 = evaluate(student, truth, held_out)
        results[method] = {"tv": tv, "kl": kl, "top1": top1, "union": float(info["union_size"].float().mean())}
        print(f"| {method} | {rate:,.0f} | {results[method]['union']:.1f} | {tv:.4f} | {kl:.4f} | {top1:.3f} |")
    return results


if __name__ == "__main__":
    main()
