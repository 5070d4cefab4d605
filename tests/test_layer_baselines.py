"""Error-norm baselines across layers (Fig 13 / Fig 3): known answers on planted data, exactness against
direct float64 least squares, a held-out token baseline, one streaming pass, bad input, and `run` end to end.

The planted SAE reconstructs coordinates 1-2 of x exactly (latents ±x1, ±x2, TopK k=2) and drops 3-4, so
its squared error norm is x3² + x4² and its L0 counts the non-zero coordinates among x1, x2. Each layer
plants one answer in x3, x4: a function of the token id, of ‖x‖, of L0, of the next-token loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from darkmatter.errors import ConfigError, DataError, ShapeError, StoreError
from darkmatter.experiments import layer_baselines as lb
from darkmatter.experiments.layer_baselines import LayerBaselinesResult, layer_baselines
from darkmatter.experiments.layer_intervals import layer_groups, layer_shard_contexts
from darkmatter.experiments.layer_sums import layer_bytes
from darkmatter.harvest import HarvestConfig
from darkmatter.lm.loading import LoadedLM
from darkmatter.report.sections import layer_section
from darkmatter.results import read_result, write_result
from darkmatter.sae import SAE, SAEConfig
from darkmatter.sae.train import FamilyTrainer, TrainConfig
from darkmatter.stats import Split
from darkmatter.store import ActivationStore
from darkmatter.text import TextConfig
from synthetic import sparse_features, synthetic_store

from conftest import tiny_model, tiny_tokenizer

N_CTX, CTX_LEN, SKIP, VOCAB = 40, 24, 1, 12
UNSEEN = VOCAB  # an id placed only on test tokens
TOKEN, NORM, L0_LAYER, LOSS, MIXED, CONSTANT = range(6)
SPLIT = Split(seed=0, fraction=0.8)


def site(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def planted_sae(layer: int, d: int = 4) -> SAE:
    """TopK (k=2) SAE with latents x1, -x1, x2, -x2 and decoder rows e1, -e1, e2, -e2."""
    w_enc = torch.zeros(d, 4)
    w_enc[0, 0], w_enc[0, 1], w_enc[1, 2], w_enc[1, 3] = 1.0, -1.0, 1.0, -1.0
    tensors = {
        "W_enc": w_enc,
        "b_enc": torch.zeros(4),
        "W_dec": w_enc.T.contiguous(),
        "b_dec": torch.zeros(d),
    }
    return SAE.from_tensors(
        SAEConfig(d_in=d, d_sae=4, activation="topk", k=2, hook_site=site(layer)), tensors
    )


def write_store(path: Path, tokens: np.ndarray, acts: dict[str, torch.Tensor], loss: torch.Tensor | None):
    """A complete store with the given tokens [ctx, pos], site tensors [ctx, pos, d] and loss [ctx, pos]."""
    n_ctx, ctx_len = tokens.shape
    identity = {
        "model": {"name": "planted", "model_type": "none", "n_layers": 0, "d_model": 0},
        "sites": sorted(acts),
        "d": {s: int(v.shape[-1]) for s, v in acts.items()},
        "dtype": "fp32",
        "ctx_len": ctx_len,
        "n_contexts": n_ctx,
        "tokens_fingerprint": "planted",
        "has_bos": False,
        "skip_positions": SKIP,
        "text_source": "planted",
        "with_loss": loss is not None,
        "shard_contexts": 8,
        "batch_size": 1,
    }
    store = ActivationStore.create_or_resume(path, identity, tokens)
    for index in range(store.n_shards):
        a, b = store.shard_range(index)
        shard = {s: v[a:b].contiguous() for s, v in acts.items()}
        if loss is not None:
            shard["loss"] = loss[a:b].contiguous()
        store.write_shard(index, shard)
    return store


def analysed(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, position) of the analysed tokens: skip the first SKIP positions and the last one."""
    ctx, pos = torch.meshgrid(torch.arange(shape[0]), torch.arange(SKIP, shape[1] - 1), indexing="ij")
    return ctx.reshape(-1), pos.reshape(-1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (N_CTX, CTX_LEN)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=shape).astype(np.int32)
    ctx, pos = analysed(shape)
    test_tokens = ~SPLIT.mask(ctx, pos)
    chosen = test_tokens.nonzero().squeeze(1)[:6]
    tokens[ctx[chosen].numpy(), pos[chosen].numpy()] = UNSEEN
    tok = torch.as_tensor(tokens, dtype=torch.float32)

    def randn() -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def stack(*cols: torch.Tensor) -> torch.Tensor:
        return torch.stack(cols, dim=-1).float()

    zero = torch.zeros(shape)
    acts = {site(TOKEN): stack(randn(), randn(), 1 + 0.25 * tok, zero)}
    r = 2 + 3 * torch.rand(*shape, generator=g)  # ‖x‖ = r, error norm² = r / 2
    theta, phi = 6.3 * torch.rand(*shape, generator=g), 6.3 * torch.rand(*shape, generator=g)
    kept, dropped = (r * r - r / 2).sqrt(), (r / 2).sqrt()
    acts[site(NORM)] = stack(kept * phi.cos(), kept * phi.sin(), dropped * theta.cos(), dropped * theta.sin())
    l0 = torch.randint(0, 3, shape, generator=g)  # error norm² = 1 + L0
    mag = lambda: (0.5 + 1.5 * torch.rand(*shape, generator=g)) * torch.sign(randn())  # noqa: E731
    acts[site(L0_LAYER)] = stack(mag() * (l0 >= 1), mag() * (l0 >= 2), (1.0 + l0).sqrt(), zero)
    loss = 3 * torch.rand(*shape, generator=g)
    loss[:, -1] = float("nan")  # as harvested: no next token after the last position
    acts[site(LOSS)] = stack(
        randn(), randn(), (1 + 2 * loss.nan_to_num(0.0)).sqrt(), zero
    )  # norm² = 1 + 2·loss
    acts[site(MIXED)] = stack(*(randn() + 0.7 * i for i in range(4)))
    acts[site(CONSTANT)] = stack(randn(), randn(), zero, zero)  # perfectly reconstructed: norm² ≡ 0
    store = write_store(tmp_path_factory.mktemp("planted") / "store", tokens, acts, loss)
    saes = {layer: planted_sae(layer) for layer in (TOKEN, NORM, L0_LAYER, LOSS, MIXED)}
    return {"store": store, "saes": saes, "acts": acts, "tokens": tokens, "loss": loss, "unseen": len(chosen)}


