"""Compile the RASP programs of `circuits.tasks.tracr.compiled.PROGRAMS` with Tracr and write them as reference
checkpoints: `fixtures/models/tracr_<name>.safetensors` (our TL-layout weights) + `.card.json`.

Needs the `tracr` extra (`pip install -e .[tracr]`: tracr-pypi, JAX, Haiku beside torch); nothing
at test time imports it. Run from the repository root:

    python scripts/regenerate_tracr.py            # rewrite the files whose content changed
    python scripts/regenerate_tracr.py --check    # exit 1 if a rebuild differs from the shipped files
    python scripts/regenerate_tracr.py --out DIR  # write into DIR instead

Deterministic: the script re-executes itself with PYTHONHASHSEED=0 (RASP labels carry a global
counter and Tracr iterates sets, so programs are compiled in a fixed order in a fresh process), and
a rebuild whose weights bytes and card (apart from its `created` time and the card hash covering it)
equal the shipped files leaves them untouched, so a rerun is bit for bit.

For every program the card's "tracr" section records: the compiler versions, the residual labels
(Tracr's basis directions, one per dimension), token and output encodings, which heads and MLPs read
and write which SOp (from the compiled craft blocks), the stated input set (every sequence of length
1..max_seq_len) and, for each input, the RASP program's outputs (`expected`, by `rasp.evaluate`) and
the compiled Tracr model's (`compiled`). The script refuses to write a model whose Tracr outputs or
converted outputs disagree with the program on any input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reexec_with_fixed_hash_seed() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))


def compile_program(name: str):
    """(assembled model, rasp graph, sink node, craft model) for PROGRAMS[name]."""
    from tracr.compiler import (basis_inference, craft_graph_to_model, craft_model_to_transformer,
                                expr_to_craft_graph, lib, rasp_to_graph)
    from tracr.craft import bases
    from tracr.rasp import rasp

    from circuits.tasks.tracr.compiled import BOS, PAD, PROGRAMS

    prog = PROGRAMS[name]
    program = eval(prog.source, {"lib": lib, "rasp": rasp})  # the table's own expression, not user input
    # compile_rasp_to_model's steps, kept apart to keep the graph and craft model (who writes what)
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, set(prog.vocab), prog.max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, BOS), mlp_exactness=100)
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=prog.max_seq_len, causal=prog.causal,
        compiler_bos=BOS, compiler_pad=PAD)
    return program, assembled, graph, sink, craft_model


def _sop(direction) -> str:
    return str(direction.name)


def sublayers(assembled, craft_model, residual_labels) -> list[dict]:
    """Which sublayer (layer, attn head / mlp) reads and writes which SOp."""
    from tracr.compiler import assemble
    from tracr.craft import transformers

    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    out = []
    for module_name, block in zip(module_names, craft_model.blocks):
        layer = int(module_name.split("/")[1].split("_")[1])
        if isinstance(block, transformers.MLP):
            out.append({"layer": layer, "kind": "mlp",
                        "reads": sorted({_sop(d) for d in block.fst.input_space.basis}),
                        "writes": sorted({_sop(d) for d in block.snd.output_space.basis}),
                        "hidden": int(block.fst.output_space.num_dims)})
        else:
            for h, head in enumerate(block.as_multi().heads()):
                out.append({"layer": layer, "kind": "attn", "head": h,
                            "query_reads": sorted({_sop(d) for d in head.w_qk.left_space.basis}),
                            "key_reads": sorted({_sop(d) for d in head.w_qk.right_space.basis}),
                            "value_reads": sorted({_sop(d) for d in head.w_ov.input_space.basis}),
                            "writes": sorted({_sop(d) for d in head.w_ov.output_space.basis})})
    return out


def _json_value(v):
    import numpy as np

    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def build(name: str) -> tuple[dict, dict]:
    """(TL state dict, card) for PROGRAMS[name]."""
    import numpy as np
    import torch
    from tracr.compiler import nodes
    from tracr.rasp import rasp

    from circuits.model.transformer import HookedTransformer
    from circuits.model.convert import load_tl_state_dict
    from circuits.tasks.tracr import compiled as T

    prog = T.PROGRAMS[name]
    program, assembled, graph, sink, craft_model = compile_program(name)
    labels = list(assembled.residual_labels)
    cfg = assembled.model_config
    categorical = rasp.is_categorical(sink[nodes.EXPR])
    out_basis = list(sink[nodes.OUTPUT_BASIS])
    out_dims = [labels.index(str(d)) for d in out_basis]
    unembed = np.zeros((len(labels), len(out_dims)), dtype=np.float32)
    for j, i in enumerate(out_dims):
        unembed[i, j] = 1.0
    token_ids = {T._key(k): int(v) for k, v in assembled.input_encoder.encoding_map.items()}
    sops: dict[str, list] = {}
    for i, label in enumerate(labels):
        sops.setdefault(label.split(":", 1)[0], []).append(i)
    program_sops = {}
    for node_label, node in graph.nodes.items():
        expr = node[nodes.EXPR]
        if node_label in sops:
            program_sops[node_label] = {"kind": "categorical" if rasp.is_categorical(expr) else "numerical",
                                        "dims": sops[node_label], "type": type(expr).__name__}
    params = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in assembled.params.items()}
    tracr = {
        "versions": {p: importlib.metadata.version(p) for p in T.TRACR_PINS},
        "program": prog.to_dict(),
        "residual_labels": labels,
        "sops": program_sops,
        "token_ids": token_ids, "bos": T.BOS, "pad": T.PAD,
        "output": {"sop": sink[nodes.EXPR].label, "kind": "categorical" if categorical else "numerical",
                   "dims": out_dims,
                   "values": [_json_value(d.value) for d in out_basis] if categorical else None},
        "architecture": {"n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "d_head": cfg.key_size,
                         "d_mlp": cfg.mlp_hidden_size, "max_seq_len": prog.max_seq_len, "causal": prog.causal},
        "sublayers": sublayers(assembled, craft_model, labels),
        "input_set": f"every sequence over {list(prog.vocab)} of length 1..{prog.max_seq_len}, BOS prepended",
    }
    state = T.tl_state_from_tracr(params, cfg.num_layers, cfg.num_heads, cfg.key_size, unembed)
    model = HookedTransformer(T.config_from_card(tracr)).eval()
    load_tl_state_dict(model, state)
    inputs, expected, compiled = [], [], []
    problems = []
    for seq in T.inputs_of(prog):
        want = [_json_value(v) for v in rasp.evaluate(program, list(seq))]
        got = [_json_value(v) for v in assembled.apply([T.BOS, *seq]).decoded[1:]]
        with torch.no_grad():
            ours = T.decode_outputs(tracr, model(T.encode(tracr, [seq])))[0]
        if categorical:
            if got != want or ours != want:
                problems.append(f"{seq}: program {want}, tracr {got}, ours {ours}")
        else:
            if max(abs(a - b) for a, b in zip(got, want)) > 1e-3 or max(abs(a - b) for a, b in zip(ours, got)) > 1e-5:
                problems.append(f"{seq}: program {want}, tracr {got}, ours {ours}")
        inputs.append(list(seq))
        expected.append(want)
        compiled.append(got)
    if problems:
        raise SystemExit(f"{name}: {len(problems)} inputs disagree, e.g. " + "; ".join(problems[:3]))
    tracr.update(inputs=inputs, expected=expected, compiled=compiled)
    card = {"spec": T.spec(name), "tracr": tracr, "metrics": {"n_inputs": len(inputs)}}
    return state, card


def _same(new_dir: Path, old_dir: Path, stem: str) -> bool:
    """The rebuilt files equal the old ones: weights byte for byte, card apart from created/card_hash."""
    w_new, w_old = new_dir / f"{stem}.safetensors", old_dir / f"{stem}.safetensors"
    c_new, c_old = new_dir / f"{stem}.card.json", old_dir / f"{stem}.card.json"
    if not (w_old.exists() and c_old.exists()) or w_new.read_bytes() != w_old.read_bytes():
        return False
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k not in ("created", "card_hash")}
    try:
        return strip(c_new) == strip(c_old)
    except json.JSONDecodeError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="rebuild and compare; write nothing; exit 1 on a difference")
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "models")
    ap.add_argument("--allow-versions", action="store_true", help="compile with other tracr/jax versions than pinned")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from circuits.atomic import write_bytes_atomic
    from circuits.zoo.store import save_reference
    from circuits.tasks.tracr.compiled import PROGRAMS, TRACR_PINS, entry_name

    installed = {p: importlib.metadata.version(p) for p in TRACR_PINS}
    if installed != TRACR_PINS and not args.allow_versions:
        raise SystemExit(f"installed {installed} differ from the pinned {TRACR_PINS} "
                         f"(pip install -e .[tracr], or --allow-versions to compile anyway)")
    differ = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROGRAMS:  # a fixed order: RASP labels count up across programs
            stem = entry_name(name)
            state, card = build(name)
            save_reference(tmp, stem, state, card)
            if _same(Path(tmp), args.out, stem):
                print(f"{stem}: unchanged")
                continue
            differ.append(stem)
            if args.check:
                print(f"{stem}: DIFFERS from {args.out}")
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            for suffix in (".safetensors", ".card.json"):
                write_bytes_atomic(args.out / f"{stem}{suffix}", (Path(tmp) / f"{stem}{suffix}").read_bytes())
            print(f"{stem}: written to {args.out}")
    return 1 if (args.check and differ) else 0


if __name__ == "__main__":
    _reexec_with_fixed_hash_seed()
    sys.exit(main())
