"""The edge-level circuit a Tracr-compiled program computes with, from its card: ground truth for
circuit claims and discovery (``hypotheses/test_circuit_ground_truth.py``).

The card (``circuits.tasks.tracr.compiled``, "tracr" section) says which RASP variables (SOps) each sublayer
reads (a head's query / key / value separately) and writes, and which residual dimensions hold each
SOp. The token embedding writes ``tokens`` and ``one`` (Tracr sets ``one`` in every token's row), the
positional embedding ``indices``, the logits read the output SOp. An edge ``X -> Y.part`` is in the
compiled circuit when X writes an SOp that Y's part reads and X is upstream of Y; both facts are
checked against the weights (a sender writes only its SOps' dimensions, a receiver reads only its
own), so a card that disagrees with the model is an error, not a silently wrong ground truth.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from circuits.analysis.circuit import Circuit, CircuitError, Graph

__all__ = ["sop_dims", "compiled_circuit"]

_TOK_SOPS = ("tokens", "one")
_POS_SOPS = ("indices",)


def sop_dims(tracr: Mapping[str, Any]) -> dict[str, set]:
    """SOp name -> the residual dimensions holding it (``x:v`` labels belong to ``x``)."""
    out: dict[str, set] = {}
    for i, label in enumerate(tracr["residual_labels"]):
        out.setdefault(label.split(":", 1)[0], set()).add(i)
    return out


def _nonzero(rows: torch.Tensor) -> set:
    return {int(i) for i in torch.nonzero(rows.abs() > 0).flatten().tolist()}


def compiled_circuit(model, tracr: Mapping[str, Any], name: str = "compiled program") -> Circuit:
    """The circuit of edges the compiled program uses (module docstring)."""
    graph = Graph.of(model)
    dims = sop_dims(tracr)
    writes: dict[str, set] = {"tok": set(_TOK_SOPS), "pos": set(_POS_SOPS)}
    reads: dict[str, set] = {"logits": {tracr["output"]["sop"]}}
    for sub in tracr["sublayers"]:
        if sub["kind"] == "attn":
            node = f"L{sub['layer']}H{sub['head']}"
            writes[node] = set(sub["writes"])
            for part, key in (("q", "query_reads"), ("k", "key_reads"), ("v", "value_reads")):
                reads[f"{node}.{part}"] = set(sub[key])
        else:
            node = f"MLP{sub['layer']}"
            writes[node], reads[node] = set(sub["writes"]), set(sub["reads"])

    def dims_of(sops) -> set:
        missing = [s for s in sops if s not in dims]
        if missing:
            raise CircuitError(f"the Tracr card names SOps {missing} that no residual label holds")
        return set().union(*(dims[s] for s in sops)) if sops else set()

    _check_against_weights(model, graph, {k: dims_of(v) for k, v in writes.items()},
                           {k: dims_of(v) for k, v in reads.items()})
    edges = set()
    for s, r in graph.edges:
        if writes.get(s, set()) & reads.get(r, set()):
            edges.add((s, r))
    return Circuit(graph, frozenset(edges), name)


@torch.no_grad()
def _check_against_weights(model, graph: Graph, write_dims: dict, read_dims: dict) -> None:
    """Each sender writes within its SOps' dimensions and each receiver reads within its own."""
    actual_w = {"tok": _nonzero(model.embed.W_E.abs().sum(0))}
    if graph.has_pos:
        actual_w["pos"] = _nonzero(model.pos_embed.W_pos.abs().sum(0))
    actual_r = {"logits": _nonzero(model.unembed.W_U.abs().sum(1))}
    for l, block in enumerate(model.blocks):
        attn = block.attn
        for h in range(graph.n_heads):
            actual_w[f"L{l}H{h}"] = _nonzero(attn.W_O[h].abs().sum(0))
            for i, part in enumerate("qkv"):
                actual_r[f"L{l}H{h}.{part}"] = _nonzero(attn.W_QKV[i, h].abs().sum(0))
        if graph.has_mlp:
            actual_w[f"MLP{l}"] = _nonzero(block.mlp.W_out.abs().sum(0))
            actual_r[f"MLP{l}"] = _nonzero(block.mlp.W_in.abs().sum(1))
    for node, got in actual_w.items():
        extra = got - write_dims.get(node, set())
        if extra:
            raise CircuitError(f"{node} writes residual dimensions {sorted(extra)} that its card entry does not name")
    for node, got in actual_r.items():
        extra = got - read_dims.get(node, set())
        if extra:
            raise CircuitError(f"{node} reads residual dimensions {sorted(extra)} that its card entry does not name")