@pytest.fixture(scope="module")
def result(planted: dict) -> LayerBaselinesResult:
    return layer_baselines(planted["store"], planted["saes"], split=SPLIT, batch_tokens=97)


def reference(planted: dict, layer: int) -> dict[str, np.ndarray]:
    """Per-token arrays of the analysed tokens, computed directly (no streaming)."""
    ctx, pos = analysed((N_CTX, CTX_LEN))
    x = planted["acts"][site(layer)][ctx, pos]
    with torch.no_grad():
        x_hat, codes = planted["saes"][layer].reconstruct(x)
    return {
        "x": x.double().numpy(),
        "y": (x - x_hat).double().pow(2).sum(1).numpy(),
        "l0": codes.l0().double().numpy(),
        "token": planted["tokens"][ctx.numpy(), pos.numpy()],
        "loss": planted["loss"][ctx, pos].double().numpy(),
        "train": SPLIT.mask(ctx, pos).numpy(),
    }


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def lstsq_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    """Held-out R² of a float64 least-squares fit of y on [x, 1]."""
    xt = np.column_stack([x.reshape(len(y), -1), np.ones(len(y))])
    w = np.linalg.lstsq(xt[train], y[train], rcond=None)[0]
    return r2(y[~train], xt[~train] @ w)


def at(result: LayerBaselinesResult, name: str, layer: int) -> float:
    return result.r2[name][result.layers.index(layer)]


def test_planted_answers(result: LayerBaselinesResult) -> None:
    assert result.layers == [TOKEN, NORM, L0_LAYER, LOSS, MIXED]
    assert result.sites == [site(layer) for layer in result.layers]
    assert set(result.r2) == {"activations", "token_identity", "l0", "activation_norm", "model_loss"}
    assert at(result, "activation_norm", NORM) > 1 - 1e-9
    assert at(result, "l0", L0_LAYER) > 1 - 1e-9
    assert at(result, "model_loss", LOSS) > 1 - 1e-9
    # planted answers are specific: the other predictors do not find them
    assert abs(at(result, "activations", NORM)) < 0.05  # r/2 is not linear in x
    for layer in (NORM, L0_LAYER, LOSS, MIXED):
        assert at(result, "token_identity", layer) < 0.05
    for layer in (TOKEN, NORM, L0_LAYER, MIXED):
        assert at(result, "model_loss", layer) < 0.05
    for layer in (TOKEN, NORM, LOSS, MIXED):
        assert at(result, "l0", layer) <= 0
    assert result.n_train_tokens + result.n_test_tokens == N_CTX * (CTX_LEN - SKIP - 1)


