"""The joint map J: x̂' = Sae(x) + J(other components' SAE reconstructions), an improved reconstruction.

``earlier_layer_predictors`` fits J (the joint regression predicting SaeError) and
``downstream_ce_with_joint`` splices x̂' into the model. Here: the map itself, its safetensors file and the
replacement it computes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from darkmatter import atomic
from darkmatter.errors import ConfigError, ShapeError, StoreError
from darkmatter.experiments.inputs import sae_recon
from darkmatter.sae.model import SAE

Tensor = torch.Tensor

SELF = "self"
"""Regressor name of the target SAE's own reconstruction Sae(x) (the paper's "residual")."""
JOINT = "joint"
"""Regressor name of all regressors concatenated."""

Block = tuple[str, str, int]
"""(regressor name, site, width) of one column block of the joint map's input."""


@dataclass
class JointMap:
    """x̂' = Sae(x) + [R_1, ..., R_m] @ weights + bias, R_j the SAE reconstructions listed in ``blocks``.

    ``blocks`` are ``(name, site, width)`` in column order; ``name == SELF`` is the target SAE's Sae(x).
    """

    target_site: str
    blocks: list[Block]
    weights: Tensor  # [Σ widths, d] float32
    bias: Tensor  # [d] float32

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors (blocks and target site in the metadata)."""
        from safetensors.torch import save as st_save

        meta = {"target_site": self.target_site, "blocks": json.dumps(self.blocks)}
        tensors = {"weights": self.weights.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        atomic.write_bytes(Path(path), st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> JointMap:
        """Read a map written by ``save`` (StoreError for another safetensors file)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "blocks" not in meta or "target_site" not in meta:
                raise StoreError(f"{path} is not a joint map (no 'blocks'/'target_site' metadata).")
            weights, bias = f.get_tensor("weights"), f.get_tensor("bias")
        blocks = [(str(n), str(s), int(w)) for n, s, w in json.loads(meta["blocks"])]
        return cls(meta["target_site"], blocks, weights, bias)


def check_joint_map(joint_map: JointMap, target_sae: SAE, regressor_saes: Mapping[str, SAE]) -> list[Block]:
    """The map's blocks, checked against the target SAE and the regressor SAEs given (sites, widths)."""
    if joint_map.target_site != target_sae.cfg.hook_site:
        raise ConfigError(
            f"The joint map predicts the error at {joint_map.target_site!r}, but the target SAE reads "
            f"{target_sae.cfg.hook_site!r}."
        )
    total = 0
    for name, site, width in joint_map.blocks:
        sae = target_sae if name == SELF else regressor_saes.get(name)
        if sae is None:
            raise ConfigError(f"The joint map needs regressor SAE {name!r}; given {sorted(regressor_saes)}.")
        if sae.cfg.hook_site != site or sae.cfg.d_in != width:
            raise ShapeError(
                f"Joint-map block {name!r} expects an SAE at {site!r} with d_in={width}; the SAE given reads "
                f"{sae.cfg.hook_site!r} with d_in={sae.cfg.d_in}."
            )
        total += width
    d = target_sae.cfg.d_in
    if tuple(joint_map.weights.shape) != (total, d) or tuple(joint_map.bias.shape) != (d,):
        raise ShapeError(
            f"Joint map weights {list(joint_map.weights.shape)} / bias {list(joint_map.bias.shape)}; "
            f"expected [{total}, {d}] / [{d}] for blocks {joint_map.blocks}."
        )
    return joint_map.blocks


def regressors(
    blocks: list[Block], sae_x: Tensor, acts: Mapping[str, Tensor], regressor_saes: Mapping[str, SAE]
) -> Tensor:
    """The concatenated reconstructions ``[n, Σ widths]`` in block order (``sae_x`` for ``SELF``)."""
    cols = [sae_x if n == SELF else sae_recon(regressor_saes[n], acts[s]) for n, s, _ in blocks]
    return torch.cat(cols, 1)


def joint_replacement(
    x: Tensor,
    regressor_acts: Mapping[str, Tensor],
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
) -> Tensor:
    """x̂' = Sae(x) + J(regressor reconstructions) ``[n, d]`` (float32).

    ``x [n, d]`` are the target site's activations and ``regressor_acts[site] [n, d_site]`` those of each
    regressor site at the same tokens (e.g. captured in the same forward pass).
    """
    blocks = check_joint_map(joint_map, target_sae, regressor_saes)
    sae_x = sae_recon(target_sae, x)
    z = regressors(blocks, sae_x, regressor_acts, regressor_saes)
    return sae_x + torch.addmm(joint_map.bias.to(z), z, joint_map.weights.to(z))
