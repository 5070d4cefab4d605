"""Train a family of TopK / BatchTopK / JumpReLU SAEs on the same batches, streamed from the activation store.

Recipe (Gao et al. 2024 and Bussmann et al. 2024, as used by sparsify and SAELens):
- inputs scaled by a per-site scalar so that E‖s·x‖² = d_in, folded into the weights on save;
- ``b_dec`` initialised at the geometric median of a sample of scaled inputs (Weiszfeld iterations);
- ``W_dec`` rows kept at unit norm, with the gradient component parallel to each row removed;
- ``W_enc`` initialised as ``W_dec``ᵀ; AuxK loss (top ``aux_k`` dead latents reconstruct the residual);
- Adam with linear warm-up and a linear decay to zero over the last ``decay_fraction`` of steps; the
  learning rate scales as ``lr / sqrt(d_sae / 16384)``;
- everything seeded; a checkpoint every ``checkpoint_every`` steps makes a killed run resume to the same
  weights it would have reached without the kill.
Each batch's gradient is summed from a fixed number of row blocks (``darkmatter.sae.data_parallel``), so
under torchrun the ranks, each with its share of the blocks, take the step one process takes.
JumpReLU SAEs replace TopK by learnt thresholds and an L0 penalty (``darkmatter.sae.jumprelu``).
Training reads the train split; every ``eval_every`` steps, at the convergence window's bounds and at the
end, each SAE as exported is measured on fixed test-split tokens (``darkmatter.sae.validation``), whose
``val_fvu`` feeds the convergence criterion (``darkmatter.sae.convergence``): measured and reported, never
acted on (the schedule's decay is defined on the full budget). A *derived input* is a function of a stored
site computed per loaded shard (e.g. another SAE's error), named by its identity so checkpoints never mix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from darkmatter import atomic
from darkmatter.errors import ConfigError, DataError, ShapeError, StoreError
from darkmatter.hashing import stable_hash
from darkmatter.lm.loading import resolve_device
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae import jumprelu
from darkmatter.sae.convergence import window_steps
from darkmatter.sae.data_parallel import exact_update, gathered
from darkmatter.sae.member import Member, geometric_median
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.sae.topk import topk
from darkmatter.sae.train_config import DerivedInput, SAESpec, TrainConfig, TrainingPoint
from darkmatter.sae.validation import ValidationSet
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore

__all__ = ["DerivedInput", "FamilyTrainer", "SAESpec", "TrainConfig", "TrainingPoint"]

Tensor = torch.Tensor
DERIVE_CHUNK = 4096  # rows per call of a derived input's function (bounds its working memory)


class FamilyTrainer:
    """Trains ``specs`` together on batches of the train tokens of ``split``."""

    def __init__(
        self,
        store: ActivationStore,
        specs: list[SAESpec],
        cfg: TrainConfig,
        workdir: str | Path,
        *,
        split: Split,
        derived: Mapping[str, DerivedInput] | None = None,
        log: Callable[[str, int, dict[str, float]], None] | None = None,
        log_every: int = 10,
        ranks: Ranks = SINGLE,
    ) -> None:
        """``log(sae_name, step, statistics)`` is called every ``log_every`` steps, at the last step and
        wherever the validation FVU is measured (``darkmatter.sae.train_logs``). ``ranks``: data-parallel
        under torchrun (``darkmatter.sae.data_parallel``); rank 0 alone writes checkpoints."""
        if not specs:
            raise ConfigError("An SAE family needs at least one SAE spec.")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"SAE names must be unique, got {names}.")
        derived = dict(derived or {})
        for name, d in derived.items():
            if name in store.sites:
                raise ConfigError(f"Derived input {name!r} has the name of a stored site; rename it.")
            if d.source not in store.sites:
                raise StoreError(
                    f"Derived input {name!r} reads {d.source}, which the store lacks (it has {store.sites})."
                )
        for s in specs:
            if s.site not in store.sites and s.site not in derived:
                raise StoreError(
                    f"SAE {s.name!r} reads {s.site}, which the store lacks (it has {store.sites})"
                    + (f" and which is not a derived input ({sorted(derived)})." if derived else ".")
                )
            if s.k > s.d_sae:
                raise ConfigError(f"SAE {s.name!r}: k={s.k} exceeds d_sae={s.d_sae}.")
        self.store, self.specs, self.cfg = store, specs, cfg
        self.log, self.log_every = log, log_every
        self.ranks = ranks
        self.split = split
        self.workdir = Path(workdir)
        self.device = resolve_device(cfg.device or "cpu")
        self.sites = sorted({s.site for s in specs})  # the inputs SAEs read: stored sites or derived names
        self.derived = {n: derived[n] for n in self.sites if n in derived}
        self._load_sites = sorted({self.derived[n].source if n in self.derived else n for n in self.sites})
        self.n_train = self._count_train_tokens()
        if self.n_train < cfg.batch_size:
            raise DataError(
                f"The train split has {self.n_train} tokens, fewer than one batch ({cfg.batch_size}); "
                "harvest more text or lower the batch size."
            )
        self.steps_per_epoch = self.n_train // cfg.batch_size
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))
        self.step = 0
        self.scale: dict[str, float] = {}
        self.members: list[Member] = []
        self.validation: ValidationSet | None = None  # loaded by ``train``

    # -- data -----------------------------------------------------------------------------------------
    def _count_train_tokens(self) -> int:
        skip = int(self.store.identity.get("skip_positions", 0))
        pos = torch.arange(skip, self.store.ctx_len)
        total = 0
        for c in range(self.store.n_contexts):
            total += int(self.split.mask(torch.full_like(pos, c), pos).sum())
        return total

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """Batches of train tokens: shards in a seeded order, rows shuffled within a two-shard buffer."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(self.store.n_shards, generator=gen).tolist()
        spc = self.store.shard_contexts
        buf: dict[str, Tensor] | None = None
        bs = self.cfg.batch_size
        for shard in order:
            start, stop = self.store.shard_range(shard)
            rows = [
                b
                for b in self.store.iter_batches(
                    self._load_sites,
                    contexts=np.arange(start, stop),
                    batch_tokens=spc * 4096,
                    device=self.device,
                )
            ]
            loaded = {s: torch.cat([b.acts[s] for b in rows]) for s in self._load_sites}
            keep = self.split.mask(
                torch.cat([b.context for b in rows]), torch.cat([b.position for b in rows])
            )
            loaded = {s: v[keep] for s, v in loaded.items()}
            parts = {
                s: self._derive(s, loaded[self.derived[s].source]) if s in self.derived else loaded[s]
                for s in self.sites
            }
            buf = parts if buf is None else {s: torch.cat([buf[s], parts[s]]) for s in self.sites}
            perm = torch.randperm(len(buf[self.sites[0]]), generator=gen).to(self.device)
            buf = {s: v[perm] for s, v in buf.items()}
            n_full = len(perm) // bs
            for i in range(n_full):
                yield {s: v[i * bs : (i + 1) * bs] for s, v in buf.items()}
            buf = {s: v[n_full * bs :] for s, v in buf.items()}

    @torch.no_grad()
    def _derive(self, name: str, x: Tensor) -> Tensor:
        """Derived input ``name`` of source rows ``x [n, d]``, computed ``DERIVE_CHUNK`` rows at a time."""
        fn = self.derived[name].fn
        out = []
        for i in range(0, max(len(x), 1), DERIVE_CHUNK):
            chunk = x[i : i + DERIVE_CHUNK].float()
            y = fn(chunk)
            if y.ndim != 2 or y.shape[0] != chunk.shape[0]:
                raise ShapeError(
                    f"Derived input {name!r} must map [n, d] rows to [n, d'] rows, but it mapped "
                    f"{tuple(chunk.shape)} to {tuple(y.shape)}."
                )
            y = y.to(self.device, torch.float32)
            if not bool(torch.isfinite(y).all()):
                raise DataError(f"Derived input {name!r} has NaN or infinite values; check its source.")
            out.append(y)
        return torch.cat(out)

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """The whole run's batch sequence (deterministic); resuming skips what was already consumed."""
        epoch = 0
        produced = 0
        while True:
            for batch in self._epoch_batches(epoch):
                if produced >= self.total_steps:
                    return
                produced += 1
                yield batch
            epoch += 1

    # -- initialisation -------------------------------------------------------------------------------
    def _init(self) -> None:
        first = next(iter(self._epoch_batches(0)))
        for site in self.sites:
            x = first[site].double()
            ms = float((x * x).sum(1).mean())
            if not math.isfinite(ms) or ms <= 0:
                raise DataError(f"Activations at {site} are zero or not finite; cannot train an SAE on them.")
            self.scale[site] = math.sqrt(x.shape[1] / ms)
        medians = {s: geometric_median(first[s].double() * self.scale[s]).float() for s in self.sites}
        for i, spec in enumerate(self.specs):
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + i)
            d = first[spec.site].shape[1]
            W_dec = torch.randn(spec.d_sae, d, generator=gen)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            tensors = {
                "W_enc": W_dec.t().contiguous(),
                "b_enc": torch.zeros(spec.d_sae),
                "W_dec": W_dec,
                "b_dec": medians[spec.site].clone(),
            }
            if spec.kind == "jumprelu":
                x = first[spec.site].float() * self.scale[spec.site] - tensors["b_dec"]
                pre = x @ tensors["W_enc"]
                tensors["log_threshold"] = jumprelu.initial_log_threshold(pre, spec.k, jumprelu.bandwidth(d))
            ps = {k: torch.nn.Parameter(v.to(self.device)) for k, v in tensors.items()}
            lr = self.cfg.lr / math.sqrt(spec.d_sae / 16384)
            opt = torch.optim.Adam(list(ps.values()), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
            self.members.append(
                Member(
                    spec,
                    ps["W_enc"],
                    ps["b_enc"],
                    ps["W_dec"],
                    ps["b_dec"],
                    opt,
                    lr,
                    torch.zeros(spec.d_sae, dtype=torch.long, device=self.device),
                    torch.zeros((), device=self.device),
                    log_threshold=ps.get("log_threshold"),
                    sparsity_coef=jumprelu.INITIAL_COEF,
                )
            )

    # -- one step -------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warm = max(1, int(self.cfg.warmup_fraction * self.total_steps))
        decay_start = int((1 - self.cfg.decay_fraction) * self.total_steps)
        f = min(1.0, (step + 1) / warm)
        if step >= decay_start and self.cfg.decay_fraction > 0:
            f *= max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_start))
        return f

    def encode(self, m: Member, x: Tensor, batch_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """(indices [n, m], values [n, m], pre-activations [n, d_sae]) for scaled inputs x (this rank's rows
        of a batch of ``batch_rows``)."""
        return self.encode_blocks(m, [x], batch_rows)[0]

    def encode_blocks(
        self, m: Member, xs: Sequence[Tensor], batch_rows: int, bias: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``encode`` of each block of scaled inputs in ``xs`` (this rank's blocks of a batch of
        ``batch_rows``): BatchTopK's threshold is the batch's, from every block of every rank. ``bias``:
        the member's ``encoder_bias`` where already formed."""
        bias = m.encoder_bias() if bias is None else bias
        pres = [torch.addmm(bias, x, m.W_enc) for x in xs]
        k = m.spec.k
        if m.spec.kind == "topk":
            chosen_k = [topk(pre, k) for pre in pres]
            return [(idx, vals.relu(), pre) for (vals, idx), pre in zip(chosen_k, pres, strict=True)]
        # BatchTopK: the n*k largest pre-activations of the batch; candidates are each row's top 4k.
        cands = [topk(pre, min(m.spec.d_sae, 4 * k)) for pre in pres]
        mine = [v.detach().flatten() for v, _ in cands]
        flat = gathered(self.ranks, torch.cat(mine) if mine else torch.zeros(0, device=self.device))
        kth = flat.kthvalue(max(1, flat.numel() - batch_rows * k + 1)).values
        with torch.no_grad():
            chosen = flat[(flat >= kth) & (flat > 0)]
            if chosen.numel():
                m.threshold.mul_(0.99).add_(0.01 * chosen.min())
        return [(i, v.relu() * ((v >= kth) & (v > 0)), pre) for (v, i), pre in zip(cands, pres, strict=True)]

    def decode(self, m: Member, idx: Tensor, vals: Tensor) -> Tensor:
        return F.embedding_bag(idx, m.W_dec, per_sample_weights=vals, mode="sum") + m.b_dec

    def _train_step(self, batch: dict[str, Tensor]) -> None:
        factor = self._lr_factor(self.step)
        last = self.step == self.total_steps - 1
        val = self.validation if self._validation_due(self.step) else None
        for m in self.members:
            x = batch[m.spec.site].to(self.device, torch.float32) * self.scale[m.spec.site]
            point = exact_update(self, m, x, factor)
            if self.step % 10 == 0 or last or val is not None:
                fvu = None if val is None else val.fvu(self.export(m).to(self.device), m.spec.site)
                if fvu is not None:
                    point["val_fvu"] = fvu
                m.history.append({"step": float(self.step), **point})
            if self.log is not None and (self.step % self.log_every == 0 or last or "val_fvu" in point):
                self.log(m.spec.name, self.step, point)
        self.step += 1

    def step_from_grads(
        self, m: Member, factor: float, loss: Tensor, aux: Tensor, total: Tensor, l0: float, n_dead: int
    ) -> dict[str, float]:
        """Project W_dec's gradient, take the Adam step, renormalise; the step's statistics."""
        with torch.no_grad():
            g, w = m.W_dec.grad, m.W_dec
            if g is not None:
                g -= (g * w).sum(1, keepdim=True) * w
        for group in m.opt.param_groups:
            group["lr"] = m.lr * factor
        m.opt.step()
        with torch.no_grad():
            m.W_dec /= m.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        point = {
            "fvu": float(loss.detach()),
            "l0": l0,
            "aux": float(aux.detach()),
            "dead_fraction": n_dead / m.spec.d_sae,
            "loss": float(total.detach()),
        }
        if m.log_threshold is not None:
            point["sparsity_coef"] = m.sparsity_coef
            m.sparsity_coef = jumprelu.adapt_coef(m.sparsity_coef, l0, m.spec.k)
        return point

    # -- validation -----------------------------------------------------------------------------------
    def _validation_due(self, step: int) -> bool:
        """Validate after every ``eval_every`` steps, at the convergence window's bounds and at the end."""
        marks = window_steps(self.total_steps, self.cfg.decay_fraction)
        return (step + 1) % self.cfg.eval_every == 0 or step == self.total_steps - 1 or step in marks

    def _load_validation(self) -> ValidationSet | None:
        if self.cfg.validation_tokens == 0:
            return None
        val = ValidationSet.build(
            self.store,
            self.split,
            self.sites,
            self.cfg.validation_tokens,
            source=lambda n: self.derived[n].source if n in self.derived else n,
            derive=self._derive,
            device=self.device,
        )
        return val if val.n_tokens >= 2 else None

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def signature(self) -> str:
        """Identifies what a checkpoint was trained on and how; only a matching checkpoint is resumed."""
        fields: dict[str, Any] = {
            "specs": [sp.model_dump() for sp in self.specs],
            "train": self.cfg.model_dump(),
            "store": self.store.manifest["identity_hash"],
            "split": [self.split.seed, self.split.fraction],
        }
        if self.derived:
            fields["derived"] = {n: [d.source, d.identity] for n, d in self.derived.items()}
        return stable_hash(fields, length=64)

    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    def _save_checkpoint(self) -> None:
        if not self.ranks.leader:
            return
        state: dict[str, Any] = {
            "signature": self.signature,
            "step": self.step,
            "scale": dict(self.scale),
            "members": [],
        }
        for m in self.members:
            state["members"].append(
                {
                    "W_enc": m.W_enc.detach().cpu(),
                    "b_enc": m.b_enc.detach().cpu(),
                    "W_dec": m.W_dec.detach().cpu(),
                    "b_dec": m.b_dec.detach().cpu(),
                    "opt": m.opt.state_dict(),
                    "since_fired": m.since_fired.cpu(),
                    "threshold": m.threshold.cpu(),
                    "history": m.history,
                    "log_threshold": None if m.log_threshold is None else m.log_threshold.detach().cpu(),
                    "sparsity_coef": m.sparsity_coef,
                }
            )
        with atomic.target(self.checkpoint_path) as tmp, tmp.open("wb") as f:
            torch.save(state, f)  # through a Python file, a full disk is an OSError and not a RuntimeError

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file: start over rather than fail
            raise StoreError(
                f"Checkpoint {self.checkpoint_path} cannot be read ({exc}); delete it to restart training."
            ) from exc
        if state.get("signature") != self.signature:
            return False  # another family, config or store: train from scratch (the file is overwritten)
        self.step = int(state["step"])
        self.scale = {k: float(v) for k, v in state["scale"].items()}
        with torch.no_grad():
            for m, s in zip(self.members, state["members"], strict=True):
                for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(m, name).copy_(s[name].to(self.device))
                m.opt.load_state_dict(s["opt"])
                m.since_fired.copy_(s["since_fired"].to(self.device))
                m.threshold.copy_(s["threshold"].to(self.device))
                m.history = list(s["history"])
                if m.log_threshold is not None:
                    m.log_threshold.copy_(s["log_threshold"].to(self.device))
                    m.sparsity_coef = float(s["sparsity_coef"])
        return True

    # -- the run --------------------------------------------------------------------------------------
    def train(self, progress: Progress | None = None) -> list[SAE]:
        """Train (resuming from a checkpoint if present) and return the SAEs with scaling folded in."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._init()
        self._load_checkpoint()
        self.validation = self._load_validation()
        resumed_at = self.step
        t0 = time.perf_counter()
        for i, batch in enumerate(self.batches()):
            if i < resumed_at:
                continue
            self._train_step(batch)
            if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self._save_checkpoint()
            if progress is not None:
                done = (self.step - resumed_at) * self.cfg.batch_size
                progress(
                    self.step * self.cfg.batch_size,
                    self.total_steps * self.cfg.batch_size,
                    done / max(time.perf_counter() - t0, 1e-9),
                )
        self._save_checkpoint()
        return [self.export(m) for m in self.members]

    def export(self, m: Member) -> SAE:
        """The trained SAE in canonical form with the input scale folded into the weights."""
        spec = m.spec
        derived = self.derived.get(spec.site)
        extra = {"derived_input": spec.site, "derived_identity": derived.identity} if derived else {}
        cfg = SAEConfig(
            d_in=m.W_enc.shape[0],
            d_sae=spec.d_sae,
            activation=spec.kind,
            k=None if spec.kind == "jumprelu" else spec.k,
            apply_b_dec_to_input=True,
            input_scale=self.scale[spec.site],
            hook_site=derived.source if derived else spec.site,
            model_name=self.store.identity["model"]["name"],
            source_format="darkmatter",
            metadata={
                "trained_by": "darkmatter",
                "train_steps": self.step,
                "train_tokens": self.step * self.cfg.batch_size,
                "batchtopk_threshold_scaled": float(m.threshold),
                **(
                    {"target_l0": spec.k, "sparsity_coef": m.sparsity_coef}
                    if m.log_threshold is not None
                    else {}
                ),
                **extra,
            },
        )
        tensors = {
            "W_enc": m.W_enc.detach().cpu(),
            "b_enc": m.b_enc.detach().cpu(),
            "W_dec": m.W_dec.detach().cpu(),
            "b_dec": m.b_dec.detach().cpu(),
        }
        if spec.kind == "batchtopk":
            tensors["threshold"] = torch.full((spec.d_sae,), float(m.threshold))
        if m.log_threshold is not None:
            tensors["threshold"] = m.log_threshold.detach().exp().cpu()
        return SAE.from_tensors(cfg, tensors).fold_input_scale()