def test_activations_r2_equals_direct_lstsq(planted: dict, result: LayerBaselinesResult) -> None:
    for layer in result.layers:
        ref = reference(planted, layer)
        expected = lstsq_r2(ref["x"], ref["y"], ref["train"])
        assert at(result, "activations", layer) == pytest.approx(expected, abs=1e-8), layer
    for name, key in (("activation_norm", "x"), ("model_loss", "loss")):
        ref = reference(planted, MIXED)
        inp = np.linalg.norm(ref["x"], axis=1) if key == "x" else ref[key]
        assert at(result, name, MIXED) == pytest.approx(lstsq_r2(inp, ref["y"], ref["train"]), abs=1e-8)


def test_token_identity_is_held_out(planted: dict, result: LayerBaselinesResult) -> None:
    ref = reference(planted, TOKEN)
    y, tok, train = ref["y"], ref["token"], ref["train"]
    assert (tok[train] != UNSEEN).all() and (tok[~train] == UNSEEN).sum() == planted["unseen"]
    means = {t: y[train & (tok == t)].mean() for t in np.unique(tok[train])}
    pred = np.array([means.get(t, y[train].mean()) for t in tok[~train]])
    expected = r2(y[~train], pred)
    got = at(result, "token_identity", TOKEN)
    assert got == pytest.approx(expected, abs=1e-9)
    # y is an exact function of the id, so an in-sample version would score 1; the unseen id costs R²
    assert got < 0.99
    assert any(f"{planted['unseen']} of {result.n_test_tokens} test tokens" in n for n in result.notes)


def test_constant_l0_falls_back_to_the_train_mean(planted: dict, result: LayerBaselinesResult) -> None:
    ref = reference(planted, TOKEN)
    assert np.all(ref["l0"] == 2)  # TopK with both kept coordinates non-zero
    y, train = ref["y"], ref["train"]
    expected = r2(y[~train], np.full((~train).sum(), y[train].mean()))
    assert at(result, "l0", TOKEN) == pytest.approx(expected, abs=1e-9)
    assert expected <= 0
    assert any(
        n.startswith(f"l0 is constant on the train tokens at layer(s) {[TOKEN, NORM, LOSS, MIXED]}")
        for n in result.notes
    )


def test_fvu_and_l0_on_test_tokens(planted: dict, result: LayerBaselinesResult) -> None:
    for i, layer in enumerate(result.layers):
        ref = reference(planted, layer)
        test = ~ref["train"]
        x = ref["x"][test]
        assert result.fvu[i] == pytest.approx(ref["y"][test].sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-9)
        assert result.l0[i] == pytest.approx(ref["l0"][test].mean(), rel=1e-12)
    assert result.l0[result.layers.index(L0_LAYER)] < 1.5


def test_one_pass_and_independent_of_batch_size(
    planted: dict, result: LayerBaselinesResult, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []
    original = ActivationStore.iter_batches

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "iter_batches", counting)
    other = layer_baselines(planted["store"], planted["saes"], split=SPLIT, batch_tokens=4096)
    assert len(calls) == 1
    for name in result.r2:
        np.testing.assert_allclose(other.r2[name], result.r2[name], rtol=0, atol=1e-9)
    np.testing.assert_allclose(other.fvu, result.fvu, rtol=1e-10)
    assert other.config_hash == result.config_hash
    write_result(tmp_path, other)
    back = read_result(tmp_path, "layer_baselines", LayerBaselinesResult)
    assert back is not None and back.r2 == other.r2


def test_bad_input_names_the_layer(planted: dict) -> None:
    store = planted["store"]
    with pytest.raises(StoreError, match=r"layer\(s\) \[7\]"):
        layer_baselines(store, {7: planted_sae(7)}, split=SPLIT)
    with pytest.raises(ShapeError, match="width"):
        layer_baselines(store, {TOKEN: planted_sae(TOKEN, d=5)}, split=SPLIT)
    with pytest.raises(ConfigError, match="layer 1"):
        layer_baselines(store, {NORM: planted_sae(TOKEN)}, split=SPLIT)
    with pytest.raises(DataError, match=f"layer {CONSTANT} .*constant"):
        layer_baselines(store, {CONSTANT: planted_sae(CONSTANT)}, split=SPLIT)
    with pytest.raises(ConfigError, match="train fraction"):
        layer_baselines(store, planted["saes"], split=Split(seed=0, fraction=1.0))


