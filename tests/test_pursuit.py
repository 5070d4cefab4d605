"""Gradient pursuit: sparse == dense reference, selection edge cases, workers, budgets, transforms."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import darkmatter.sae.pursuit as pursuit
from darkmatter.errors import ConfigError, ShapeError
from darkmatter.experiments.decomposition import decompose
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.sae.pursuit import (
    PursuitSAE,
    _Atoms,
    _atoms,
    _score_buffer,
    _select_exact,
    _select_screened,
    gradient_pursuit,
    pursuit_dense,
    pursuit_reconstruct,
)
from darkmatter.stats.split import Split
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(0, 0.8)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run single-threaded: the tensors are tiny, and on a shared machine intra-op threads that meet at a
    barrier after every short kernel make the tests many times slower. Worker tests set their own count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sae(
    activation: str, *, d_in: int = 32, d_sae: int = 128, seed: int = 0, dead: int = 0, **cfg: object
) -> SAE:
    """A random SAE with decoder norms in [0.5, 2], a non-zero ``b_dec`` and an L0 of a few to ~40."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(d_sae, 1, generator=g) * 1.5 + 0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in) * norms
    W_dec[:dead] = 0.0
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1 - 1.5,
        "W_dec": W_dec,
        "b_dec": torch.randn(d_in, generator=g) * 0.3,
    }
    if activation == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    k = 6 if activation == "topk" else None
    return SAE.from_tensors(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, **cfg), tensors)  # type: ignore[arg-type]


def token_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token ``||a - b|| / ||b||`` (rows of zeros compare absolutely)."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).max())


def unit_dictionary_sae(d_in: int, d_sae: int, k: int, seed: int = 0, **cfg: object) -> SAE:
    """TopK SAE with unit-norm random decoder rows and a tied encoder."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(d_sae, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    b_dec = torch.randn(d_in, generator=g) * 0.2
    tensors = {"W_enc": D.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": D, "b_dec": b_dec}
    return SAE.from_tensors(SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, **cfg), tensors)  # type: ignore[arg-type]


def planted(sae: SAE, n: int, active: int, seed: int = 1, noise: float = 0.01) -> torch.Tensor:
    """``x = sum of `active` decoder rows with weights in [0.5, 2] + b_dec + noise``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(sae.cfg.d_sae, generator=g)[:active] for _ in range(n)])
    mags = torch.rand(n, active, 1, generator=g) * 1.5 + 0.5
    return (mags * sae.W_dec[idx]).sum(1) + sae.b_dec + noise * torch.randn(n, sae.cfg.d_in, generator=g)


# ---------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_sparse_matches_dense_reference(activation: str, screen: bool) -> None:
    sae = random_sae(activation, seed=3, dead=5)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(4))
    dense = pursuit_dense(sae, x)
    codes = gradient_pursuit(sae, x, screen=screen)
    assert codes.width == int(sae.encode_sparse(x).l0().max())
    assert token_rel_err(codes.to_dense(sae.cfg.d_sae), dense) < 1e-5
    x_hat, _ = pursuit_reconstruct(sae, x, screen=screen)
    assert token_rel_err(x_hat, sae.decode(dense)) < 1e-5
    assert not bool(dense[:, :5].any())  # zero-norm atoms are never selected


@pytest.mark.parametrize("chunk_size", [None, 7, 64])
def test_chunking_and_budget_order_do_not_change_the_result(chunk_size: int | None) -> None:
    sae = random_sae("jumprelu", seed=5)
    x = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(6))
    budget = torch.randint(0, 12, (2, 50), generator=torch.Generator().manual_seed(7))
    codes = gradient_pursuit(sae, x, budget=budget, chunk_size=chunk_size)
    assert codes.indices.shape[:2] == (2, 50) and codes.width <= 11
    dense = pursuit_dense(sae, x, budget=budget)
    assert token_rel_err(codes.to_dense(sae.cfg.d_sae), dense) < 1e-5


