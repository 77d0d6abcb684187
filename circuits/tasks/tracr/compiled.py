"""Tracr-compiled RASP programs as ground-truth models: the programs, their conversion into our
HookedTransformer, and their zoo entries (compiled, never trained).

Tracr (Lindner et al. 2023, the `tracr-pypi` package) compiles a RASP program into transformer
weights whose residual stream is a direct sum of labelled subspaces, one per RASP variable (SOp):
a categorical SOp `x` owns one dimension per value (`x:v`), a numerical SOp one dimension (`x`).
So which layer and head computes which SOp, and where it is written, is known exactly: that is what
`hypotheses/test_ground_truth.py` states claims about.

What lives where:
  * `PROGRAMS` (here): each program's RASP source, vocabulary, max_seq_len and masking. It is the
    zoo entry's spec, so editing it makes the shipped files stale (StaleCheckpointError).
  * `scripts/regenerate_tracr.py` (needs the `tracr` extra: tracr-pypi, JAX, Haiku): compiles each
    program, converts the Haiku parameters with `tl_state_from_tracr` (here, numpy in, torch out),
    and writes `fixtures/models/tracr_<name>.safetensors` + `.card.json` (via `circuits.zoo.store`), the
    card holding the residual labels, token and output encodings, which sublayer reads and writes
    which SOp, the input set and the program's outputs on every input of it.
  * At test time nothing imports JAX: the zoo loads the shipped TL-layout weights like any reference.

The compiled architecture, and how our TransformerConfig expresses it exactly: no LayerNorm
(`normalization=None`), ReLU MLPs, every layer an attention sublayer then an MLP (Tracr zero-fills
the sublayers a program does not use), heads zero-padded to one `d_head` (Tracr's key_size),
attention scaled by 1/sqrt(d_head) as ours, all biases zero, learned (one-hot) token and position
embeddings, BOS at position 0 (it has no positional embedding: Tracr's row 0 is zero, so RASP index i
is position i + 1), `pad_token=None` (Tracr's compiled model does not mask its pad token), causal or
not as compiled. The unembed `W_U` is the projection onto the output SOp's dimensions: the argmax
over them is a categorical output's value index, and the one column of a numerical output is its value.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from circuits.errors import ConfigError, InputError

__all__ = ["TracrProgram", "PROGRAMS", "TRACR_PINS", "FORMAT", "entry_name", "card_path", "read_card",
           "config_from_card", "tl_state_from_tracr", "encode", "decode_outputs", "inputs_of", "component_of",
           "ground_truth_edges", "zoo_entries"]

# the compiler versions the shipped files come from (the `tracr` extra pins the same)
TRACR_PINS = {"tracr-pypi": "1.0.0", "jax": "0.10.2", "dm-haiku": "0.0.17", "numpy": "2.4.6"}
FORMAT = "circuits-tracr/1"  # the layout of the card's "tracr" section and of the converted weights
BOS = "compiler_bos"
PAD = "compiler_pad"


@dataclass(frozen=True)
class TracrProgram:
    source: str  # a Python expression over tracr's `lib` and `rasp` that builds the program's output SOp
    vocab: tuple  # the input tokens (RASP values)
    max_seq_len: int  # tokens after BOS
    causal: bool
    about: str  # what the program computes, in words

    def to_dict(self) -> dict:
        return {**asdict(self), "vocab": list(self.vocab)}


PROGRAMS: dict[str, TracrProgram] = {
    "shuffle_dyck": TracrProgram(
        source='lib.make_shuffle_dyck(pairs=["()"])', vocab=("(", ")"), max_seq_len=6, causal=False,
        about="1 at every position iff the whole string is a balanced bracket string: the running balance "
              "from the open and close proportions (frac_prevs), any negative prefix, the last balance zero"),
    "frac_prevs": TracrProgram(
        source='lib.make_frac_prevs(rasp.tokens == "a")', vocab=("a", "b", "c"), max_seq_len=5, causal=True,
        about="at position i, the fraction of tokens 0..i that are 'a' (a numerical mean over a causal prefix)"),
    "hist": TracrProgram(
        source="lib.make_hist()", vocab=("a", "b", "c"), max_seq_len=5, causal=False,
        about="at position i, how many tokens of the sequence equal token i (SelectorWidth of same-token)"),
}


def entry_name(program: str) -> str:
    return f"tracr_{program}"


def card_path(program: str, reference_dir: Optional[Path] = None) -> Path:
    from circuits.paths import reference_dir as default_dir

    return Path(reference_dir or default_dir()) / f"{entry_name(program)}.card.json"


def read_card(program: str, reference_dir: Optional[Path] = None) -> dict:
    """The program's card (JSON only: hashes are checked when the zoo loads the weights)."""
    path = card_path(program, reference_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: restore it from git or run scripts/regenerate_tracr.py "
                          f"(needs `pip install -e .[tracr]`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable card ({e}): restore it from git or rerun "
                          f"scripts/regenerate_tracr.py") from None