def test_store_without_loss_skips_model_loss(tmp_path: Path) -> None:
    base = sparse_features(d=4, n_features=8, active=2)

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        x = base(gen, n_ctx, ctx_len)["blocks.0.hook_resid_post"]
        return {site(0): x, site(3): x.flip(-1)}

    store = synthetic_store(tmp_path / "s", make, n_contexts=16, ctx_len=16)
    res = layer_baselines(store, {0: planted_sae(0), 3: planted_sae(3)}, split=SPLIT)
    assert res.layers == [0, 3] and "model_loss" not in res.r2
    assert all(len(v) == 2 and np.isfinite(v).all() for v in res.r2.values())
    assert any(n.startswith("model_loss skipped") for n in res.notes)


def tiny_lm() -> LoadedLM:
    tok = tiny_tokenizer()
    ident = {"name": "tiny-llama", "model_type": "llama", "n_layers": 3, "d_model": 64, "vocab_size": 74}
    return LoadedLM(model=tiny_model("llama"), tokenizer=tok, identity=ident, bos_token_id=tok.bos_token_id)


def test_run_end_to_end_trains_once_and_reuses(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainings: list[list[str]] = []
    original = FamilyTrainer.train

    def counting(self, *args, **kwargs):
        trainings.append([s.site for s in self.specs])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FamilyTrainer, "train", counting)
    lm = tiny_lm()
    text = TextConfig(source=str(corpus_file), ctx_len=32, n_contexts=12, skip_positions=2)
    kw = {
        "d_sae": 32,
        "k": 4,
        "train": TrainConfig(epochs=1, batch_size=64, aux_k=8, dead_tokens=500, checkpoint_every=2),
        "harvest_cfg": HarvestConfig(batch_size=4, shard_contexts=4),
        "split": SPLIT,
    }
    out = tmp_path / "out"
    res = lb.run(lm, text, [2, 0], out, **kw)
    assert trainings == [[site(0), site(2)]]  # both layers in one FamilyTrainer run
    assert res.layers == [0, 2] and set(res.r2) == set(lb.PREDICTORS)
    assert all(np.isfinite(v).all() and max(v) <= 1 for v in res.r2.values())
    assert all(0 < f < 2 for f in res.fvu) and all(0 < v <= 4 for v in res.l0)
    assert res.n_train_tokens + res.n_test_tokens == 12 * (32 - 2 - 1)
    store = ActivationStore.open(out / "store_layers")
    assert store.sites == [site(0), site(2)]
    # 12 contexts, 8 blocks: shards of 1 context (the harvest's 4 would give 3 blocks)
    assert store.shard_contexts == 1 and res.interval_blocks == 8
    assert set(res.intervals) == set(res.r2)
    assert sorted(p.name for p in (out / "saes_layers").iterdir()) == ["0", "2"]  # no leftovers
    again = lb.run(lm, text, [0, 2], out, **kw)
    assert len(trainings) == 1
    assert again.r2 == res.r2 and again.fvu == res.fvu and again.intervals == res.intervals
    assert any("reused" in n for n in again.notes)
    # without intervals the harvest's 4 contexts per shard would be asked for: the store of 1 per shard is
    # reused as it is (not re-harvested, not mixed), and so are the SAEs
    plain = lb.run(lm, text, [0, 2], out, **kw, interval_blocks=0)
    assert len(trainings) == 1 and ActivationStore.open(out / "store_layers").shard_contexts == 1
    assert plain.config["harvest"]["shard_contexts"] == 1 and plain.intervals == {}
    for name in res.r2:
        np.testing.assert_allclose(plain.r2[name], res.r2[name], rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="other settings"):
        lb.run(lm, text, [0, 2], out, **{**kw, "k": 2})
    with pytest.raises(ConfigError, match="other settings"):  # SAEs trained on another split
        lb.run(lm, text, [0, 2], out, **{**kw, "split": Split(seed=1, fraction=0.8)})


# ---------------------------------------------------------------- delete-one-block jackknife intervals

SHARD = 8  # contexts per shard of the planted store (write_store): 5 shards, so 5 blocks of one shard


