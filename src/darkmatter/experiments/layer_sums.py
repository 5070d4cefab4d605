"""The sums behind one layer's baselines of `layer_baselines`, gathered in its single streaming pass.

Per layer: train and test `Moments` of the squared error norm y = ‖x − Sae(x)‖² against each regression
input, and per-token-id sums of y over the vocabulary for the held-out token-identity baseline. Every R², FVU
and L0 of the layer is computed exactly from them; memory is O(d² + vocab), independent of the token count.
"""

from __future__ import annotations

import torch

from darkmatter.errors import DataError
from darkmatter.sae import SAE
from darkmatter.stats import CONSTANT_TARGET_TOL, Moments, RidgeFit, evaluate, fit_ridge

Tensor = torch.Tensor
F64 = torch.float64

REGRESSIONS = ("activations", "l0", "activation_norm", "model_loss")
"""The baselines that are linear regressions with bias on one input (token_identity is not)."""


class LayerSums:
    """One layer's sums: train/test moments per regression and per-token-id sums of y (token baseline)."""

    def __init__(self, layer: int, site: str, sae: SAE, d: int, vocab: int, with_loss: bool) -> None:
        self.layer, self.site, self.sae = layer, site, sae
        self.device = sae.device
        names = [n for n in REGRESSIONS if with_loss or n != "model_loss"]
        self.moments = {
            part: {n: Moments(d if n == "activations" else 1, {"y": 1}) for n in names}
            for part in ("train", "test")
        }
        self.ref: Tensor | None = None  # shift for the per-token sums of y (first chunk's mean)
        zeros = lambda: torch.zeros(vocab, dtype=F64, device=self.device)  # noqa: E731
        self.train_sum, self.test_sum, self.test_sumsq = zeros(), zeros(), zeros()
        self.constant_inputs: list[str] = []  # scalar predictors constant on the train tokens

    def where(self, what: str) -> str:
        return f"layer {self.layer} ({self.site}), {what}"

    @torch.no_grad()
    def update(self, x: Tensor, token: Tensor, loss: Tensor | None, train: Tensor) -> None:
        """x [n, d] float32, token [n] int64, loss [n] or None, train [n] bool (all on CPU)."""
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
            for name, m in self.moments[part].items():
                try:
                    m.update(inputs[name].index_select(0, idx), {"y": y_s})
                except DataError as exc:
                    raise DataError(f"{self.where(name)}: {exc}") from exc
            tok, ys_s = token.index_select(0, idx), ys.index_select(0, idx)
            if part == "train":
                self.train_sum.index_add_(0, tok, ys_s)
            else:
                self.test_sum.index_add_(0, tok, ys_s)
                self.test_sumsq.index_add_(0, tok, ys_s * ys_s)

    def regression_r2(self, name: str) -> float:
        """Fit y ~ [input, 1] on train moments and score it exactly on test moments."""
        train, test = self.moments["train"][name], self.moments["test"][name]
        try:
            if train.n == 0:
                raise DataError("no train tokens")
            fit = self._constant_input_fit(name, train) or fit_ridge(train, "y", bias=True)
            return evaluate(fit, test, "y").r2
        except DataError as exc:
            raise DataError(f"{self.where(f'predictor {name!r} of the squared error norm')}: {exc}") from exc

    def _constant_input_fit(self, name: str, train: Moments) -> RidgeFit | None:
        """A scalar input constant on the train tokens (a TopK SAE's L0) carries no information beyond the
        intercept: the regression's limit is the train mean of y. Return that fit (None otherwise)."""
        if train.d_x != 1:
            return None
        spread = float(train.centred_gram()[0, 0])
        if spread > CONSTANT_TARGET_TOL * float(train.gram()[0, 0]):
            return None
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

    def token_identity_r2(self, train_count: Tensor, test_count: Tensor) -> tuple[float, int]:
        """(Held-out R² of the per-token-id train mean, test tokens whose id never occurs in train).

        Per id: Σ_test (y − m)² = S2 − 2·m·S1 + n·m², with S1, S2 the test sums of y and y² (shifted by
        `ref` against cancellation) and m the id's train mean (the global train mean for unseen ids).
        """
        tr_n, te_n = train_count.to(self.device, F64), test_count.to(self.device, F64)
        n_train, n_test = float(tr_n.sum()), float(te_n.sum())
        if n_train == 0 or n_test < 2:
            raise DataError(
                f"{self.where('token_identity')}: {int(n_train)} train and {int(n_test)} test tokens; "
                "need at least 1 and 2"
            )
        global_mean = self.train_sum.sum() / n_train
        mean = torch.where(tr_n > 0, self.train_sum / tr_n.clamp_min(1), global_mean)
        ss_res = float((self.test_sumsq - 2 * mean * self.test_sum + te_n * mean * mean).sum().clamp_min(0))
        s1, s2 = self.test_sum.sum(), self.test_sumsq.sum()
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
        acts = self.moments["test"]["activations"]
        try:
            var = acts.total_variance_x()
            if not var > 0:
                raise DataError(f"total variance of x over the {acts.n} test tokens is {var}")
            fvu = float(acts.mean_target("y")[0]) * acts.n / var
        except DataError as exc:
            raise DataError(f"{self.where('FVU')}: {exc}") from exc
        return fvu, float(self.moments["test"]["l0"].mean_x()[0])
