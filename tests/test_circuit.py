"""Edge-level circuits: the exactness identities the metrics rely on, names and their errors."""

from __future__ import annotations

import pytest
import torch

from circuits.tasks import known_circuit as K
from circuits.analysis.circuit import Ablation, Circuit, CircuitError, Graph, ablated_outputs, run_circuit, run_masked
from circuits.errors import CircuitsError
from circuits.model.transformer import HookedTransformer

from model_configs import CONFIGS, perturbed_model


def _inputs(model: HookedTransformer, n: int, seed: int) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    P = cfg.n_ctx
    if cfg.d_input:
        return torch.randn(n, P, cfg.d_input, generator=g, dtype=model.unembed.W_U.dtype)
    toks = torch.randint(0, cfg.d_vocab, (n, P), generator=g)
    if cfg.pad_token is not None:  # some real padding at the end of rows, never the read-out position
        toks[toks == cfg.pad_token] = (cfg.pad_token + 1) % cfg.d_vocab
        lengths = torch.randint(P // 2, P + 1, (n,), generator=g)
        toks[torch.arange(P)[None] >= lengths[:, None]] = cfg.pad_token
    return toks


def _scale(logits: torch.Tensor) -> float:
    return max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_full_circuit_is_the_model(name, dtype, tol):
    model = perturbed_model(name, dtype=dtype)
    x = _inputs(model, 12, 0)
    with torch.no_grad():
        want = model(x)
        for ablation in (Ablation.zero(), Ablation.mean(_inputs(model, 20, 1))):
            got = run_circuit(model, x, Circuit.full(model), ablation)
            assert (got - want).abs().max() <= tol * _scale(want), (name, ablation.kind)


def _fully_ablated(model: HookedTransformer, x: torch.Tensor, ablation: Ablation) -> torch.Tensor:
    """The model with every sender's output replaced by its ablated value, through ordinary hooks."""
    graph = Graph.of(model)
    abl = ablated_outputs(model, x, ablation)  # [senders, batch or 1, pos, d_model]
    row = graph.sender_index
    hooks = [("hook_embed", lambda a, hook: abl[row["tok"]].expand_as(a).clone())]
    if graph.has_pos:
        hooks.append(("hook_pos_embed", lambda a, hook: abl[row["pos"]].expand_as(a).clone()))
    for l in range(model.cfg.n_layers):
        W_O = model.blocks[l].attn.W_O  # [head, d_head, d_model]
        # a head's ablated output as a z: the output map is linear and W_O is invertible on its row space;
        # simpler: replace hook_result (per-head outputs) directly
        heads = torch.stack([abl[row[f"L{l}H{h}"]] for h in range(model.cfg.n_heads)], 2)  # [b, pos, head, d_model]
        hooks.append((f"blocks.{l}.attn.hook_result", lambda a, hook, heads=heads: heads.expand_as(a).clone()))
        if model.cfg.d_mlp:
            hooks.append((f"blocks.{l}.hook_mlp_out", lambda a, hook, l=l: abl[row[f"MLP{l}"]].expand_as(a).clone()))
    return model.run_with_hooks(x, fwd_hooks=hooks)


@pytest.mark.parametrize("name", ["brackets", "palindrome", "causal_padded", "read_in"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_empty_circuit_is_the_fully_ablated_model(name, kind):
    model = perturbed_model(name, dtype=torch.float64)
    x = _inputs(model, 10, 0)
    ablation = Ablation.zero() if kind == "zero" else Ablation.mean(_inputs(model, 30, 1))
    with torch.no_grad():
        got = run_circuit(model, x, Circuit.empty(model), ablation)
        want = _fully_ablated(model, x, ablation)
    assert (got - want).abs().max() <= 1e-10 * _scale(want)


@pytest.mark.parametrize("name", ["brackets", "palindrome", "causal_padded"])
def test_empty_circuit_under_resampling_is_the_model_on_the_corrupted_input(name):
    model = perturbed_model(name, dtype=torch.float64)
    x, corrupt = _inputs(model, 10, 0), _inputs(model, 10, 1)
    if model.cfg.pad_token is not None:  # the padding mask is the evaluated input's: give both the same
        corrupt[x == model.cfg.pad_token] = model.cfg.pad_token
        corrupt[(x != model.cfg.pad_token) & (corrupt == model.cfg.pad_token)] = (model.cfg.pad_token + 1) % model.cfg.d_vocab
    with torch.no_grad():
        got = run_circuit(model, x, Circuit.empty(model), Ablation.resample(corrupt))
        want = model(corrupt)
    assert (got - want).abs().max() <= 1e-10 * _scale(want)


def test_mask_is_linear_where_the_model_is():
    """On the known-circuit model (linear in every edge) a half mask gives the average of the two
    endpoints; the mask's gradient is each edge's exact patching effect."""
    model = K.build(torch.float64)
    x, ref = K.make_inputs(50, 0), K.make_inputs(50, 1)
    graph = Graph.of(model)
    abl = ablated_outputs(model, x, Ablation.resample(ref))
    with torch.no_grad():
        full = run_masked(model, x, torch.ones(len(graph.senders), len(graph.receivers), dtype=torch.float64), abl)
        empty = run_masked(model, x, torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64), abl)
    # uniform attention, no LN: the path tok -> L0H0 -> L1H0 -> logits is a product of three mask entries
    path = Circuit.from_names(model, K.TRUE_EDGES).mask(torch.float64)
    half = torch.ones_like(path) - 0.5 * path  # each path edge at 0.5: the path's term scales by 1/8
    with torch.no_grad():
        mixed = run_masked(model, x, half, abl)
    assert torch.allclose(mixed, empty + (full - empty) / 8, atol=1e-12)


def test_ablations_check_their_reference():
    model = K.build()
    x = K.make_inputs(8, 0)
    with pytest.raises(CircuitError, match="reference inputs have shape"):
        run_circuit(model, x, Circuit.full(model), Ablation.mean(torch.zeros(4, 3, dtype=torch.long)))
    with pytest.raises(CircuitError, match="one corrupted input per row"):
        run_circuit(model, x, Circuit.full(model), Ablation.resample(K.make_inputs(5, 1)))
    with pytest.raises(CircuitError, match="needs a reference tensor"):
        run_circuit(model, x, Circuit.full(model), Ablation("mean", None))
    with pytest.raises(CircuitError, match=r"edge mask must be a tensor \[senders, receivers\]"):
        run_masked(model, x, torch.ones(3, 3), Ablation.zero())


def test_graph_of_the_known_model():
    g = Graph.of(K.build())
    assert g.senders == ("tok", "pos", "L0H0", "L0H1", "L1H0", "L1H1")
    assert g.receivers[-1] == "logits" and len(g.receivers) == 13
    # layer 0's six inputs read tok, pos; layer 1's six read 4 senders; the logits all 6
    assert len(g.edges) == 6 * 2 + 6 * 4 + 6 == 42
    assert g.valid.sum() == 42


def test_names_and_aliases():
    model = perturbed_model("brackets")
    c = Circuit.from_names(model, ["0.0 -> 1.0.v", "embed -> L0H0", "L0.mlp -> MLP1", "MLP2 -> output"])
    assert c.names() == ["tok -> L0H0.q", "tok -> L0H0.k", "tok -> L0H0.v", "L0H0 -> L1H0.v", "MLP0 -> MLP1",
                         "MLP2 -> logits"]
    assert "0.0 -> L1H0.v" in c and "tok -> L0H0" in c and "pos -> L0H0.q" not in c
    assert c.about() == ["head:L0H0", "mlp:L0", "head:L1H0", "mlp:L1", "mlp:L2"]
    assert len(c.complement()) == len(Graph.of(model).edges) - len(c)
    assert c.without("MLP0 -> MLP1").names()[-1] == "MLP2 -> logits" and len(c.without("tok -> L0H0")) == 3


@pytest.mark.parametrize("edge,message", [
    ("L3H0 -> logits", "no head 'L3H0': the model has 3 layers x 2 heads"),
    ("L0H2 -> logits", "no head 'L0H2'"),
    ("L2H0 -> L1H0.q", "does not exist: L2H0 is not upstream of L1H0.q"),
    ("L1H0 -> L1H1.q", "does not exist"),
    ("MLP1 -> MLP1", "does not exist"),
    ("L0H0 -> L1H0.x", "did you mean"),
    ("MLP0 -> MLP0.q", "only a head has q / k / v inputs"),
    ("logits -> L1H0.q", "'logits' is not a sender"),
    ("L0H0 -> tok", "'tok' is not a receiver"),
    ("MLP5 -> logits", "no MLP 'MLP5': the model has 3 layers"),
    ("L0H0 L1H0", "an edge is written 'SENDER -> RECEIVER'"),
    ("L0H0 -> -> L1H0", "an edge is written"),
    ("  -> logits", "non-empty name"),
])
def test_bad_names_say_what_is_wrong(edge, message):
    model = perturbed_model("brackets")
    with pytest.raises(CircuitError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as info:
        Circuit.from_names(model, [edge])
    assert isinstance(info.value, CircuitsError) and "\n" not in str(info.value)


def test_attention_only_and_positionless_models_name_what_they_lack():
    model = perturbed_model("attn_only")
    with pytest.raises(CircuitError, match="attention-only"):
        Circuit.from_names(model, ["MLP0 -> logits"])
    with pytest.raises(CircuitError, match="no positional embedding"):
        Circuit.from_names(model, ["pos -> logits"])


def test_circuits_check_their_graph_and_ranking():
    model, other = perturbed_model("brackets"), perturbed_model("palindrome")
    with pytest.raises(CircuitError, match="was built for"):
        run_circuit(other, torch.zeros(2, 12, dtype=torch.long), Circuit.full(model), Ablation.zero())
    with pytest.raises(CircuitError, match="one string"):
        Circuit.from_names(model, "L0H0 -> logits")
    n = len(Graph.of(model).edges)
    with pytest.raises(CircuitError, match=f"edge scores must be \\[{n}\\]"):
        Circuit.top_k(model, torch.zeros(5), 2)
    with pytest.raises(CircuitError, match="NaN"):
        Circuit.top_k(model, torch.full((n,), float("nan")), 2)
    with pytest.raises(CircuitError, match="0 <= k"):
        Circuit.top_k(model, torch.zeros(n), n + 1)
    scores = torch.arange(n, dtype=torch.float64)
    top = Circuit.top_k(model, scores, 3)
    assert top.edges == {Graph.of(model).edges[i] for i in (n - 1, n - 2, n - 3)}
    assert len(Circuit.top_fraction(model, scores, 0.5)) == round(0.5 * n)
    with pytest.raises(CircuitError, match="circuits need a circuits HookedTransformer"):
        Graph.of(torch.nn.Linear(2, 2))