def numpy_r2(ref: dict[str, np.ndarray], name: str, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out R² of one predictor, fitted on ``train`` and scored on ``test`` rows, in plain numpy."""
    y = ref["y"]
    if name == "token_identity":
        tok = ref["token"]
        means = {t: y[train & (tok == t)].mean() for t in np.unique(tok[train])}
        pred = np.array([means.get(t, y[train].mean()) for t in tok[test]])
        return r2(y[test], pred)
    inputs = {
        "activations": ref["x"],
        "l0": ref["l0"],
        "activation_norm": np.linalg.norm(ref["x"], axis=1),
        "model_loss": ref["loss"],
    }
    xt = np.column_stack([inputs[name].reshape(len(y), -1), np.ones(len(y))])
    w = np.linalg.lstsq(xt[train], y[train], rcond=None)[0]
    return r2(y[test], xt[test] @ w)


@pytest.fixture(scope="module")
def replicates(planted: dict) -> tuple[LayerBaselinesResult, dict[int, dict[str, list[float]]]]:
    """The planted result and every layer's replicates, as `layer_replicates` returned them."""
    seen: dict[int, dict[str, list[float]]] = {}
    original = lb.layer_replicates

    def spy(acc, *args):
        seen[acc.layer] = out = original(acc, *args)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lb, "layer_replicates", spy)
        res = layer_baselines(planted["store"], planted["saes"], split=SPLIT, batch_tokens=97)
    return res, seen


def test_point_estimates_do_not_depend_on_the_blocks(planted: dict, result: LayerBaselinesResult) -> None:
    one = layer_baselines(planted["store"], planted["saes"], split=SPLIT, batch_tokens=97, interval_blocks=1)
    assert result.interval_blocks == 5 and one.interval_blocks == 0 and one.intervals == {}
    assert one.r2.keys() == result.r2.keys()
    for name in one.r2:
        np.testing.assert_allclose(result.r2[name], one.r2[name], rtol=1e-12, atol=1e-14, err_msg=name)
    np.testing.assert_allclose(result.fvu, one.fvu, rtol=1e-12)
    np.testing.assert_allclose(result.l0, one.l0, rtol=1e-12)
    assert (result.n_train_tokens, result.n_test_tokens) == (one.n_train_tokens, one.n_test_tokens)
    assert one.notes == [n for n in result.notes if not n.startswith("Intervals:")]


