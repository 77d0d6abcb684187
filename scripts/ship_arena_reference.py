"""Convert the published ARENA bracket checkpoint and its 100k strings into the files the package ships.

Run by hand, once, from the repository root (it is the only code that reads ../shared):

    python scripts/ship_arena_reference.py [SOURCE_DIR]

SOURCE_DIR defaults to ../shared/reference/arena-brackets. It writes fixtures/reference/arena-brackets/:
the state dict as safetensors (loaded with torch.load(weights_only=True): nothing is unpickled), the
data as gzip'd compact JSON (350 KB against 367 KB for bit-packed npz and 2.8 MB raw; gzip with
mtime 0 so the bytes are reproducible), and checksums.json with the sha256 of every shipped file and
of the originals. circuits.tasks.brackets.reference checks the shipped sha256 on every load.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "fixtures" / "reference" / "arena-brackets"
WEIGHTS, DATA = "brackets_model.safetensors", "brackets_data.json.gz"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(source: Path) -> None:
    src_weights, src_data = source / "brackets_model_state_dict.pt", source / "brackets_data.json"
    sd = torch.load(src_weights, map_location="cpu", weights_only=True)
    # every tensor kept as published (the TL-only mask/IGNORE buffers too): the file is the checkpoint
    save_file({k: v.contiguous() for k, v in sd.items()}, str(OUT / WEIGHTS), metadata={"format": "pt"})
    rows = json.loads(src_data.read_text())
    if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], bool) for r in rows):
        sys.exit(f"{src_data}: not a list of [string, bool] pairs")
    payload = json.dumps(rows, separators=(",", ":")).encode()
    (OUT / DATA).write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    sums = {
        "shipped": {WEIGHTS: sha256(OUT / WEIGHTS), DATA: sha256(OUT / DATA)},
        "original": {src_weights.name: sha256(src_weights), src_data.name: sha256(src_data)},
    }
    (OUT / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")
    print(json.dumps(sums, indent=2))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "reference" / "arena-brackets")