def near_copies_sae(copies: int = 60, others: int = 40, d: int = 16) -> SAE:
    """``copies`` near-copies of one direction (bf16 cannot rank them) plus ``others`` random atoms."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=g)
    copy = base + 1e-3 * torch.randn(copies, d, generator=g)
    W_dec = torch.cat([copy, torch.randn(others, d, generator=g)])
    n = copies + others
    cfg = SAEConfig(d_in=d, d_sae=n, activation="topk", k=3)
    return SAE.from_tensors(cfg, {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(n), "W_dec": W_dec,
                                  "b_dec": torch.zeros(d)})  # fmt: skip


def select(r: torch.Tensor, atoms: _Atoms, screened: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One selection with an empty support: ``(best, atom, unproven, full-matmul)`` (0, 0 when exact)."""
    none = torch.zeros(r.shape[0], 0, dtype=torch.long)
    if screened:
        return _select_screened(r, atoms, none, _score_buffer(atoms, r.shape[0], torch.bfloat16))
    return (*_select_exact(r, atoms, none, _score_buffer(atoms, r.shape[0], r.dtype)), 0, 0)


@pytest.mark.parametrize("pairs", [256, 0])
def test_screening_settles_what_bf16_cannot_decide(monkeypatch: pytest.MonkeyPatch, pairs: int) -> None:
    # bf16 cannot rank the near-copies, so no token is proven by its candidates. Each is settled by
    # re-scoring the atoms within the bound, or (with no pairs allowed) by the full-precision matmul.
    monkeypatch.setattr(pursuit, "_PAIRS_PER_TOKEN", pairs)
    sae = near_copies_sae()
    g = torch.Generator().manual_seed(1)
    r = sae.W_dec[0] + 1e-3 * torch.randn(20, 16, generator=g)
    atoms = _atoms(sae, torch.float32, screen=True)
    best, new, unproven, full = select(r, atoms, screened=True)
    assert unproven == 20 and full == (20 if pairs == 0 else 0)
    exact_best, exact_new, _, _ = select(r, atoms, screened=False)
    assert torch.equal(new, exact_new) and bool((new < 60).all())
    torch.testing.assert_close(best, exact_best)
    # a clear winner is proven by its candidates
    easy = sae.W_dec[70:71].expand(20, -1) * 3 + 0.01 * torch.randn(20, 16, generator=g)
    _, new, unproven, full = select(easy, atoms, screened=True)
    assert unproven == 0 and full == 0 and bool((new == 70).all())


@pytest.mark.parametrize("pairs", [256, 0])
def test_near_copies_pursued_like_the_reference(monkeypatch: pytest.MonkeyPatch, pairs: int) -> None:
    monkeypatch.setattr(pursuit, "_PAIRS_PER_TOKEN", pairs)  # 0: screening gives up for the full matmul
    sae = near_copies_sae()
    g = torch.Generator().manual_seed(2)
    x = sae.W_dec[torch.randint(0, 60, (50, 2), generator=g)].sum(1) + 0.3 * torch.randn(50, 16, generator=g)
    budget = torch.full((50,), 5)
    dense = pursuit_dense(sae, x, budget=budget)
    assert token_rel_err(gradient_pursuit(sae, x, budget=budget).to_dense(100), dense) < 1e-5


def test_blocked_selection_skips_zero_norm_atoms_when_every_score_is_negative() -> None:
    # Zero-norm atoms score exactly 0 in the bf16 matmul, above every real atom here, so the blocks with the
    # largest maxima hold only zero-norm atoms. Both selectors must still return the best real atom.
    g = torch.Generator().manual_seed(3)
    d, n = 8, 3000
    W_dec = torch.randn(n, d, generator=g)
    W_dec[:, 0] = W_dec[:, 0].abs() + 0.5  # every atom points along +e0
    W_dec[::20] = 0.0  # in every block; fewer than _PAIRS_PER_TOKEN, so settling re-scores them one by one
    cfg = SAEConfig(d_in=d, d_sae=n, activation="relu")
    sae = SAE.from_tensors(cfg, {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(n), "W_dec": W_dec,
                                 "b_dec": torch.zeros(d)})  # fmt: skip
    r = torch.zeros(5, d)
    r[:, 0] = -1.0  # negative inner product with every atom
    r[:, 1:] = 0.01 * torch.randn(5, d - 1, generator=g)
    exact = (r @ W_dec.T) / W_dec.norm(dim=1).clamp_min(1e-30)
    exact[:, ::20] = -math.inf
    for screened in (True, False):
        atoms = _atoms(sae, torch.float32, screen=screened)
        assert atoms.width // atoms.block > 8  # more blocks than candidates: the two-stage search is used
        best, new, _, _ = select(r, atoms, screened)
        assert torch.equal(new, exact.argmax(dim=1))
        assert bool((best < 0).all()) and bool((new % 20 != 0).all())