def spec(program: str) -> dict:
    """What determines the compiled weights: the store key of the shipped files is its hash."""
    return {"name": entry_name(program), "family": "tracr", "program": PROGRAMS[program].to_dict(),
            "compiler": dict(TRACR_PINS), "format": FORMAT}


# --- conversion: Tracr's Haiku parameters (numpy) -> our TL-layout state dict --------------------------

def config_from_card(tracr: Mapping[str, Any]):
    """Our TransformerConfig for a compiled model, from the card's "tracr" section."""
    from circuits.model.transformer import TransformerConfig

    arch = tracr["architecture"]
    return TransformerConfig(
        n_layers=arch["n_layers"], d_model=len(tracr["residual_labels"]), n_ctx=arch["max_seq_len"] + 1,
        n_heads=arch["n_heads"], d_head=arch["d_head"], d_mlp=arch["d_mlp"], d_vocab=len(tracr["token_ids"]),
        d_vocab_out=len(tracr["output"]["dims"]), act_fn="relu", normalization=None,
        attention="causal" if arch["causal"] else "bidirectional", pad_token=None, positional="learned",
        embed="learned", unembed="learned", readout="all")


def tl_state_from_tracr(params: Mapping[str, Mapping[str, np.ndarray]], n_layers: int, n_heads: int,
                        d_head: int, unembed: np.ndarray) -> dict[str, torch.Tensor]:
    """Tracr's assembled Haiku parameters (`model.params`, as numpy) -> a TL state dict for our
    HookedTransformer. Haiku's query/key/value `w` is [d_model, head*d_head] (head-major), its
    attention `linear` w [head*d_head, d_model]; MLP linear_1/linear_2 are W_in/W_out as they are.
    unembed: [d_model, d_vocab_out], the projection onto the output SOp's dimensions."""
    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    def heads_in(w) -> torch.Tensor:  # [d_model, head*d_head] -> [head, d_model, d_head]
        w = t(w)
        return w.view(w.shape[0], n_heads, d_head).permute(1, 0, 2).contiguous()

    state = {"embed.W_E": t(params["token_embed"]["embeddings"]),  # [d_vocab, d_model]
             "pos_embed.W_pos": t(params["pos_embed"]["embeddings"])}  # [n_ctx, d_model]
    for layer in range(n_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        ours = f"blocks.{layer}."
        for name, hk in (("Q", "query"), ("K", "key"), ("V", "value")):
            state[ours + f"attn.W_{name}"] = heads_in(params[f"{attn}/{hk}"]["w"])  # [head, d_model, d_head]
            state[ours + f"attn.b_{name}"] = t(params[f"{attn}/{hk}"]["b"]).view(n_heads, d_head)  # [head, d_head]
        W_O = t(params[f"{attn}/linear"]["w"])  # [head*d_head, d_model]
        state[ours + "attn.W_O"] = W_O.view(n_heads, d_head, W_O.shape[-1]).contiguous()  # [head, d_head, d_model]
        state[ours + "attn.b_O"] = t(params[f"{attn}/linear"]["b"])  # [d_model]
        state[ours + "mlp.W_in"] = t(params[f"{mlp}/linear_1"]["w"])  # [d_model, d_mlp]
        state[ours + "mlp.b_in"] = t(params[f"{mlp}/linear_1"]["b"])  # [d_mlp]
        state[ours + "mlp.W_out"] = t(params[f"{mlp}/linear_2"]["w"])  # [d_mlp, d_model]
        state[ours + "mlp.b_out"] = t(params[f"{mlp}/linear_2"]["b"])  # [d_model]
    state["unembed.W_U"] = t(unembed)  # [d_model, d_vocab_out]
    state["unembed.b_U"] = torch.zeros(unembed.shape[1])  # [d_vocab_out]
    return state


# --- inputs and outputs ---------------------------------------------------------------------------------

def inputs_of(program: TracrProgram) -> list[tuple]:
    """The stated input set: every sequence over the vocabulary of length 1..max_seq_len."""
    return [seq for n in range(1, program.max_seq_len + 1) for seq in itertools.product(program.vocab, repeat=n)]


def encode(tracr: Mapping[str, Any], seqs: Sequence[Sequence]) -> torch.Tensor:
    """Sequences of one length (RASP values) -> token ids with BOS at position 0: [batch, 1 + len]."""
    ids = tracr["token_ids"]
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise InputError(f"encode takes sequences of one length (no padding in a compiled model), got lengths {sorted(lengths)}")
    try:
        rows = [[ids[BOS]] + [ids[_key(v)] for v in s] for s in seqs]
    except KeyError as e:
        raise InputError(f"token {e.args[0]!r} is not in the compiled vocabulary {sorted(ids)}") from None
    return torch.tensor(rows, dtype=torch.long)


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def decode_outputs(tracr: Mapping[str, Any], logits: torch.Tensor) -> list[list]:
    """The program's output at every token position (BOS excluded) from the model's logits
    [batch, pos, d_vocab_out]: the argmax's value (categorical), or the single column (numerical)."""
    out = tracr["output"]
    body = logits[:, 1:]  # [batch, len, d_vocab_out]
    if out["kind"] == "categorical":
        values = out["values"]
        return [[values[i] for i in row] for row in body.argmax(-1).tolist()]
    return body[..., 0].tolist()


# --- the known circuit ----------------------------------------------------------------------------------

def component_of(sublayer: Mapping[str, Any]) -> str:
    """A card's sublayer as a component label: "L1H0" (attention head), "L2.mlp" (MLP)."""
    if sublayer["kind"] == "attn":
        return f"L{sublayer['layer']}H{sublayer['head']}"
    return f"L{sublayer['layer']}.mlp"


def ground_truth_edges(tracr: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """The compiled model's computational graph, from its card: (writer, reader, SOp) for every SOp a
    component reads that an earlier component (or the embeddings) wrote. Writers: "embed" (tokens and
    the constant "one" direction), "pos_embed" (indices), heads "L<l>H<h>", MLPs "L<l>.mlp"; the
    reader "logits" reads the output SOp. What Tracr compiled, so a circuit-discovery method can be
    scored against it (a head or MLP absent from every edge is unused)."""
    order = lambda sub: (sub["layer"], sub["kind"] == "mlp")  # attention, then the MLP, layer by layer
    writers: list[tuple[tuple, str, set]] = [((-1, False), "embed", {"tokens", "one"}),
                                             ((-1, False), "pos_embed", {"indices"})]
    for sub in tracr["sublayers"]:
        writers.append((order(sub), component_of(sub), set(sub["writes"])))
    edges = set()
    readers = [(order(sub), component_of(sub),
                set(sub.get("reads", [])) | set(sub.get("query_reads", [])) | set(sub.get("key_reads", []))
                | set(sub.get("value_reads", []))) for sub in tracr["sublayers"]]
    readers.append(((1 << 30, True), "logits", {tracr["output"]["sop"]}))
    for when, reader, reads in readers:
        for sop in reads:
            for w_when, writer, writes in writers:
                if sop in writes and w_when < when and writer != reader:
                    edges.add((writer, reader, sop))
    return edges


# --- zoo --------------------------------------------------------------------------------------------------

def _not_trained(entry, seed, progress):
    raise ConfigError(f"{entry.name} is compiled by Tracr, not trained: its one model is the shipped "
                      f"fixtures/models/{entry.name}.* (regenerate with scripts/regenerate_tracr.py)")


def zoo_entries() -> list:
    from circuits.zoo.registry import ZooEntry

    entries = []
    for program, prog in PROGRAMS.items():
        try:
            config = config_from_card(read_card(program)["tracr"])
        except (ConfigError, KeyError, TypeError):
            config = None  # a missing or broken card: loading says so (load_reference names the problem)
        entries.append(ZooEntry(
            name=entry_name(program), description=f"Tracr-compiled RASP {prog.source}: {prog.about}",
            config=config, recipe=None, train_fn=_not_trained, spec_fn=lambda entry, seed, p=program: spec(p),
            family="tracr", compiled=True, extra={"program": prog.to_dict()}))
    return entries
