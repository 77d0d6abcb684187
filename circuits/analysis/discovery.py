"""Circuit discovery: rank a model's edges, then cut a circuit from the ranking.

* :func:`eap` - edge attribution patching (Syed, Rager & Conmy 2023): the first-order estimate of
  the metric's change when edge s -> r is patched, ``(ablated_s - out_s) . d m / d input_r``, read as
  the gradient of the mean metric with respect to the edge mask at the full circuit (``run_masked``
  is linear in the mask, so the two are the same number). One forward and one backward.
* :func:`eap_ig` - EAP with integrated gradients (Hanna, Pezzelle & Belinkov 2024, "EAP-IG"): the
  gradient at the receiver is averaged over ``steps`` runs whose embeddings (tok, pos) are
  interpolated between their ablated and clean values, then multiplied by ``out_s - ablated_s`` of
  the clean run. ``steps`` forwards and backwards.
* :func:`acdc` - ACDC-style pruning (Conmy et al. 2023): from the full circuit, receivers in reverse
  forward order, each incoming edge removed for good when that moves the circuit's result by less
  than ``tau`` (in units of the model's effect: ``|f(C) - f(C \\ e)|``, f the faithfulness); edges
  into a component with no remaining outgoing edge are dropped untested. One forward per tested
  edge. Its ranking: each edge's measured effect when it was tested (kept edges have >= tau).

Each returns a :class:`Discovery`: scores [n_edges] in ``graph.edges`` order (larger = more
important, absolute values for the attribution methods) and a circuit (``top_k`` for the
attribution methods, the pruned circuit for ACDC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from circuits.analysis.circuit import Circuit, CircuitError, run_masked, sender_outputs
from circuits.claims.circuit import Evaluator, _check_range

__all__ = ["Discovery", "eap", "eap_ig", "acdc", "edge_auroc"]


@dataclass
class Discovery:
    method: str
    scores: torch.Tensor  # [n_edges], graph.edges order
    circuit: Circuit
    forwards: int  # model forwards spent (a backward counted as one more)


def _attribution(evaluator: Evaluator, steps: Optional[int]) -> torch.Tensor:
    model, x, graph = evaluator.model, evaluator.x, evaluator.graph
    total = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    n = x.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients to the mask only
    try:
        for _, xb, yb, abl in evaluator.batches():
            mask = torch.ones(len(graph.senders), len(graph.receivers), dtype=abl.dtype, device=x.device,
                              requires_grad=True)
            if steps is None:
                m = evaluator.metric(run_masked(model, xb, mask, abl), yb).sum()
                (g,) = torch.autograd.grad(m, mask)
                total += g.double().cpu()
                continue
            with torch.no_grad():
                basis = sender_outputs(model, xb) - abl  # [senders, batch, pos, d_model]
            for k in range(1, steps + 1):
                logits = run_masked(model, xb, mask, abl, embed_alpha=k / steps, grad_basis=basis)
                m = evaluator.metric(logits, yb).sum()
                (g,) = torch.autograd.grad(m, mask)
                total += g.double().cpu() / steps
    finally:
        for p in params:
            p.requires_grad_(True)
    return graph.edge_values(total / n)  # [n_edges]: d mean m / d mask


def eap(evaluator: Evaluator, k: Optional[int] = None) -> Discovery:
    """Edge attribution patching; the circuit is the top ``k`` edges (default: 10% of the graph)."""
    scores = _attribution(evaluator, None).abs()
    n_batches = -(-evaluator.x.shape[0] // evaluator.batch_size)
    return Discovery("EAP", scores, _top(evaluator, scores, k, "EAP"), 2 * n_batches)


def eap_ig(evaluator: Evaluator, steps: int = 5, k: Optional[int] = None) -> Discovery:
    """EAP-IG with ``steps`` interpolation points (Hanna et al. use 5 to 20)."""
    if not isinstance(steps, int) or steps < 1:
        raise CircuitError(f"eap_ig needs steps >= 1, got {steps!r}")
    scores = _attribution(evaluator, steps).abs()
    n_batches = -(-evaluator.x.shape[0] // evaluator.batch_size)
    return Discovery("EAP-IG", scores, _top(evaluator, scores, k, "EAP-IG"), (2 * steps + 1) * n_batches)


def _top(evaluator: Evaluator, scores: torch.Tensor, k: Optional[int], method: str) -> Circuit:
    n = len(evaluator.graph.edges)
    k = max(1, round(0.1 * n)) if k is None else k
    return Circuit.top_k(evaluator.graph, scores, k, name=f"{method} top {k}")


def acdc(evaluator: Evaluator, tau: float = 0.01) -> Discovery:
    """ACDC-style pruning at threshold ``tau`` (a share of the model's effect m(N) - m(∅))."""
    graph = evaluator.graph
    full, empty = evaluator.full(), evaluator.empty()
    _check_range(full, empty, "acdc")
    scale = float(full.mean() - empty.mean())
    edges = set(graph.edges)
    scores = torch.zeros(len(graph.edges), dtype=torch.float64)
    current = float(evaluator.values(Circuit(graph, frozenset(edges))).mean())
    forwards = 2
    for receiver in reversed(graph.receivers):
        component = receiver.split(".")[0]
        if receiver != "logits" and not any(s == component for s, _ in edges):
            for e in [e for e in edges if e[1] == receiver]:  # nothing reads this component any more
                edges.discard(e)
            continue
        incoming = [s for s in reversed(graph.senders) if (s, receiver) in edges]
        for s in incoming:
            trial = frozenset(edges - {(s, receiver)})
            value = float(evaluator.values(Circuit(graph, trial)).mean())
            forwards += 1
            effect = abs(value - current) / abs(scale)
            scores[graph.edge_index[(s, receiver)]] = effect
            if effect < tau:
                edges.discard((s, receiver))
                current = value
    return Discovery("ACDC", scores, Circuit(graph, frozenset(edges), f"ACDC tau={tau:g}"), forwards)


def edge_auroc(scores: torch.Tensor, truth: Circuit) -> float:
    """AUROC of edge scores [n_edges] separating the edges of a known circuit from the rest."""
    from circuits.claims.stats import auroc

    graph = truth.graph
    s = torch.as_tensor(scores).double().cpu().numpy()
    inside = np.array([e in truth.edges for e in graph.edges])
    if inside.all() or not inside.any():
        raise CircuitError("edge AUROC needs a true circuit with some but not all edges")
    return auroc(s[inside], s[~inside])
