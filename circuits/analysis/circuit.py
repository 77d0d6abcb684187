"""Circuits as sets of edges between components, evaluated by patching every edge outside them.

The computational graph of a `HookedTransformer` (the field's edge-level graph, as ACDC, EAP and MIB
use it):

* senders (what writes into the residual stream): ``tok`` (token embedding, or the vector read-in),
  ``pos`` (positional embedding, when the model has one), every head ``L{l}H{h}`` (its output
  ``z @ W_O``, without the layer's shared bias ``b_O``) and every MLP ``MLP{l}`` (its output with
  ``b_out``);
* receivers (what reads it): each head's three inputs ``L{l}H{h}.q`` / ``.k`` / ``.v``, every MLP
  ``MLP{l}`` and ``logits`` (``ln_final`` + unembedding at the read-out);
* an edge ``sender -> receiver`` for every sender upstream of the receiver (a head of layer l reads
  the senders of layers < l; an MLP of layer l also reads its own layer's heads; the logits read all).

A receiver's input is the sum of its senders' outputs plus the attention biases ``b_O`` upstream of
it (constants of the model, never ablated: a stated convention; under mean and resample ablation a
constant is its own ablated value anyway). :func:`run_circuit` evaluates a :class:`Circuit` by giving
every receiver the input

    input_r = sum_b b_O  +  sum_{s -> r in C} out_s  +  sum_{s -> r not in C} ablated_s

where ``out_s`` is the sender's output *in this same patched forward* (it is computed from its own
patched inputs: path patching, as ACDC / MIB evaluate circuits) and ``ablated_s`` is its output under
the stated :class:`Ablation`: ``mean`` over a fixed reference set (per position), ``resample`` (the
sender's output on a corrupted input, row by row) or ``zero``. Two identities follow and are tested
(tests/test_circuit.py): the full circuit is the model (to float rounding), and the empty circuit is
the model with every sender's output replaced by its ablated value (for ``resample``: the model on the
corrupted input).

The edge mask is a float tensor [senders, receivers]; :func:`run_masked` is differentiable in it,
which is what edge attribution patching needs (``circuits.analysis.discovery``). The forward goes through the
model's own hook points (``hook_embed``, ``hook_pos_embed``, ``hook_q/k/v``, ``hook_attn_scores``,
``hook_pattern``, ``hook_z``, ``hook_mlp_pre/post``, ``hook_mlp_out``), so a mutation or control
written as a hook (mean ablation of a head) acts on circuit evaluations too; hooks on the residual
stream and LayerNorm are not run (no single residual exists when each receiver reads its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from circuits.model.cache import head_results
from circuits.errors import CircuitsError, InputError, did_you_mean
from circuits.model.transformer import Attention, HookedTransformer, LayerNorm, TransformerBlock, attention_scores

__all__ = ["CircuitError", "Graph", "Circuit", "Ablation", "run_circuit", "run_masked", "sender_outputs",
           "ablated_outputs"]


class CircuitError(CircuitsError, ValueError):
    """A circuit that cannot be built or evaluated as written: an unknown component or edge, an edge
    that does not exist in the model's graph, an ablation without the reference it needs."""


_HEAD_RE = re.compile(r"^(?:L(\d+)H(\d+)|(\d+)\.(\d+))$", re.IGNORECASE)
_MLP_RE = re.compile(r"^(?:MLP(\d+)|L(\d+)\.mlp|mlp(\d+))$", re.IGNORECASE)
_ALIASES = {"embed": "tok", "hook_embed": "tok", "read_in": "tok", "tokens": "tok", "pos_embed": "pos",
            "hook_pos_embed": "pos", "unembed": "logits", "output": "logits"}


def _check_model(model) -> None:
    if not isinstance(model, HookedTransformer):
        raise CircuitError(f"circuits need a circuits HookedTransformer, got {type(model).__module__}."
                           f"{type(model).__qualname__}")
    for i, block in enumerate(model.blocks):
        if type(block) is not TransformerBlock or type(block.attn) is not Attention:
            raise CircuitError(f"block {i} is a {type(block).__qualname__} with {type(block.attn).__qualname__}: "
                               "edge patching restates the standard block's data flow and supports no other")