# ---------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_never_exceeds_the_encoder_budget_and_stays_non_negative(activation: str) -> None:
    sae = random_sae(activation, seed=8)
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(9)) * 2
    codes = gradient_pursuit(sae, x)
    assert bool((codes.l0() <= sae.encode_sparse(x).l0()).all())
    assert bool((codes.values >= 0).all())
    assert bool((codes.indices[codes.values == 0] == 0).all())  # padding convention of SparseCodes


def test_zero_budget_reconstructs_b_dec() -> None:
    sae = random_sae("relu", seed=1)
    x = torch.randn(5, 32)
    x_hat, codes = pursuit_reconstruct(sae, x, budget=torch.zeros(5, dtype=torch.long))
    assert codes.width == 0
    torch.testing.assert_close(x_hat, sae.b_dec.expand(5, -1))


def test_zero_budgets_and_zero_residuals_among_other_tokens() -> None:
    # Tokens with budget 0, tokens equal to b_dec (residual 0 from the start: every score is 0, and the
    # chosen atom gets no weight) and ordinary tokens, in one batch.
    sae = random_sae("topk", seed=21, dead=3)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(22))
    x[::4] = sae.b_dec
    budget = torch.randint(0, 9, (40,), generator=torch.Generator().manual_seed(23))
    budget[1::8] = 0
    codes = gradient_pursuit(sae, x, budget=budget)
    assert bool((codes.l0()[::4] == 0).all()) and bool((codes.l0() <= budget).all())
    assert token_rel_err(codes.to_dense(128), pursuit_dense(sae, x, budget=budget)) < 1e-5
    x_hat, _ = pursuit_reconstruct(sae, x, budget=budget)
    torch.testing.assert_close(x_hat[::4], x[::4])


