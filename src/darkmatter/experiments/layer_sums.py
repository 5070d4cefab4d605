"""The sums behind one layer's baselines of `layer_baselines`, gathered in one streaming pass.

Per layer: train and test `Moments` of the squared error norm y = ‖x − Sae(x)‖² against each regression
input, and per-token-id sums of y (over the token ids the store holds) for the held-out token-identity
baseline. Every R², FVU and L0 of the layer is computed exactly from them; memory is O(d² + ids), independent
of the token count.

For the jackknife intervals every sum is kept per block of whole shards (``blocks``): the totals are the
blocks merged (with one block, that block itself), and a replicate leaves one block out of both the fit's
train sums and the scored test sums, so every fit is refitted without it. Memory is ``blocks`` times larger.

Under ``torchrun`` each rank fills the sums from its share of the shards and `reduce_layer_sums` adds them
up: the per-id sums are first moved to one shift (rank 0's, so its own sums are untouched) and the moments
to a common reference, then everything is summed in float64; the totals equal one process's up to the order
of the additions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.accumulators import merged
from darkmatter.ranks import Ranks
from darkmatter.sae import SAE
from darkmatter.stats import CONSTANT_TARGET_TOL, Moments, RidgeFit, evaluate, fit_ridge

Tensor = torch.Tensor
F64 = torch.float64

REGRESSIONS = ("activations", "l0", "activation_norm", "model_loss")
"""The baselines that are linear regressions with bias on one input (token_identity is not)."""


def sum_blocks(t: Tensor, without: int | None = None) -> Tensor:
    """``t [blocks, ...]`` summed over its blocks (or every block but ``without``): exact, no subtraction."""
    if without is None:
        return t.sum(0)
    keep = [k for k in range(t.shape[0]) if k != without]
    return t[keep].sum(0)


def layer_bytes(d: int, n_ids: int, blocks: int, with_loss: bool) -> int:
    """Bytes a `LayerSums` holds: float64 train and test moments (the d x (d+1) Gram of the activations
    regression dominates) and three per-id sums, each per block."""
    scalars = 3 if with_loss else 2
    moments = 2 * ((d + 1) * (d + 3) + scalars * 8)
    return 8 * blocks * (moments + 3 * n_ids)


class LayerSums:
    """One layer's sums: train/test moments per regression and per-token-id sums of y (token baseline),
    each per block of whole shards (``blocks``: one for no intervals)."""

    def __init__(
        self, layer: int, site: str, sae: SAE, d: int, n_ids: int, with_loss: bool, blocks: int = 1
    ) -> None:
        self.layer, self.site, self.sae = layer, site, sae
        self.device = sae.device
        self.blocks = blocks
        names = [n for n in REGRESSIONS if with_loss or n != "model_loss"]
        width = {n: d if n == "activations" else 1 for n in names}
        self.moments = {
            part: {n: [Moments(width[n], {"y": 1}, device=self.device) for _ in range(blocks)] for n in names}
            for part in ("train", "test")
        }
        self.ref: Tensor | None = None  # shift for the per-token sums of y (first chunk's mean)
        zeros = lambda: torch.zeros(blocks, n_ids, dtype=F64, device=self.device)  # noqa: E731
        # [blocks, ids]: per block, Σ(y − ref) over the id's train tokens, and Σ(y − ref), Σ(y − ref)² over
        # its test tokens
        self.train_sum, self.test_sum, self.test_sumsq = zeros(), zeros(), zeros()
        self.constant_inputs: list[str] = []  # scalar predictors constant on the train tokens

    def where(self, what: str) -> str:
        return f"layer {self.layer} ({self.site}), {what}"

    @torch.no_grad()
    def update(self, x: Tensor, token: Tensor, loss: Tensor | None, train: Tensor, block: int = 0) -> None:
        """x [n, d] float32, token [n] int64 (the id's index in the per-id sums), loss [n] or None,
        train [n] bool, all from ``block`` and on the SAE's device (the sums live there too)."""
        x = x.to(self.device)
        x_hat, codes = self.sae.reconstruct(x.to(self.sae.dtype))
        y = (x - x_hat.to(x.dtype)).double().pow(2).sum(1)  # [n] squared error norm
        inputs = {
            "activations": x,
            "l0": codes.l0().to(F64),
            "activation_norm": x.double().norm(dim=1),
        }
        if loss is not None:
            inputs["model_loss"] = loss.to(self.device)
        if not bool(torch.isfinite(y).all()):
            raise DataError(
                f"{self.where('squared error norm')}: NaN or inf values; check the SAE weights and the store."
            )
        if self.ref is None:
            self.ref = y.mean()
        ys = y - self.ref
        token = token.to(self.device)
        for part, mask in (("train", train), ("test", ~train)):
            idx = mask.to(self.device).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            y_s = y.index_select(0, idx)
            for name, per_block in self.moments[part].items():
                try:
                    per_block[block].update(inputs[name].index_select(0, idx), {"y": y_s})
                except DataError as exc:
                    raise DataError(f"{self.where(name)}: {exc}") from exc
            tok, ys_s = token.index_select(0, idx), ys.index_select(0, idx)
            if part == "train":
                self.train_sum[block].index_add_(0, tok, ys_s)
            else:
                self.test_sum[block].index_add_(0, tok, ys_s)
                self.test_sumsq[block].index_add_(0, tok, ys_s * ys_s)

    def total(self, part: str, name: str, without: int | None = None) -> Moments:
        """The ``part`` moments of regression ``name`` over every block (or every block but ``without``)."""
        return merged(self.moments[part][name], without)

    def regression_r2(self, name: str, without: int | None = None) -> float:
        """Fit y ~ [input, 1] on train moments and score it exactly on test moments; ``without``: leave
        that block out of both (a jackknife replicate)."""
        train, test = self.total("train", name, without), self.total("test", name, without)
        try:
            if train.n == 0:
                raise DataError("no train tokens")
            fit = self._constant_input_fit(name, train, record=without is None)
            fit = fit or fit_ridge(train, "y", bias=True)
            return evaluate(fit, test, "y").r2
        except DataError as exc:
            raise DataError(f"{self.where(f'predictor {name!r} of the squared error norm')}: {exc}") from exc

    def _constant_input_fit(self, name: str, train: Moments, *, record: bool = True) -> RidgeFit | None:
        """A scalar input constant on the train tokens (a TopK SAE's L0) carries no information beyond the
        intercept: the regression's limit is the train mean of y. Return that fit (None otherwise)."""
        if train.d_x != 1:
            return None
        spread = float(train.centred_gram()[0, 0])
        if spread > CONSTANT_TARGET_TOL * float(train.gram()[0, 0]):
            return None
        if record:
            self.constant_inputs.append(name)
        zero = torch.zeros(1, 1, dtype=F64, device=train.mean_x().device)
        return RidgeFit(
            weights=zero,
            bias=train.mean_target("y"),
            ridge=0.0,
            ridge_scale=1.0,
            escalations=0,
            n_train=train.n,
        )

    def token_identity_r2(
        self, train_count: Tensor, test_count: Tensor, without: int | None = None
    ) -> tuple[float, int]:
        """(Held-out R² of the per-token-id train mean, test tokens whose id never occurs in train).

        Per id: Σ_test (y − m)² = S2 − 2·m·S1 + n·m², with S1, S2 the test sums of y and y² (shifted by
        `ref` against cancellation) and m the id's train mean (the global train mean for unseen ids).
        ``train_count``, ``test_count`` [blocks, ids]: tokens per block and id. ``without``: leave that
        block out of the means and of the scored tokens (a jackknife replicate; its ids may become unseen).
        """
        tr_n = sum_blocks(train_count, without).to(self.device, F64)
        te_n = sum_blocks(test_count, without).to(self.device, F64)
        train_sum = sum_blocks(self.train_sum, without)
        test_sum, test_sumsq = sum_blocks(self.test_sum, without), sum_blocks(self.test_sumsq, without)
        n_train, n_test = float(tr_n.sum()), float(te_n.sum())
        if n_train == 0 or n_test < 2:
            raise DataError(
                f"{self.where('token_identity')}: {int(n_train)} train and {int(n_test)} test tokens; "
                "need at least 1 and 2"
            )
        global_mean = train_sum.sum() / n_train
        mean = torch.where(tr_n > 0, train_sum / tr_n.clamp_min(1), global_mean)
        ss_res = float((test_sumsq - 2 * mean * test_sum + te_n * mean * mean).sum().clamp_min(0))
        s1, s2 = test_sum.sum(), test_sumsq.sum()
        ss_tot = float((s2 - s1 * s1 / n_test).clamp_min(0))
        assert self.ref is not None
        raw_sq = float(s2 + 2 * self.ref * s1 + n_test * self.ref * self.ref)
        if ss_tot <= CONSTANT_TARGET_TOL * raw_sq:
            raise DataError(
                f"{self.where('token_identity')}: the squared error norm is constant on the {int(n_test)} "
                "test tokens; R² is undefined"
            )
        unseen = int(te_n[tr_n == 0].sum())
        return 1.0 - ss_res / ss_tot, unseen

    def quality(self) -> tuple[float, float]:
        """(FVU, mean L0) of the SAE on the test tokens, from the test moments."""
        acts = self.total("test", "activations")
        try:
            var = acts.total_variance_x()
            if not var > 0:
                raise DataError(f"total variance of x over the {acts.n} test tokens is {var}")
            fvu = float(acts.mean_target("y")[0]) * acts.n / var
        except DataError as exc:
            raise DataError(f"{self.where('FVU')}: {exc}") from exc
        return fvu, float(self.total("test", "l0").mean_x()[0])


def reduce_layer_sums(
    layers: Sequence[LayerSums], train_count: Tensor, test_count: Tensor, ranks: Ranks
) -> None:
    """Add up every rank's partial sums of ``layers`` and the token counts per block and id (``train_count``,
    ``test_count`` [blocks, ids], this rank's, summed in place); every rank ends with the totals. Each rank
    must call this with the same layers in the same order."""
    refs = ranks.gather([None if acc.ref is None else float(acc.ref) for acc in layers])
    for i, acc in enumerate(layers):
        common = next((r[i] for r in refs if r[i] is not None), None)
        if common is None:
            continue  # no rank saw a token of this layer
        if acc.ref is not None and float(acc.ref) != common:
            # Σ(y − R) = Σ(y − r) + n·(r − R) and Σ(y − R)² = Σ(y − r)² + 2·(r − R)·Σ(y − r) + n·(r − R)²
            delta = float(acc.ref) - common
            tr_n, te_n = train_count.to(acc.device, F64), test_count.to(acc.device, F64)
            acc.test_sumsq += 2 * delta * acc.test_sum + te_n * (delta * delta)
            acc.test_sum += te_n * delta
            acc.train_sum += tr_n * delta
        acc.ref = torch.tensor(common, dtype=F64, device=acc.device)
        ranks.sum_([acc.train_sum, acc.test_sum, acc.test_sumsq])
        for per_part in acc.moments.values():
            for per_block in per_part.values():
                for moments in per_block:
                    moments.all_reduce_()
    ranks.sum_([train_count, test_count])
