"""Print the README's circuit tables (Markdown): MIB faithfulness / CPR / CMD on the ARENA checkpoint
and edge-recovery AUROC of each discovery method on the Tracr programs, with the same data, splits
and procedures as the hypotheses modules (hypotheses/test_circuit_arena.py, test_circuit_ground_truth.py).

    python scripts/circuit_tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hypotheses"))

from circuits.claims import circuit as CC  # noqa: E402
from circuits.analysis import discovery as D  # noqa: E402
from circuits.tasks.brackets import reference
from circuits.zoo import registry as zoo  # noqa: E402
from circuits.analysis.circuit import Ablation, Circuit  # noqa: E402
from circuits.analysis.interventions import reinitialize  # noqa: E402
from circuits.claims.stats import auroc_ci  # noqa: E402


def _ci(est) -> str:
    return f"{est.point:.3f} [{est.lo:.3f}, {est.hi:.3f}]"


def arena() -> None:
    import test_circuit_arena as TA

    model = reference.arena_model()
    data = reference.arena_data(reference.N_EVAL)
    ev = TA._evaluator(model, data, TA.CLAIM_ROWS)
    found = TA._evaluator(model, data, TA.DISCOVERY_ROWS)
    untrained = TA._evaluator(reinitialize(model), data, TA.DISCOVERY_ROWS)
    redwood = Circuit.induced(model, TA.REDWOOD_NODES, "Redwood's circuit")
    print("| circuit (ARENA checkpoint, mean ablation, strings 0-299) | edges | faithfulness f | f of the complement |")
    print("|---|---|---|---|")
    variants = [("Redwood: {tok, 0.0, MLP0, MLP1, 1.0, 2.0, 2.1} -> logits", redwood),
                ("... without 1.0", Circuit.induced(model, [n for n in TA.REDWOOD_NODES if n != "L1H0"])),
                ("... 1.0 replaced by 1.1", Circuit.induced(model, ["tok", "L0H0", "MLP0", "MLP1", "L1H1", "L2H0", "L2H1"])),
                ("... without 2.1", Circuit.induced(model, [n for n in TA.REDWOOD_NODES if n != "L2H1"])),
                ("... 0.0 replaced by 0.1", Circuit.induced(model, ["tok", "L0H1", "MLP0", "MLP1", "L1H0", "L2H0", "L2H1"]))]
    for name, c in variants:
        print(f"| {name} | {len(c)} | {_ci(CC.faithfulness(ev, c))} | {_ci(CC.faithfulness(ev, c.complement()))} |")
    g = torch.Generator().manual_seed(0)
    rankings = {"EAP": D.eap(found).scores, "EAP-IG (5 steps)": D.eap_ig(found, steps=5).scores,
                "ACDC (tau 0.01)": D.acdc(found, tau=0.01).scores,
                "random ranking": torch.rand(len(ev.graph.edges), generator=g, dtype=torch.float64),
                "EAP-IG on the untrained model": D.eap_ig(untrained, steps=3).scores}
    print()
    print("| ranking (found on strings 1,000-1,299) | CPR (higher is better) | CMD (lower is better) | "
          + " | ".join(f"f at {p:g}%" for p in CC.MIB_PERCENTS) + " |")
    print("|---|---|---|" + "---|" * len(CC.MIB_PERCENTS))
    for name, s in rankings.items():
        c = CC.mib_curve(ev, s, method=name)
        print(f"| {name} | {_ci(c.cpr)} | {_ci(c.cmd)} | " + " | ".join(f"{v:.2f}" for v in c.f) + " |")


def ground_truth() -> None:
    import test_circuit_ground_truth as TG
    from circuits.tasks.tracr.circuit import compiled_circuit  # noqa: F401 (used by Program)

    print()
    print("| program (edges, compiled) | ablation | EAP | EAP-IG (5 steps) | ACDC (tau 0.01) |")
    print("|---|---|---|---|---|")
    for name in TG.PROGRAMS:
        prog = TG.Program(name, zoo.load(f"tracr_{name}").model)
        inside = np.array([e in prog.truth.edges for e in prog.truth.graph.edges])
        for ablation in (Ablation.zero(), Ablation.mean(prog.x)):
            ev = CC.Evaluator(prog.model, prog.x, prog.labels, ablation, prog.metric)
            cells = []
            for found in (D.eap(ev), D.eap_ig(ev, steps=5), D.acdc(ev, tau=0.01)):
                s = found.scores.numpy()
                cells.append(_ci(auroc_ci(s[inside], s[~inside])))
            print(f"| {name} ({len(inside)}, {inside.sum()}) | {ablation.kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    arena()
    ground_truth()