def test_duplicate_atoms_reconstruct_like_the_reference() -> None:
    # Exact copies score the same; whichever copy is taken, the residual, and so the reconstruction, is the
    # same, and so is the total weight on each group of copies.
    sae = random_sae("jumprelu", seed=24)
    W_dec = sae.W_dec.clone()
    W_dec[64:96] = W_dec[:32]
    dup = SAE.from_tensors(sae.cfg, {**dict(sae.named_tensors()), "W_dec": W_dec})
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(25))
    budget = dup.encode_sparse(x).l0()
    dense = pursuit_dense(dup, x, budget=budget)

    def merged(codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([codes[:, :32] + codes[:, 64:96], codes[:, 32:64], codes[:, 96:]], dim=1)

    # ties go to the lower copy, in both selectors
    r = 3 * W_dec[torch.arange(10)] + 1e-3 * torch.randn(10, 32, generator=torch.Generator().manual_seed(30))
    for screened in (True, False):
        assert torch.equal(select(r, _atoms(dup, torch.float32, screened), screened)[1], torch.arange(10))
    for screen in (True, False):
        codes = gradient_pursuit(dup, x, budget=budget, screen=screen).to_dense(128)
        assert bool((codes.count_nonzero(dim=1) <= budget).all())
        assert token_rel_err(merged(codes), merged(dense)) < 1e-5
        assert token_rel_err(codes @ W_dec, dense @ W_dec) < 1e-5


def test_budget_of_every_atom() -> None:
    # With budget = d_sae, late iterations can find every atom in the support: nothing is left to select.
    g = torch.Generator().manual_seed(26)
    W_dec = torch.randn(6, 16, generator=g)
    cfg = SAEConfig(d_in=16, d_sae=6, activation="relu")
    sae = SAE.from_tensors(cfg, {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(6), "W_dec": W_dec,
                                 "b_dec": torch.zeros(16)})  # fmt: skip
    x = torch.rand(30, 6, generator=g) @ W_dec  # non-negative combinations: atoms stay in the support
    budget = torch.full((30,), 6)
    dense = pursuit_dense(sae, x, budget=budget)
    for screen in (True, False):
        codes = gradient_pursuit(sae, x, budget=budget, screen=screen)
        assert codes.width == 6 and bool((codes.values >= 0).all())
        assert token_rel_err(codes.to_dense(6), dense) < 1e-5
    assert float((dense != 0).sum(1).float().mean()) > 5  # most tokens did fill their support


@pytest.mark.parametrize("threads", [2, 3])
def test_worker_threads_give_the_reference_codes(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # Enough tokens for several CPU workers; their shares are dealt by budget and put back in token order.
    shares: list[int] = []
    inner = pursuit._pursue_sparse

    def recording(r0: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        shares.append(r0.shape[0])
        return inner(r0, *args)

    monkeypatch.setattr(pursuit, "_pursue_sparse", recording)
    sae = random_sae("jumprelu", seed=27, dead=4)
    x = torch.randn(700, 32, generator=torch.Generator().manual_seed(28))
    budget = torch.randint(0, 20, (700,), generator=torch.Generator().manual_seed(29))
    budget[:50] = 0
    dense = pursuit_dense(sae, x, budget=budget)
    torch.set_num_threads(threads)
    codes = gradient_pursuit(sae, x, budget=budget, chunk_size=500)
    assert torch.get_num_threads() == threads  # restored after the workers changed it
    torch.set_num_threads(1)
    assert len(shares) == threads + 2 and sum(shares) == 700  # 500 tokens: one worker per thread; 200: two
    assert bool((codes.l0() <= budget).all()) and bool((codes.values >= 0).all())
    assert token_rel_err(codes.to_dense(128), dense) < 1e-5


def test_beats_the_encoder_on_a_well_conditioned_dictionary() -> None:
    sae = unit_dictionary_sae(d_in=64, d_sae=128, k=6)
    x = planted(sae, 300, active=4)
    err_sae = (x - sae.reconstruct(x)[0]).pow(2).sum(1)
    err_pursuit = (x - pursuit_reconstruct(sae, x)[0]).pow(2).sum(1)
    assert float(err_pursuit.mean()) < 0.5 * float(err_sae.mean())
    assert float((err_pursuit <= err_sae + 1e-6).float().mean()) > 0.9


def test_residual_norm_never_increases() -> None:
    sae = unit_dictionary_sae(d_in=64, d_sae=128, k=8)
    x = planted(sae, 100, active=6)
    target = x - sae.b_dec
    norms = []
    for b in range(9):
        w = pursuit_dense(sae, x, budget=torch.full((100,), b))
        norms.append((target - w @ sae.W_dec).norm(dim=1))
        codes = gradient_pursuit(sae, x, budget=torch.full((100,), b))
        assert token_rel_err(codes.to_dense(128), w) < 1e-5
    norms_t = torch.stack(norms)  # [budget, tokens]
    assert bool((norms_t[1:] <= norms_t[:-1] * (1 + 1e-6) + 1e-6).all())
    assert float(norms_t[-1].mean()) < 0.2 * float(norms_t[0].mean())


def test_recovers_an_exactly_sparse_signal() -> None:
    g = torch.Generator().manual_seed(2)
    d_in, d_sae, n = 64, 48, 100
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    W_dec = q[:d_sae].contiguous()  # orthonormal rows
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="relu", input_scale=2.0)
    b_dec = torch.randn(d_in, generator=g)
    sae = SAE.from_tensors(cfg, {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
                                 "W_dec": W_dec, "b_dec": b_dec})  # fmt: skip
    support = torch.randint(1, 6, (n,), generator=g)
    truth = torch.zeros(n, d_sae)
    for i in range(n):
        atoms = torch.randperm(d_sae, generator=g)[: int(support[i])]
        truth[i, atoms] = torch.rand(len(atoms), generator=g) * 1.5 + 0.5
    x = (truth @ W_dec + b_dec) / 2.0  # the SAE multiplies its input by input_scale = 2
    x_hat, codes = pursuit_reconstruct(sae, x, budget=support)
    torch.testing.assert_close(codes.to_dense(d_sae), truth, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, x, atol=1e-5, rtol=1e-5)
    assert torch.equal(codes.l0(), support)


# ----------------------------------------------------------------------------------------- transforms, dtypes


def test_input_scale_cancels() -> None:
    sae = random_sae("topk", seed=11, input_scale=0.37)
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(12))
    budget = sae.encode_sparse(x).l0()
    folded = sae.fold_input_scale()
    a, b = gradient_pursuit(sae, x, budget=budget), gradient_pursuit(folded, x, budget=budget)
    assert token_rel_err(a.to_dense(128), b.to_dense(128)) < 1e-4
    assert token_rel_err(pursuit_reconstruct(sae, x)[0], pursuit_reconstruct(folded, x)[0]) < 1e-4


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_normalized_saes_pursue_the_normalized_input(normalize: str) -> None:
    sae = random_sae("topk", seed=13, normalize=normalize, input_scale=1.5)
    plain = SAE.from_tensors(dataclasses.replace(sae.cfg, normalize="none"), dict(sae.named_tensors()))
    x = torch.randn(80, 32, generator=torch.Generator().manual_seed(14)) * 3 + 1
    stats = sae.input_stats(x)
    assert stats is not None
    x_n = (x - stats.shift) / stats.scale
    budget = sae.encode_sparse(x).l0()
    x_hat, codes = pursuit_reconstruct(sae, x, budget=budget)
    x_hat_n, codes_n = pursuit_reconstruct(plain, x_n, budget=budget)
    assert token_rel_err(codes.to_dense(128), codes_n.to_dense(128)) < 1e-5
    torch.testing.assert_close(x_hat, x_hat_n * stats.out_scale + stats.shift, atol=1e-4, rtol=1e-4)


def test_bf16_saes_pursue_in_float32() -> None:
    sae = random_sae("topk", seed=15)
    low = SAE.from_tensors(sae.cfg, dict(sae.named_tensors()), dtype=torch.bfloat16)
    same = SAE.from_tensors(sae.cfg, {k: v.to(torch.float32) for k, v in low.named_tensors()})
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(16)).to(torch.bfloat16)
    budget = low.encode_sparse(x).l0()
    codes = gradient_pursuit(low, x, budget=budget)
    assert codes.values.dtype == torch.bfloat16
    ref = gradient_pursuit(same, x.float(), budget=budget)  # identical numbers, float32 all the way
    assert token_rel_err(codes.to_dense(128).float(), ref.to_dense(128)) < 1e-2  # bf16 output rounding only
    x_hat, _ = pursuit_reconstruct(low, x)
    assert x_hat.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    sae = random_sae("jumprelu", seed=17)
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(18))
    budget = sae.encode_sparse(x).l0()
    cpu = gradient_pursuit(sae, x, budget=budget).to_dense(128)
    gpu = gradient_pursuit(sae.to("cuda"), x.cuda(), budget=budget.cuda()).to_dense(128).cpu()
    assert token_rel_err(gpu, cpu) < 1e-4


