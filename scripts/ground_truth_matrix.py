"""Print the ground-truth confusion matrix (claim type x TRUE/FALSE x pass/fail) of a run as Markdown:
what the README's "Ground truth" section shows. From the repository root:

    pytest hypotheses/test_ground_truth.py && python scripts/ground_truth_matrix.py [reports/<run>/report.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    from circuits.errors import CircuitsError
    from circuits.report.json_io import resolve_report
    from circuits.report.views import ground_truth_matrix, ground_truth_table

    try:
        path = resolve_report(argv[0] if argv else "latest", ROOT / "reports")
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, CircuitsError) as e:
        print(f"cannot read the report: {e}", file=sys.stderr)
        return 2
    table = ground_truth_table(report)
    if not table:
        print(f"{path}: no ground-truth claims (run pytest hypotheses/test_ground_truth.py)", file=sys.stderr)
        return 1
    print("\n".join(table))
    wrong = ground_truth_matrix(report)["wrong"]
    print(f"\n(run {report.get('run_id')}; {len(wrong)} wrong verdicts{': ' + '; '.join(wrong) if wrong else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