class Graph:
    """The edge-level computational graph of one model architecture (see the module docstring).

    ``senders`` / ``receivers``: node names in forward order; ``edges``: every (sender, receiver)
    pair in canonical order (receiver-major, then sender); ``valid`` [senders, receivers] bool."""

    def __init__(self, n_layers: int, n_heads: int, has_mlp: bool, has_pos: bool):
        self.n_layers, self.n_heads, self.has_mlp, self.has_pos = n_layers, n_heads, has_mlp, has_pos
        senders = ["tok"] + (["pos"] if has_pos else [])
        receivers: list[str] = []
        upstream: dict[str, int] = {}  # receiver -> how many senders (a prefix of `senders`) it reads
        for l in range(n_layers):
            for h in range(n_heads):
                for part in "qkv":
                    receivers.append(f"L{l}H{h}.{part}")
                    upstream[receivers[-1]] = len(senders)
            heads = [f"L{l}H{h}" for h in range(n_heads)]
            senders += heads
            if has_mlp:
                receivers.append(f"MLP{l}")
                upstream[f"MLP{l}"] = len(senders)
                senders.append(f"MLP{l}")
        receivers.append("logits")
        upstream["logits"] = len(senders)
        self.senders, self.receivers = tuple(senders), tuple(receivers)
        self.sender_index = {s: i for i, s in enumerate(senders)}
        self.receiver_index = {r: i for i, r in enumerate(receivers)}
        self.upstream = upstream
        self.valid = torch.zeros(len(senders), len(receivers), dtype=torch.bool)  # [senders, receivers]
        edges = []
        for j, r in enumerate(receivers):
            self.valid[: upstream[r], j] = True
            edges += [(s, r) for s in senders[: upstream[r]]]
        self.edges: tuple[tuple[str, str], ...] = tuple(edges)
        self.edge_index = {e: i for i, e in enumerate(edges)}

    @classmethod
    def of(cls, model: HookedTransformer) -> "Graph":
        _check_model(model)
        cfg = model.cfg
        return cls(cfg.n_layers, cfg.n_heads, cfg.d_mlp > 0, cfg.positional != "none")

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and (self.n_layers, self.n_heads, self.has_mlp, self.has_pos) == (
            other.n_layers, other.n_heads, other.has_mlp, other.has_pos)

    def __hash__(self) -> int:
        return hash((self.n_layers, self.n_heads, self.has_mlp, self.has_pos))

    def __repr__(self) -> str:
        return (f"Graph({self.n_layers} layers x {self.n_heads} heads{', MLPs' if self.has_mlp else ''}: "
                f"{len(self.senders)} senders, {len(self.receivers)} receivers, {len(self.edges)} edges)")

    # --- names ---------------------------------------------------------------------------------------
    def node(self, name: str, role: Literal["sender", "receiver"]) -> list[str]:
        """Canonical node name(s) of a written name: ``"L0H0"``, ``"0.0"``, ``"MLP1"``, ``"L1.mlp"``,
        ``"tok"`` / ``"embed"``, ``"pos"``, ``"logits"``; a receiver head without ``.q/.k/.v`` means
        all three of its inputs."""
        if not isinstance(name, str) or not name.strip():
            raise CircuitError(f"a circuit node must be a non-empty name like 'L0H0', got {name!r}")
        raw = name.strip()
        base, part = raw, None
        if role == "receiver" and re.search(r"\.[qkv]$", raw, re.IGNORECASE) and not _MLP_RE.match(raw):
            base, part = raw[:-2], raw[-1].lower()
        canon = _ALIASES.get(base.lower(), base.lower() if base.lower() in ("tok", "pos", "logits") else None)
        m = _HEAD_RE.match(base)
        if m:
            l, h = (int(m.group(1)), int(m.group(2))) if m.group(1) is not None else (int(m.group(3)), int(m.group(4)))
            if not (0 <= l < self.n_layers and 0 <= h < self.n_heads):
                raise CircuitError(f"no head {raw!r}: the model has {self.n_layers} layers x {self.n_heads} heads")
            canon = f"L{l}H{h}"
        m = _MLP_RE.match(base)
        if m:
            l = int(next(g for g in m.groups() if g is not None))
            if not self.has_mlp:
                raise CircuitError(f"no MLP {raw!r}: the model is attention-only")
            if not 0 <= l < self.n_layers:
                raise CircuitError(f"no MLP {raw!r}: the model has {self.n_layers} layers")
            canon = f"MLP{l}"
        if canon == "pos" and not self.has_pos:
            raise CircuitError(f"no node {raw!r}: the model has no positional embedding")
        names = self.senders if role == "sender" else self.receivers
        if canon is not None and _HEAD_RE.match(canon) and role == "receiver":
            out = [f"{canon}.{p}" for p in (part or "qkv")]
        elif part is not None:
            raise CircuitError(f"{raw!r}: only a head has q / k / v inputs")
        else:
            out = [canon] if canon is not None else []
        if not out or any(o not in names for o in out):
            kind = "sender (tok, pos, LlHh, MLPl)" if role == "sender" else "receiver (LlHh[.q|.k|.v], MLPl, logits)"
            raise CircuitError(f"{raw!r} is not a {kind} of this model{did_you_mean(raw, names)}")
        return out

    def parse_edge(self, text: str) -> list[tuple[str, str]]:
        """``"L0H0 -> L2H0.q"`` -> [("L0H0", "L2H0.q")]; ``"L0H0 -> L2H0"`` -> its q, k and v edges."""
        if not isinstance(text, str) or text.count("->") != 1:
            raise CircuitError(f"an edge is written 'SENDER -> RECEIVER' (e.g. 'L0H0 -> L2H0.q'), got {text!r}")
        left, right = (t.strip() for t in text.split("->"))
        (sender,) = self.node(left, "sender")
        out = []
        for receiver in self.node(right, "receiver"):
            if not self.valid[self.sender_index[sender], self.receiver_index[receiver]]:
                raise CircuitError(f"edge {sender} -> {receiver} ({text!r}) does not exist: {sender} is not "
                                   f"upstream of {receiver} (a head reads earlier layers only)")
            out.append((sender, receiver))
        return out

    def mask(self, edges: Iterable[tuple[str, str]], dtype=torch.float32) -> torch.Tensor:
        """The edge mask [senders, receivers] with 1 on the given edges."""
        m = torch.zeros(len(self.senders), len(self.receivers), dtype=dtype)
        for s, r in edges:
            m[self.sender_index[s], self.receiver_index[r]] = 1
        return m

    def edge_values(self, table: torch.Tensor) -> torch.Tensor:
        """A [senders, receivers] table's values on the edges, in ``edges`` order: [n_edges]."""
        valid = self.valid.to(table.device)
        return table.t()[valid.t()]  # receiver-major, as `edges`