def test_bad_arguments_are_clear_errors() -> None:
    sae = random_sae("relu")
    x = torch.randn(4, 32)
    with pytest.raises(ShapeError, match="d_in=32"):
        gradient_pursuit(sae, torch.randn(4, 31))
    with pytest.raises(ConfigError, match="integer"):
        gradient_pursuit(sae, x, budget=torch.ones(4))
    with pytest.raises(ShapeError, match="token shape"):
        gradient_pursuit(sae, x, budget=torch.ones(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="d_sae=128"):
        gradient_pursuit(sae, x, budget=torch.full((4,), 129))
    with pytest.raises(ConfigError, match="chunk_size"):
        gradient_pursuit(sae, x, chunk_size=0)


# ---------------------------------------------------------------------------------------------- wrapper


def test_pursuit_sae_in_the_decomposition_engine(tmp_path: Path) -> None:
    d, n_features = 16, 48
    store = synthetic_store(tmp_path / "store", sparse_features(d=d, n_features=n_features, active=3),
                            n_contexts=40, ctx_len=32)  # fmt: skip
    g = torch.Generator().manual_seed(0)  # the directions and offset sparse_features(seed=0) planted
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 2
    cfg = SAEConfig(d_in=d, d_sae=n_features, activation="topk", k=4, hook_site=SITE)
    sae = SAE.from_tensors(cfg, {"W_enc": dirs.T.clone(), "b_enc": torch.zeros(n_features), "W_dec": dirs,
                                 "b_dec": offset})  # fmt: skip
    pursuit = PursuitSAE.from_sae(sae)
    assert pursuit.cfg is sae.cfg and pursuit.W_dec.data_ptr() == sae.W_dec.data_ptr()
    x = torch.randn(10, d)
    torch.testing.assert_close(pursuit.reconstruct(x)[0], pursuit_reconstruct(sae, x)[0])
    torch.testing.assert_close(pursuit.encode(x), sae.encode(x))  # the encoder still sets the budget

    dec = decompose(store, {"sae": sae, "pursuit": pursuit}, split=SPLIT, second_pass=False)
    plain, better = dec.stats["sae"], dec.stats["pursuit"]
    assert better.fvu <= plain.fvu
    assert better.fvu < 0.8 * plain.fvu  # least-squares-like coefficients beat the tied encoder's
    assert better.l0 <= plain.l0 + 1e-9
