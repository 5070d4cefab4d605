"""Run by the side environment's interpreter (the one with sae-lens): load SAE folders with SAELens.

Usage: ``python saelens_side.py IN.json OUT.json``. IN holds ``{"cases": [{"name", "folder", "x"}]}`` with
``x [n, d_in]`` as nested lists; OUT gets, per case, the names and architecture SAELens read and its
``encode(x)`` and ``decode(encode(x))``. Uses only sae-lens and torch, never darkmatter.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE


def probe(folder: str, x: list[list[float]]) -> dict[str, Any]:
    """What SAELens makes of one folder."""
    sae = SAE.load_from_disk(folder, device="cpu")
    inputs = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        codes = sae.encode(inputs)
        recon = sae.decode(codes)
    return {
        "hook_name": sae.cfg.metadata.hook_name,
        "model_name": sae.cfg.metadata.model_name,
        "architecture": sae.cfg.architecture(),
        "class": type(sae).__name__,
        "k": getattr(sae.cfg, "k", None),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": sae.cfg.normalize_activations,
        "codes": codes.double().tolist(),
        "recon": recon.double().tolist(),
    }


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    out = {
        "sae_lens_version": version("sae-lens"),
        "cases": {case["name"]: probe(case["folder"], case["x"]) for case in request["cases"]},
    }
    Path(argv[2]).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