@dataclass(frozen=True)
class Circuit:
    """A set of edges of a model's :class:`Graph`. Build with :meth:`from_names`, :meth:`top_k` /
    :meth:`top_fraction` (from a ranking), :meth:`full` or :meth:`empty`."""

    graph: Graph
    edges: frozenset
    name: str = "circuit"

    def __post_init__(self):
        unknown = [e for e in self.edges if e not in self.graph.edge_index]
        if unknown:
            raise CircuitError(f"circuit {self.name!r}: {len(unknown)} edges are not in the graph, e.g. {unknown[0]}")

    @classmethod
    def from_names(cls, model_or_graph, edges: Sequence[str], name: str = "circuit") -> "Circuit":
        graph = _graph(model_or_graph)
        if isinstance(edges, str):
            raise CircuitError("from_names takes a list of edges like ['L0H0 -> L2H0.q'], got one string")
        out: set = set()
        for text in edges:
            out.update(graph.parse_edge(text))
        return cls(graph, frozenset(out), name)

    @classmethod
    def induced(cls, model_or_graph, nodes: Sequence[str], name: str = "circuit") -> "Circuit":
        """Every edge among the named components (``tok``, ``pos``, heads, MLPs; ``logits`` is always
        included): a component-level hypothesis written as an edge set."""
        graph = _graph(model_or_graph)
        if isinstance(nodes, str):
            raise CircuitError("induced takes a list of components like ['L0H0', 'MLP0'], got one string")
        keep = {"logits"}
        for n in nodes:
            keep.update(graph.node(n, "sender") if n.strip().lower() not in ("logits", "output", "unembed") else [])
        edges = frozenset((s, r) for s, r in graph.edges if s in keep and r.split(".")[0] in keep)
        return cls(graph, edges, name)

    @classmethod
    def full(cls, model_or_graph, name: str = "full") -> "Circuit":
        graph = _graph(model_or_graph)
        return cls(graph, frozenset(graph.edges), name)

    @classmethod
    def empty(cls, model_or_graph, name: str = "empty") -> "Circuit":
        return cls(_graph(model_or_graph), frozenset(), name)

    @classmethod
    def top_k(cls, model_or_graph, scores: torch.Tensor, k: int, name: Optional[str] = None) -> "Circuit":
        """The k edges with the largest ``scores`` ([n_edges] in ``graph.edges`` order, or a
        [senders, receivers] table); ties broken by edge order (stable)."""
        graph = _graph(model_or_graph)
        order = ranking(graph, scores)
        if not isinstance(k, int) or not 0 <= k <= len(order):
            raise CircuitError(f"top_k needs 0 <= k <= {len(order)} edges, got {k!r}")
        return cls(graph, frozenset(graph.edges[i] for i in order[:k]), name or f"top{k}")

    @classmethod
    def top_fraction(cls, model_or_graph, scores: torch.Tensor, fraction: float, name: Optional[str] = None) -> "Circuit":
        """The top ``round(fraction * n_edges)`` edges (``fraction`` in [0, 1])."""
        graph = _graph(model_or_graph)
        if not 0.0 <= float(fraction) <= 1.0:
            raise CircuitError(f"top_fraction needs a fraction in [0, 1], got {fraction!r}")
        k = int(round(float(fraction) * len(graph.edges)))
        return cls.top_k(graph, scores, k, name or f"top{fraction:.3g}")

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge) -> bool:
        if isinstance(edge, str):
            return all(e in self.edges for e in self.graph.parse_edge(edge))
        return edge in self.edges

    def mask(self, dtype=torch.float32) -> torch.Tensor:
        return self.graph.mask(self.edges, dtype)

    def complement(self, name: Optional[str] = None) -> "Circuit":
        return Circuit(self.graph, frozenset(self.graph.edges) - self.edges, name or f"complement of {self.name}")

    def without(self, *edges, name: Optional[str] = None) -> "Circuit":
        drop = set()
        for e in edges:
            drop.update(self.graph.parse_edge(e) if isinstance(e, str) else [e])
        return Circuit(self.graph, self.edges - drop, name or self.name)

    def union(self, other: "Circuit", name: Optional[str] = None) -> "Circuit":
        return Circuit(self.graph, self.edges | other.edges, name or f"{self.name} + {other.name}")

    def sorted_edges(self) -> list[tuple[str, str]]:
        return sorted(self.edges, key=self.graph.edge_index.__getitem__)

    def names(self) -> list[str]:
        """The edges as 'sender -> receiver' strings, in graph order."""
        return [f"{s} -> {r}" for s, r in self.sorted_edges()]

    def components(self) -> list[str]:
        """Heads and MLPs the circuit touches (as sender or receiver), in forward order."""
        touched = {s for s, _ in self.edges} | {r.split(".")[0] for _, r in self.edges}
        return [s for s in self.graph.senders if s in touched and s not in ("tok", "pos")]

    def about(self) -> list[str]:
        """``@pytest.mark.about`` targets for the circuit's components: ``head:LlHh`` for each head,
        ``mlp:Ll`` for each MLP (their derived mutations break a part the circuit names)."""
        out = []
        for c in self.components():
            out.append(f"head:{c}" if c.startswith("L") else f"mlp:L{c[3:]}")
        return out

    def __repr__(self) -> str:
        return f"Circuit({self.name!r}, {len(self.edges)} of {len(self.graph.edges)} edges)"