def test_each_replicate_is_a_refit_without_its_block(planted: dict, replicates: tuple) -> None:
    res, seen = replicates
    ctx, _pos = analysed((N_CTX, CTX_LEN))
    block = (ctx // SHARD).numpy()  # 5 shards -> 5 blocks of one shard each
    assert sorted(seen) == res.layers
    for layer in res.layers:
        ref = reference(planted, layer)
        train = ref["train"]
        assert set(seen[layer]) == set(res.r2), layer
        for name, reps in seen[layer].items():
            assert len(reps) == 5
            for b, got in enumerate(reps):
                keep = block != b
                expected = numpy_r2(ref, name, train & keep, ~train & keep)
                assert got == pytest.approx(expected, abs=1e-8), (layer, name, b)


def test_token_identity_replicates_recompute_the_means(planted: dict, replicates: tuple) -> None:
    """Leaving a block out moves the per-id means (not only the scored tokens)."""
    _res, seen = replicates
    ref = reference(planted, MIXED)  # y is not a function of the id here, so the means move
    ctx, _pos = analysed((N_CTX, CTX_LEN))
    keep = (ctx // SHARD).numpy() != 0
    y, tok, train = ref["y"], ref["token"], ref["train"]
    stale = {t: y[train & (tok == t)].mean() for t in np.unique(tok[train])}  # with block 0's train tokens
    test = ~train & keep
    frozen = r2(y[test], np.array([stale.get(t, y[train].mean()) for t in tok[test]]))
    got = seen[MIXED]["token_identity"][0]
    assert got == pytest.approx(numpy_r2(ref, "token_identity", train & keep, test), abs=1e-9)
    assert abs(got - frozen) > 1e-6


def test_intervals_contain_the_estimates(result: LayerBaselinesResult) -> None:
    assert set(result.intervals) == set(result.r2)
    for name, rows in result.intervals.items():
        assert len(rows) == len(result.layers)
        for value, row in zip(result.r2[name], rows, strict=True):
            assert len(row) == 2 and row[0] <= value + 1e-12 and value - 1e-12 <= row[1], name
    assert any(n.startswith("Intervals: 95% delete-one-block jackknife over 5 blocks") for n in result.notes)
    back = LayerBaselinesResult.model_validate(
        {k: v for k, v in result.model_dump().items() if k not in ("intervals", "interval_blocks")}
    )
    assert back.intervals == {} and back.interval_blocks == 0  # result files written before load


def noisy_layers(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
    """Two layers whose squared error norm (x3² + x4² under the planted SAE) is only partly predictable."""

    def layer(shift: float) -> torch.Tensor:
        return torch.stack([torch.randn(n_ctx, ctx_len, generator=gen) + shift * i for i in range(4)], -1)

    return {site(0): layer(0.7), site(1): layer(1.5)}


def test_intervals_narrow_with_more_contexts(tmp_path: Path) -> None:
    widths = []
    for n_ctx in (24, 384):  # 16 times the contexts: about a quarter of the width
        store = synthetic_store(
            tmp_path / str(n_ctx),
            noisy_layers,
            n_contexts=n_ctx,
            ctx_len=16,
            shard_contexts=n_ctx // 8,
            with_loss=True,
        )
        res = layer_baselines(store, {0: planted_sae(0), 1: planted_sae(1)}, split=SPLIT)
        assert res.interval_blocks == 8
        rows = {(k, i): row for k, per_layer in res.intervals.items() for i, row in enumerate(per_layer)}
        widths.append({key: high - low for key, (low, high) in rows.items()})
    small, large = widths
    assert set(small) == set(large)
    assert {k for k, _ in small} >= {"activations", "activation_norm", "model_loss", "token_identity"}
    for key, width in small.items():
        assert large[key] < width, key


def test_too_few_shards_give_no_interval(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path / "s", noisy_layers, n_contexts=20, ctx_len=16, shard_contexts=10)
    res = layer_baselines(store, {0: planted_sae(0)}, split=SPLIT, interval_blocks=8)
    assert store.n_shards == 2 and res.intervals == {} and res.interval_blocks == 0
    assert all(np.isfinite(v).all() for v in res.r2.values())
    assert any(n.startswith("No intervals: the store has 2 shard(s)") for n in res.notes)
    html = layer_section(res, {}, tmp_path)
    assert "class='ci'" not in html and "Brackets" not in html


def test_report_shows_the_intervals(result: LayerBaselinesResult, tmp_path: Path) -> None:
    html = layer_section(result, {}, tmp_path)
    low, high = result.intervals["activations"][0]
    assert f"{result.r2['activations'][0]:.3f} <span class='ci'>[{low:.3f}, {high:.3f}]</span>" in html
    assert "delete-one-block jackknife" in html and "5 blocks" in html


def test_layer_groups_bound_memory_without_changing_numbers(
    planted: dict, result: LayerBaselinesResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = ActivationStore.iter_batches

    def counting(self, sites, *args, **kwargs):
        calls.append(list(sites))
        return original(self, sites, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "iter_batches", counting)
    per_layer = layer_baselines(planted["store"], planted["saes"], split=SPLIT, batch_tokens=97, pass_bytes=1)
    assert calls == [[site(layer)] for layer in result.layers]  # one pass per layer
    assert per_layer.r2 == result.r2 and per_layer.intervals == result.intervals
    assert per_layer.fvu == result.fvu and per_layer.config_hash == result.config_hash
    assert any("passes over the store" in n for n in per_layer.notes)


def test_layer_store_shard_size() -> None:
    assert layer_shard_contexts(32, 48, 8) == 6  # the demo: 8 shards, not 2
    assert layer_shard_contexts(4, 100, 8) == 4  # never above the harvest's
    assert layer_shard_contexts(32, 5, 8) == 1
    assert layer_shard_contexts(32, 48, 0) == 32 and layer_shard_contexts(32, 48, 2) == 32  # no intervals
    assert layer_groups({0: 576, 1: 576, 2: 576}, 100, 8, True, budget=10**12) == [[0, 1, 2]]
    assert layer_groups({0: 576, 1: 576, 2: 576}, 100, 8, True, budget=1) == [[0], [1], [2]]
    five = {i: 576 for i in range(5)}
    assert layer_groups(five, 100, 8, True, budget=3 * layer_bytes(576, 100, 8, True)) == [[0, 1, 2], [3, 4]]