def _graph(model_or_graph) -> Graph:
    return model_or_graph if isinstance(model_or_graph, Graph) else Graph.of(model_or_graph)


def ranking(graph: Graph, scores: torch.Tensor) -> list[int]:
    """Edge indices (into ``graph.edges``) by descending score, ties by edge order."""
    scores = torch.as_tensor(scores)
    if scores.ndim == 2:
        if tuple(scores.shape) != (len(graph.senders), len(graph.receivers)):
            raise CircuitError(f"an edge score table must be [senders, receivers] = "
                               f"[{len(graph.senders)}, {len(graph.receivers)}], got {list(scores.shape)}")
        scores = graph.edge_values(scores)
    if scores.ndim != 1 or scores.shape[0] != len(graph.edges):
        raise CircuitError(f"edge scores must be [{len(graph.edges)}] (one per edge) or a [senders, receivers] "
                           f"table, got shape {list(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise CircuitError("edge scores contain NaN or inf")
    s = scores.detach().double().cpu()
    return sorted(range(len(s)), key=lambda i: (-float(s[i]), i))


# --- ablations -----------------------------------------------------------------------------------------


@dataclass
class Ablation:
    """What an edge outside the circuit carries instead of its sender's output.

    ``Ablation.mean(reference)``: each sender's output averaged over a fixed reference set of inputs,
    per position (the reference must have the evaluated inputs' length); ``Ablation.resample(corrupt)``:
    the sender's output on a corrupted input, row by row (same shape as the evaluated inputs);
    ``Ablation.zero()``: nothing."""

    kind: Literal["mean", "resample", "zero"]
    reference: Optional[torch.Tensor] = field(default=None, repr=False)

    @classmethod
    def mean(cls, reference: torch.Tensor) -> "Ablation":
        return cls("mean", reference)

    @classmethod
    def resample(cls, corrupted: torch.Tensor) -> "Ablation":
        return cls("resample", corrupted)

    @classmethod
    def zero(cls) -> "Ablation":
        return cls("zero")

    def describe(self) -> str:
        n = "" if self.reference is None else f" over {self.reference.shape[0]} inputs"
        return {"mean": f"mean ablation{n}", "resample": f"resampling from corrupted inputs{n}",
                "zero": "zero ablation"}[self.kind]


def ablated_outputs(model: HookedTransformer, x: torch.Tensor, ablation: Ablation) -> torch.Tensor:
    """Every sender's ablated output for inputs x: [senders, batch or 1, pos, d_model]."""
    graph = Graph.of(model)
    if not isinstance(ablation, Ablation):
        raise CircuitError(f"ablation must be an Ablation (Ablation.mean(ref), .resample(corrupted), .zero()), "
                           f"got {type(ablation).__name__}")
    if ablation.kind == "zero":
        return torch.zeros(len(graph.senders), 1, x.shape[1], model.cfg.d_model, dtype=_dtype(model), device=x.device)
    ref = ablation.reference
    if not isinstance(ref, torch.Tensor):
        raise CircuitError(f"{ablation.kind} ablation needs a reference tensor of inputs, got {type(ref).__name__}")
    if ref.shape[1:] != x.shape[1:]:
        raise CircuitError(f"{ablation.kind} ablation: reference inputs have shape {list(ref.shape)}, the evaluated "
                           f"inputs {list(x.shape)}; they must match after the batch axis (the same positions)")
    if ablation.kind == "resample" and ref.shape[0] != x.shape[0]:
        raise CircuitError(f"resample ablation: {ref.shape[0]} corrupted inputs for {x.shape[0]} evaluated ones; "
                           "give one corrupted input per row")
    with torch.no_grad():
        outs = sender_outputs(model, ref)  # [senders, batch_ref, pos, d_model]
    return outs.mean(1, keepdim=True) if ablation.kind == "mean" else outs


def sender_outputs(model: HookedTransformer, x: torch.Tensor) -> torch.Tensor:
    """Every sender's output in the unpatched model: [senders, batch, pos, d_model]."""
    graph = Graph.of(model)
    _, outs = _forward(model, graph, x, mask=None, ablated=None, keep_outputs=True)
    return outs


def run_circuit(model: HookedTransformer, x: torch.Tensor, circuit: Circuit, ablation: Union[Ablation, torch.Tensor],
                readout: Optional[str] = None) -> torch.Tensor:
    """The model's logits with every edge outside ``circuit`` patched (see the module docstring).
    ``ablation``: an :class:`Ablation`, or the precomputed :func:`ablated_outputs` for these inputs."""
    graph = Graph.of(model)
    if circuit.graph != graph:
        raise CircuitError(f"circuit {circuit.name!r} was built for {circuit.graph!r}, the model is {graph!r}")
    mask = circuit.mask(_dtype(model)).to(x.device)
    return run_masked(model, x, mask, ablation, readout=readout)


def run_masked(model: HookedTransformer, x: torch.Tensor, mask: torch.Tensor, ablation: Union[Ablation, torch.Tensor],
               readout: Optional[str] = None, embed_alpha: Optional[float] = None,
               grad_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits with receiver inputs ``base + sum_s mask[s, r] * (out_s - ablated_s)``: mask 1 = the
    edge carries its sender's output, 0 = its ablated value, in between a mix (differentiable).

    embed_alpha: the embedding senders (tok, pos) output ``alpha * clean + (1 - alpha) * ablated``
    (the inputs interpolated, as EAP-IG does). grad_basis [senders, batch, pos, d_model]: the edge
    terms read ``(out_s - ablated_s) + (mask - 1) * grad_basis_s`` instead, the same value at mask 1
    with d/d mask = grad_basis (EAP-IG's gradient at interpolated inputs times the clean-minus-ablated
    difference)."""
    graph = Graph.of(model)
    want = (len(graph.senders), len(graph.receivers))
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CircuitError(f"an edge mask must be a tensor [senders, receivers] = {list(want)}, got {got}")
    ablated = ablation if isinstance(ablation, torch.Tensor) else ablated_outputs(model, x, ablation)
    if ablated.shape[0] != want[0] or ablated.shape[2:] != (x.shape[1], model.cfg.d_model) or ablated.shape[1] not in (1, x.shape[0]):
        raise CircuitError(f"ablated outputs must be [senders, batch or 1, pos, d_model] = "
                           f"[{want[0]}, {x.shape[0]} or 1, {x.shape[1]}, {model.cfg.d_model}], got {list(ablated.shape)}")
    mask = mask.to(dtype=ablated.dtype, device=x.device) * graph.valid.to(x.device)
    logits, _ = _forward(model, graph, x, mask=mask, ablated=ablated, readout=readout, embed_alpha=embed_alpha,
                         grad_basis=grad_basis)
    return logits


def _dtype(model) -> torch.dtype:
    return model.unembed.W_U.dtype


def _ln(ln, x: torch.Tensor) -> torch.Tensor:
    if isinstance(ln, LayerNorm):
        return F.layer_norm(x, ln.w.shape, ln.w, ln.b, ln.eps)
    return x


def _forward(model: HookedTransformer, graph: Graph, x: torch.Tensor, mask: Optional[torch.Tensor],
             ablated: Optional[torch.Tensor], readout: Optional[str] = None, keep_outputs: bool = False,
             embed_alpha: Optional[float] = None, grad_basis: Optional[torch.Tensor] = None):
    """The edge-level forward. mask None = every edge carries its sender (the model itself).
    Returns (logits, sender outputs [senders, batch, pos, d_model] when keep_outputs)."""
    cfg = model.cfg
    model._check_input(x)
    key_pad = model.key_padding_mask(x)
    if key_pad is not None and not bool(key_pad.any()):
        key_pad = None
    att_mask = model._attention_mask(key_pad, x.shape[1], x.device)
    B, P = x.shape[0], x.shape[1]
    outs: list[torch.Tensor] = []  # sender outputs in graph order, each [batch, pos, d_model]
    tok = model.hook_embed(model.embed(x))  # [batch, pos, d_model]
    outs.append(tok)
    if graph.has_pos:
        outs.append(model.hook_pos_embed(model.pos_embed(P).expand(B, -1, -1)))  # [batch, pos, d_model]
    if embed_alpha is not None:
        if ablated is None:
            raise CircuitError("embed_alpha needs ablated outputs")
        for i in range(len(outs)):
            outs[i] = embed_alpha * outs[i] + (1 - embed_alpha) * ablated[i].expand_as(outs[i])
    bias = torch.zeros((), dtype=tok.dtype, device=x.device)  # the b_O's upstream
    deltas: list[torch.Tensor] = []  # out_s - ablated_s, [batch, pos, d_model] each
    buffer = None
    if mask is not None and not torch.is_grad_enabled():
        buffer = torch.empty(len(graph.senders), B, P, cfg.d_model, dtype=tok.dtype, device=x.device)
    if ablated is not None:  # abl_cum[n] = sum of the first n senders' ablated outputs
        abl_cum = torch.cat([torch.zeros_like(ablated[:1]), ablated.cumsum(0)])  # [senders + 1, batch or 1, pos, d_model]

    read = readout or cfg.readout
    if read == "all":
        at_readout = None
    elif read == "first" or key_pad is None:
        cut = slice(0, 1) if read == "first" else slice(P - 1, P)
        at_readout = lambda t: t[..., cut, :]  # [..., batch, 1, d_model]
    else:
        rows = torch.arange(B, device=x.device)
        index = model._readout_index(key_pad, read, B, P, x.device)  # [batch]
        at_readout = lambda t: t.expand(*t.shape[:-3], B, P, t.shape[-1])[..., rows, index, :].unsqueeze(-2)

    clean_cum: list[torch.Tensor] = []  # clean_cum[n] = sum of the first n senders' outputs

    def inputs(receivers: list[str], at=None) -> tuple[torch.Tensor, list[int]]:
        """Distinct inputs of receivers sharing one upstream set, [n_distinct, batch, pos, d_model]
        (pos = 1 when `at` selects the read-out position), and which one each receiver reads."""
        n_up = graph.upstream[receivers[0]]
        at = at or (lambda t: t)
        if mask is None:  # the model itself: every sender upstream
            return at(torch.stack(outs[:n_up])).sum(0)[None] + bias, [0] * len(receivers)
        while len(deltas) < n_up:
            i = len(deltas)
            if buffer is not None:  # no graph to keep: write in place, stack for free
                deltas.append(torch.sub(outs[i], ablated[i], out=buffer[i]))
            else:
                deltas.append(outs[i] - ablated[i])
        cols = [graph.receiver_index[r] for r in receivers]
        m = mask[:n_up][:, cols]  # [up, n_receivers]
        if buffer is not None and bool(((m == 0) | (m == 1)).all()):
            return _sparse_inputs(m, n_up, at)
        stack = at(buffer[:n_up] if buffer is not None else torch.stack(deltas[:n_up]))  # [up, batch, pos, d_model]
        shape = stack.shape[1:]
        stack = stack.flatten(1)  # [up, batch*pos*d_model]
        if grad_basis is not None:
            # the value at mask 1 (every edge on), with d/d mask[s, r] = basis_s . d/d input_r
            mixed = stack.sum(0, keepdim=True) + (m - 1).t() @ at(grad_basis[:n_up]).flatten(1)
        else:
            mixed = m.t() @ stack  # [n_receivers, batch*pos*d_model]
        return mixed.view(len(receivers), *shape) + (at(abl_cum[n_up]) + bias), list(range(len(receivers)))

    def _sparse_inputs(m: torch.Tensor, n_up: int, at) -> tuple[torch.Tensor, list[int]]:
        """A 0/1 mask without gradients: each distinct column as the fewer of (ablated + the edges
        on) or (clean - the edges off); identical columns computed once."""
        while len(clean_cum) <= n_up:
            n = len(clean_cum)
            clean_cum.append(torch.zeros_like(outs[0]) if n == 0 else clean_cum[-1] + outs[n - 1])
        distinct: dict[tuple, int] = {}
        values, index = [], []
        for j in range(m.shape[1]):
            key = tuple(int(v) for v in m[:, j].tolist())
            if key not in distinct:
                on = [i for i, v in enumerate(key) if v]
                off = [i for i, v in enumerate(key) if not v]
                if len(off) <= len(on):
                    value = at(clean_cum[n_up]) + bias
                    for i in off:
                        value = value - at(deltas[i])
                else:
                    value = at(abl_cum[n_up]) + bias
                    for i in on:
                        value = value + at(deltas[i])
                distinct[key] = len(values)
                values.append(value.expand(B, *value.shape[1:]))  # a mean ablation's rows are one row
            index.append(distinct[key])
        return torch.stack(values), index

    for l, block in enumerate(model.blocks):
        attn = block.attn
        H, dh = cfg.n_heads, cfg.d_head
        recv = [f"L{l}H{h}.{p}" for p in "qkv" for h in range(H)]  # q|k|v-major, as W_QKV
        xin, which = inputs(recv)  # [distinct, batch, pos, d_model]
        normed = _ln(block.ln1, xin)
        if len(xin) == 1:  # every input alike: the model's fused projection
            qkv = F.linear(normed[0], attn.W_QKV.view(3 * H * dh, -1), attn.b_QKV.view(-1))  # [batch, pos, 3*head*d_head]
            qkv = qkv.view(B, P, 3, H, dh).permute(2, 0, 1, 3, 4)  # [q|k|v, batch, pos, head, d_head]
        else:
            per = normed[torch.tensor(which, device=x.device)].view(3, H, B * P, cfg.d_model)  # [q|k|v, head, batch*pos, d_model]
            qkv = torch.matmul(per, attn.W_QKV.transpose(-1, -2)) + attn.b_QKV[:, :, None]  # [q|k|v, head, batch*pos, d_head]
            qkv = qkv.view(3, H, B, P, dh).permute(0, 2, 3, 1, 4)  # [q|k|v, batch, pos, head, d_head]
        q, k, v = attn.hook_q(qkv[0]), attn.hook_k(qkv[1]), attn.hook_v(qkv[2])
        z = attn.hook_z(attn._scores_pattern_z(q, k, v, att_mask))  # [batch, pos, head, d_head]
        result = head_results(z, attn.W_O)  # [batch, pos, head, d_model]
        if attn.hook_result.fns:
            result = attn.hook_result(result)
        outs += list(result.unbind(2))
        bias = bias + attn.b_O
        if block.has_mlp:
            mlp_in = inputs([f"MLP{l}"])[0][0]  # [batch, pos, d_model]
            outs.append(block.hook_mlp_out(block.mlp(_ln(block.ln2, mlp_in))))  # [batch, pos, d_model]
    resid = inputs(["logits"], at_readout)[0][0]  # [batch, pos or 1, d_model]: only the read-out is read
    if cfg.normalization == "LN":
        resid = _ln(model.ln_final, resid)
    logits = model.unembed(resid)
    if read != "all":
        logits = logits[:, 0]  # [batch, d_vocab_out]
    return logits, (torch.stack(outs) if keep_outputs else None)
