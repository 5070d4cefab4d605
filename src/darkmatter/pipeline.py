"""``darkmatter run`` as a library call: the study's steps in order, each skipped when already done."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from darkmatter.config import StudyConfig
from darkmatter.errors import ConfigError, DataError, ShapeError
from darkmatter.harvest import Progress, harvest
from darkmatter.lm.loading import LoadedLM, load_lm
from darkmatter.results import Result, read_result, write_result
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.quality import evaluate_saes
from darkmatter.sae.train import FamilyTrainer
from darkmatter.store import ActivationStore
from darkmatter.text import make_contexts

Log = Callable[[str], None]
ProgressFactory = Callable[..., Progress | None]  # (name, unit='tok') -> callback


class HarvestResult(Result):
    """What the harvest step produced."""

    store: dict[str, Any] = Field(description="Summary of the activation store.")
    tokens_per_second: float | None = Field(None, description="Harvest throughput of the last (partial) run.")
    seconds: float = Field(0.0, description="Wall time of the step in this run.")


class SAERecord(BaseModel):
    """One SAE of the family: identity, where it lives, and held-out quality."""

    name: str
    site: str
    d_in: int
    d_sae: int
    k: int | None
    activation: str
    path: str
    source: str = Field(description="'trained' or the external format name.")
    fvu: float
    nmse: float
    l0: float
    dead_fraction: float
    eval_tokens: int
    history: list[dict[str, float]] = Field(default_factory=list, description="Training curve (train FVU).")


class FamilyResult(Result):
    """The SAE family and its quality on held-out (test-split) tokens."""

    saes: list[SAERecord]
    train_seconds: float = 0.0
    train_tokens_per_second: float | None = None


class WithFigures(Result):
    """A result with free-form fields (from an experiment module) plus its figure paths."""

    model_config = ConfigDict(extra="allow")
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class PursuitResult(Result):
    """Gradient pursuit on the width sweep, measured on the same tokens as the plain SAEs."""

    saes: list[dict[str, Any]] = Field(
        description="Per width: FVU and FVU_nonlinear with and without pursuit."
    )
    n_contexts: int
    n_test: int
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class SyntheticWithFigures(Result):
    """The synthetic-simulation result (free-form fields) plus its figure paths."""

    model_config = ConfigDict(extra="allow")
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class LayerBaselinesWithFigures(Result):
    """The layer-baselines result plus its figure paths."""

    layers: list[int]
    sites: list[str]
    r2: dict[str, list[float]]
    fvu: list[float]
    l0: list[float]
    n_train_tokens: int
    n_test_tokens: int
    notes: list[str] = Field(default_factory=list)
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


def _nan(matrix: list[list[float | None]]) -> Any:
    import numpy as np

    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)


def save_probe(path: Path, weights: Any, bias: Any) -> None:
    """Write an error probe b* (LinearError(x) = x @ weights + bias) atomically as safetensors."""
    from safetensors.torch import save as st_save

    from darkmatter.store import atomic_write_bytes

    atomic_write_bytes(
        path, st_save({"weights": weights.contiguous().cpu(), "bias": bias.contiguous().cpu()})
    )


def load_probe(path: Path) -> tuple[Any, Any]:
    """(weights [d, d], bias [d]) of a saved error probe."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["weights"], t["bias"]


def store_dir(out: str | Path) -> Path:
    return Path(out) / "store"


class Study:
    """Runs a study's steps into an output directory, lazily loading the model once."""

    def __init__(
        self,
        cfg: StudyConfig,
        out: str | Path,
        *,
        log: Log = print,
        progress: ProgressFactory | None = None,
    ):
        self.cfg = cfg
        self.out = Path(out)
        self._log = log
        self.progress: ProgressFactory = progress or (lambda *_args: None)
        self._lm: LoadedLM | None = None
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._step = ""
        self.deferred_errors: list[Exception] = []

    def log(self, message: str) -> None:
        """Log a step message; a step that says it is up to date is marked so in the summary."""
        if ": up to date" in message and self._step:
            self.status[self._step] = "up to date"
        self._log(message)

    @property
    def lm(self) -> LoadedLM:
        if self._lm is None:
            m = self.cfg.model
            self._lm = load_lm(
                m.name,
                device=m.device,
                dtype=m.dtype,
                online=m.online or None,
                trust_remote_code=m.trust_remote_code,
            )
        return self._lm

    def step_harvest(self) -> ActivationStore:
        """Harvest the configured sites (resuming a partial store); skipped when complete and unchanged."""
        hcfg = self.cfg.harvest.model_copy(update={"sites": self.cfg.sites()})
        key = self.cfg.section_hash("model", "text", "harvest") + ":" + ",".join(hcfg.sites)
        done = read_result(self.out, "harvest", HarvestResult)
        if done is not None and done.config_hash == key and (store_dir(self.out) / "manifest.json").is_file():
            store = ActivationStore.open(store_dir(self.out))
            if store.complete:
                self.log(f"harvest: up to date ({store.info()['tokens']} tokens)")
                return store
        t0 = time.perf_counter()
        contexts = make_contexts(self.cfg.text, self.lm.tokenizer, self.lm.bos_token_id)
        rate: list[float] = []
        bar = self.progress("harvest")

        def report(done_tok: int, total: int, tps: float) -> None:
            rate.append(tps)
            if bar is not None:
                bar(done_tok, total, tps)

        store = harvest(self.lm, contexts, self.cfg.text, hcfg, str(store_dir(self.out)), progress=report)
        seconds = time.perf_counter() - t0
        write_result(
            self.out,
            HarvestResult(
                experiment="harvest",
                config_hash=key,
                seed=self.cfg.seed,
                config={
                    "model": self.cfg.model.model_dump(),
                    "text": self.cfg.text.model_dump(),
                    "harvest": hcfg.model_dump(),
                },
                store=store.info(),
                tokens_per_second=rate[-1] if rate else None,
                seconds=seconds,
            ),
        )
        self.log(f"harvest: {store.info()['tokens']} tokens in {seconds:.1f}s")
        return store

    def family_hash(self) -> str:
        return self.cfg.section_hash("model", "text", "harvest", "family", "split_seed", "train_fraction")

    def _load_external(self, store: ActivationStore) -> dict[str, SAE]:
        """The configured external SAEs, with their site overrides, checked against the store."""
        saes: dict[str, SAE] = {}
        for ext in self.cfg.family.external:
            sae = load_sae(ext.path, format=ext.format, hookpoint=ext.hookpoint, online=self.cfg.model.online)
            if ext.site:
                sae.cfg.hook_site = ext.site
            if sae.cfg.hook_site not in store.sites:
                raise ShapeError(
                    f"SAE {ext.name!r} reads {sae.cfg.hook_site!r}, which the store lacks "
                    f"({store.sites}); set its 'site' or add the site to harvest.sites."
                )
            if sae.cfg.d_in != store.d[sae.cfg.hook_site]:
                raise ShapeError(
                    f"SAE {ext.name!r} ({ext.path}) reads vectors of width {sae.cfg.d_in}, but the model's "
                    f"{sae.cfg.hook_site} has width {store.d[sae.cfg.hook_site]}: the SAE belongs to another "
                    "model; check model.name and the SAE's path."
                )
            saes[ext.name] = sae
        return saes

    def step_family(self, store: ActivationStore) -> dict[str, SAE]:
        """Train the SAE family (or load the external SAEs) and measure held-out quality."""
        key = self.family_hash()
        done = read_result(self.out, "sae_family", FamilyResult)
        fam = self.cfg.family
        if done is not None and done.config_hash == key and all(Path(r.path).exists() for r in done.saes):
            self.log(f"sae_family: up to date ({len(done.saes)} SAEs)")
            if fam.external:  # reload as configured: format, hookpoint and site overrides
                return self._load_external(store)
            return {r.name: load_sae(r.path) for r in done.saes}
        t0 = time.perf_counter()
        records_src: dict[str, str] = {}
        rate: float | None = None
        if fam.external:
            saes = self._load_external(store)
            records_src = {ext.name: ext.path for ext in fam.external}
        else:
            trainer = FamilyTrainer(
                store,
                fam.specs(self.cfg.layer),
                fam.train,
                self.out / "saes" / ".training",
                split_seed=self.cfg.split_seed,
                train_fraction=self.cfg.train_fraction,
            )
            bar = self.progress("train SAEs")
            rates: list[float] = []

            def report(done_tok: int, total: int, tps: float) -> None:
                rates.append(tps)
                if bar is not None:
                    bar(done_tok, total, tps)

            trained = trainer.train(progress=report)
            rate = rates[-1] if rates else None
            saes = {}
            for spec, sae in zip(trainer.specs, trained, strict=True):
                path = save_sae(sae, self.out / "saes" / spec.name)
                saes[spec.name] = load_sae(path)  # exactly what a resumed run will load
                records_src[spec.name] = str(path)
            histories = {m.spec.name: m.history for m in trainer.members}
        train_seconds = time.perf_counter() - t0
        quality = evaluate_saes(
            store, saes, split="test", split_seed=self.cfg.split_seed, train_fraction=self.cfg.train_fraction
        )
        records = [
            SAERecord(
                name=n,
                site=str(s.cfg.hook_site),
                d_in=s.cfg.d_in,
                d_sae=s.cfg.d_sae,
                k=s.cfg.k,
                activation=s.cfg.activation,
                path=records_src[n],
                source="trained" if not fam.external else s.cfg.source_format,
                fvu=quality[n]["fvu"],
                nmse=quality[n]["nmse"],
                l0=quality[n]["l0"],
                dead_fraction=quality[n]["dead_fraction"],
                eval_tokens=int(quality[n]["tokens"]),
                history=[] if fam.external else histories[n],
            )
            for n, s in saes.items()
        ]
        write_result(
            self.out,
            FamilyResult(
                experiment="sae_family",
                config_hash=key,
                seed=self.cfg.seed,
                config={
                    "family": fam.model_dump(),
                    "layer": self.cfg.layer,
                    "split_seed": self.cfg.split_seed,
                    "train_fraction": self.cfg.train_fraction,
                },
                saes=records,
                train_seconds=train_seconds,
                train_tokens_per_second=rate,
            ),
        )
        for r in records:
            self.log(f"sae_family: {r.name:<24} FVU {r.fvu:.4f}  L0 {r.l0:6.1f}  dead {r.dead_fraction:.1%}")
        return saes

    def step_error_experiments(self, store: ActivationStore, saes: dict[str, SAE]) -> None:
        """Decomposition engine + the paper's error-prediction, scaling, per-token and norm experiments."""
        from darkmatter.experiments import error_experiments as ex
        from darkmatter.experiments.decomposition import decompose
        from darkmatter.report import figures as fg

        key = self.family_hash() + ":engine-v1"
        names = ("error_prediction", "per_token", "norm_prediction", "probe_latents")
        done = [read_result(self.out, n, Result) for n in names]
        probes_ok = all((self.out / "probes" / f"{n}.safetensors").is_file() for n in saes)
        if probes_ok and all(r is not None and r.config_hash == key for r in done):
            self.log("error experiments: up to date")
            return
        cfg, fam = self.cfg, self.cfg.family
        main_site = f"blocks.{cfg.layer}.hook_resid_post"
        width_sweep, k_sweep = ex.family_roles(
            saes, main_site, None if fam.external else fam.k, None if fam.external else fam.width_for_ks
        )
        table = self.out / "tables" / "tokens.parquet"
        dec = decompose(
            store,
            saes,
            split_seed=cfg.split_seed,
            train_fraction=cfg.train_fraction,
            table_path=table,
            progress=self.progress("engine (2 passes)"),
        )
        for name, (w, b) in dec.probes.items():
            save_probe(self.out / "probes" / f"{name}.safetensors", w, b)
        figdir = self.out / "figures"
        common = {
            "config_hash": key,
            "seed": cfg.seed,
            "config": {
                "family": fam.model_dump(),
                "layer": cfg.layer,
                "split_seed": cfg.split_seed,
                "train_fraction": cfg.train_fraction,
            },
        }

        paths = self._rel

        # Figs 1-3
        fit, nl_mean, nl_ci = ex.error_prediction(dec, width_sweep, k_sweep, main_site, seed=cfg.seed)
        st = dec.stats
        figs: dict[str, dict[str, str]] = {}
        grid = [n for n in dict.fromkeys(width_sweep + k_sweep)]
        if grid:
            figs["maps"] = paths(
                fg.plot_error_prediction_maps(
                    [st[n].d_sae for n in grid],
                    [st[n].l0 for n in grid],
                    [st[n].norm_r2 for n in grid],
                    [st[n].vector_r2 for n in grid],
                    [st[n].fvu_nonlinear for n in grid],
                    figdir,
                )
            )
        if width_sweep and nl_mean is not None:
            fit_params = {k: fit[k]["point"] for k in ("c", "a", "m")} if fit else None
            fit_ci = (
                {k: {"low": fit[k]["low"], "high": fit[k]["high"]} for k in ("c", "a", "m")} if fit else None
            )
            figs["scaling"] = paths(
                fg.plot_scaling_decomposition(
                    [st[n].d_sae for n in width_sweep],
                    [st[n].fvu for n in width_sweep],
                    [st[n].fvu_nonlinear for n in width_sweep],
                    fit_params,
                    fit_ci,
                    nl_mean,
                    figdir,
                )
            )
        write_result(
            self.out,
            ex.ErrorPredictionResult(
                experiment="error_prediction",
                **common,
                saes=[st[n].to_dict() for n in saes],
                width_sweep=width_sweep,
                k_sweep=k_sweep,
                power_law=fit,
                fvu_nonlinear_mean=nl_mean,
                fvu_nonlinear_ci=nl_ci,
                n_train=dec.n_train,
                n_test=dec.n_test,
                figures=figs,
            ),
        )

        # Figs 4, 5, 12, 16
        pt = ex.per_token(dec, width_sweep, main_site)
        trace = ex.token_trace(table, width_sweep, lambda t: self.lm.tokenizer.decode([t]))
        samples = ex.norm_samples(table, width_sweep, seed=cfg.seed)
        figs = {}
        if len(width_sweep) >= 2:
            labels = [f"{st[n].d_sae}" for n in width_sweep]
            figs["r2"] = paths(
                fg.plot_per_token_matrix(
                    labels,
                    _nan(pt["r2"]),
                    figdir,
                    stem="per_token_r2",
                    title="R² of predicting the larger SAE's per-token ‖e‖²",
                )
            )
            figs["gain"] = paths(
                fg.plot_per_token_matrix(
                    labels,
                    _nan(pt["nonlinear_gain"]),
                    figdir,
                    stem="per_token_nonlinear_gain",
                    title="% less unexplained variance with ‖NonlinearError‖² added",
                    cmap_label="%",
                )
            )
        if width_sweep:
            figs["trace"] = paths(
                fg.plot_token_trace(
                    trace["tokens"],
                    {
                        f"{st[n].d_sae} latents": v
                        for n, v in zip(width_sweep, trace["error_norm"].values(), strict=True)
                    },
                    figdir,
                )
            )
            figs["norms"] = paths(
                fg.plot_linear_vs_nonlinear_norms(
                    [st[n].d_sae for n in width_sweep], samples["linear"], samples["nonlinear"], figdir
                )
            )
        write_result(
            self.out,
            ex.PerTokenResult(
                experiment="per_token",
                **common,
                names=width_sweep,
                widths=[st[n].d_sae for n in width_sweep],
                **pt,
                trace=trace,
                mean_linear_norm=[st[n].mean_linear_norm for n in width_sweep],
                mean_nonlinear_norm=[st[n].mean_nonlinear_norm for n in width_sweep],
                figures=figs,
            ),
        )

        # Fig 6
        quantities = list(next(iter(st.values())).norm_test)
        r2 = {n: st[n].norm_test for n in saes}
        figs = {
            "violins": paths(
                fg.plot_norm_prediction_violins(
                    quantities, {q: [r2[n][q] for n in saes] for q in quantities}, figdir
                )
            )
        }
        write_result(
            self.out,
            ex.NormPredictionResult(
                experiment="norm_prediction", **common, quantities=quantities, r2=r2, figures=figs
            ),
        )

        # Fig 14 on the widest SAE of the width sweep
        target = width_sweep[-1] if width_sweep else next(iter(saes))
        pl = ex.probe_latents(
            store, saes[target], split_seed=cfg.split_seed, train_fraction=cfg.train_fraction
        )
        figs = {
            "scatter": paths(
                fg.plot_probe_vs_latents(pl["probe_dot"], pl["mean_active"], figdir, corr=pl["correlation"])
            )
        }
        write_result(
            self.out,
            ex.ProbeLatentsResult(experiment="probe_latents", **common, sae=target, **pl, figures=figs),
        )
        for n in width_sweep + [n for n in k_sweep if n not in width_sweep]:
            s = st[n]
            self.log(
                f"engine: {n:<24} FVU {s.fvu:.3f} FVU_nl {s.fvu_nonlinear:.3f} vecR2 {s.vector_r2:.3f} "
                f"normR2 {s.norm_r2:.3f}"
            )

    def _rel(self, files: dict[str, Path]) -> dict[str, str]:
        """Figure paths relative to the output directory (results stay valid if it moves)."""
        return {k: str(Path(v).resolve().relative_to(self.out.resolve())) for k, v in files.items()}

    def step_layer_baselines(self) -> None:
        """Figs 3 and 13: one SAE per layer, R² of its squared error norm from five predictors."""
        from darkmatter.experiments import layer_baselines as lb
        from darkmatter.report import figures as fg

        sweep = self.cfg.layer_sweep
        if not sweep.enabled:
            return
        key = self.cfg.section_hash("model", "text", "harvest", "layer_sweep", "split_seed", "train_fraction")
        if self.up_to_date("layer_baselines", key, "layer baselines"):
            return
        layers = sweep.resolve(self.lm.identity["n_layers"])
        text = self.cfg.text.model_copy(
            update={"n_contexts": min(sweep.n_contexts, self.cfg.text.n_contexts)}
        )
        kind = "batchtopk" if sweep.kind == "batchtopk" else "topk"
        res = lb.run(
            self.lm,
            text,
            layers,
            self.out / "layers",
            d_sae=sweep.d_sae,
            k=sweep.k,
            kind=kind,
            train=sweep.train,
            harvest_cfg=self.cfg.harvest.model_copy(update={"sites": []}),
            split_seed=self.cfg.split_seed,
            train_fraction=self.cfg.train_fraction,
            log=self.log,
            progress=self.progress,
        )
        res.config_hash = key
        res.seed = self.cfg.seed
        res.config = {**res.config, "layer_sweep": sweep.model_dump()}
        figs = fg.plot_layer_baselines(res.layers, res.r2, self.out / "figures")
        data = res.model_dump()
        data["figures"] = {"lines": self._rel(figs)}
        write_result(self.out, LayerBaselinesWithFigures.model_validate(data))
        self.log(
            "layer baselines: "
            + ", ".join(f"L{la} {r:.2f}" for la, r in zip(res.layers, res.r2["activations"], strict=True))
        )

    def up_to_date(self, result: str, key: str, label: str) -> bool:
        """True (and says so) when ``results/<result>.json`` was written under config hash ``key``."""
        done = read_result(self.out, result, Result)
        if done is None or done.config_hash != key:
            return False
        self.log(f"{label}: up to date")
        return True

    def chosen_sae(self, saes: dict[str, SAE], name: str | None, setting: str) -> str:
        """``name`` if given (checked), else the main-site SAE at the k-sweep width and the family's k."""
        if name is None:
            fam = self.cfg.family
            main = f"blocks.{self.cfg.layer}.hook_resid_post"
            candidates = [n for n, s in saes.items() if s.cfg.hook_site == main]
            preferred = [
                n for n in candidates if saes[n].cfg.d_sae == fam.width_for_ks and saes[n].cfg.k == fam.k
            ]
            name = (preferred or candidates or list(saes))[0]
        if name not in saes:
            raise ConfigError(f"{setting} {name!r} is not in the family ({', '.join(saes)}).")
        return name

    def step_synthetic(self, store: ActivationStore, saes: dict[str, SAE]) -> None:
        """Table 1, Fig 15 and the App. D random control on one SAE of the family."""
        from darkmatter.experiments.synthetic import synthetic_simulation
        from darkmatter.report import figures as fg

        syn = self.cfg.synthetic
        if not syn.enabled:
            return
        key = self.family_hash() + ":" + self.cfg.section_hash("synthetic")
        if self.up_to_date("synthetic_simulation", key, "synthetic simulation"):
            return
        name = self.chosen_sae(saes, syn.sae, "synthetic.sae")
        res = synthetic_simulation(
            store,
            saes[name],
            n_tokens=syn.n_tokens,
            split_seed=self.cfg.split_seed,
            train_fraction=self.cfg.train_fraction,
            seed=self.cfg.seed,
        )
        res.config_hash, res.seed = key, self.cfg.seed
        figs: dict[str, dict[str, str]] = {}
        curves: dict[str, list[float]] = {}
        ablation: list[float] = []
        for c in res.curves:
            label = f"σ_act={c['sigma_act']:g}, σ_rec={c['sigma_rec']:g}"
            ablation = c["ablation"]
            curves[f"{label}: SAE"] = c["fvu_rec"]
            curves[f"{label}: SAE + error prediction"] = c["fvu_lin"]
        if curves:
            figs["curves"] = self._rel(fg.plot_synthetic_simulation(ablation, curves, self.out / "figures"))
        data = res.model_dump()
        data["figures"] = figs
        data["sae_name"] = name
        write_result(self.out, SyntheticWithFigures.model_validate(data))
        t = res.table1
        self.log(f"synthetic simulation ({name}): Table 1 {t}; diagonal dominant: {res.diagonal_ok}")

    def step_pursuit(self, store: ActivationStore, saes: dict[str, SAE]) -> None:
        """Pursuit FVU, its own linear-error prediction, and the encoder-error band, per width."""
        import numpy as np

        from darkmatter.experiments import error_experiments as ex
        from darkmatter.experiments.decomposition import decompose
        from darkmatter.report import figures as fg
        from darkmatter.sae.pursuit import PursuitSAE

        cfg = self.cfg.pursuit
        if not cfg.enabled:
            return
        key = self.family_hash() + ":" + self.cfg.section_hash("pursuit")
        if self.up_to_date("pursuit", key, "pursuit"):
            return
        fam = self.cfg.family
        main_site = f"blocks.{self.cfg.layer}.hook_resid_post"
        width_sweep, _ = ex.family_roles(saes, main_site, None if fam.external else fam.k, None)
        if not width_sweep:
            return
        contexts = np.arange(min(cfg.n_contexts, store.n_contexts))
        both = {n: saes[n] for n in width_sweep} | {
            f"{n}+pursuit": PursuitSAE.from_sae(saes[n]) for n in width_sweep
        }
        dec = decompose(
            store,
            both,
            split_seed=self.cfg.split_seed,
            train_fraction=self.cfg.train_fraction,
            second_pass=False,
            progress=self.progress("pursuit"),
            contexts=contexts,
        )
        st = dec.stats
        rows = [
            {
                "name": n,
                "d_sae": st[n].d_sae,
                "fvu": st[n].fvu,
                "fvu_nonlinear": st[n].fvu_nonlinear,
                "pursuit_fvu": st[f"{n}+pursuit"].fvu,
                "pursuit_fvu_nonlinear": st[f"{n}+pursuit"].fvu_nonlinear,
                "pursuit_l0": st[f"{n}+pursuit"].l0,
                "encoder_error": st[n].fvu_nonlinear - st[f"{n}+pursuit"].fvu_nonlinear,
            }
            for n in width_sweep
        ]
        figs = {
            "scaling": self._rel(
                fg.plot_scaling_decomposition(
                    [r["d_sae"] for r in rows],
                    [r["fvu"] for r in rows],
                    [r["fvu_nonlinear"] for r in rows],
                    None,
                    None,
                    float(np.mean([r["fvu_nonlinear"] for r in rows])),
                    self.out / "figures",
                    stem="scaling_pursuit",
                    pursuit_fvu=[r["pursuit_fvu"] for r in rows],
                    pursuit_nonlinear=[r["pursuit_fvu_nonlinear"] for r in rows],
                )
            )
        }
        write_result(
            self.out,
            PursuitResult(
                experiment="pursuit",
                config_hash=key,
                seed=self.cfg.seed,
                config={"pursuit": cfg.model_dump(), "family": fam.model_dump()},
                saes=rows,
                n_contexts=len(contexts),
                n_test=dec.n_test,
                figures=figs,
            ),
        )
        for r in rows:
            self.log(
                f"pursuit: {r['name']:<22} FVU {r['fvu']:.3f} -> {r['pursuit_fvu']:.3f}; FVU_nl "
                f"{r['fvu_nonlinear']:.3f} -> {r['pursuit_fvu_nonlinear']:.3f}"
            )

    def step_nonlinear(self, store: ActivationStore, saes: dict[str, SAE]) -> None:
        """Downstream CE on held-out contexts, earlier-layer predictors with the joint map, the MLP probe."""
        from darkmatter.experiments import error_experiments as ex
        from darkmatter.experiments.downstream import downstream_ce
        from darkmatter.experiments.earlier_layers import (
            downstream_ce_with_joint,
            earlier_layer_predictors,
            mlp_probe,
        )
        from darkmatter.report import figures as fg
        from darkmatter.text import make_contexts

        cfg, nl, fam = self.cfg, self.cfg.nonlinear, self.cfg.family
        if not nl.enabled:
            return
        key = self.family_hash() + ":" + cfg.section_hash("nonlinear")
        if all(
            (r := read_result(self.out, n, Result)) is not None and r.config_hash == key
            for n in ("downstream_ce", "earlier_layers")
        ):
            self.log("nonlinear-error experiments: up to date")
            return
        layer = cfg.layer
        main_site = f"blocks.{layer}.hook_resid_post"
        width_sweep, _ = ex.family_roles(saes, main_site, None if fam.external else fam.k, None)
        probes = {n: load_probe(self.out / "probes" / f"{n}.safetensors") for n in width_sweep}
        # Held out: the same seeded window order continues past the harvested contexts.
        text = cfg.text.model_copy(update={"n_contexts": cfg.text.n_contexts + nl.ce_contexts})
        tokens = make_contexts(text, self.lm.tokenizer, self.lm.bos_token_id).tokens[cfg.text.n_contexts :]
        start = cfg.text.skip_positions
        figdir = self.out / "figures"
        ce = downstream_ce(
            self.lm,
            tokens,
            {n: saes[n] for n in width_sweep},
            probes,
            start=start,
            both_batches=1,
            progress=self.progress("downstream CE", "ctx"),
            seed=cfg.seed,
        )
        ce.config_hash, ce.seed = key, cfg.seed
        rows = ce.saes
        figs = {
            "bars": self._rel(
                fg.plot_ce_recovered(
                    [f"{saes[n].cfg.d_sae}" for n in width_sweep],
                    [100 * (rows[n].ce_recovered_linear or 0) for n in width_sweep],
                    [100 * (rows[n].ce_recovered_nonlinear or 0) for n in width_sweep],
                    [100 * rows[n].variance_share_linear for n in width_sweep],
                    [100 * rows[n].variance_share_nonlinear for n in width_sweep],
                    [100 * rows[n].norm_share_linear for n in width_sweep],
                    [100 * rows[n].norm_share_nonlinear for n in width_sweep],
                    figdir,
                )
            )
        }
        data = ce.model_dump()
        data["figures"] = figs
        write_result(self.out, WithFigures.model_validate(data))
        self.log(
            "downstream CE: "
            + ", ".join(
                f"{n} lin {rows[n].ce_recovered_linear:.2f} nonlin {rows[n].ce_recovered_nonlinear:.2f}"
                for n in width_sweep
                if rows[n].ce_recovered_linear is not None
            )
        )

        target = next(
            (
                n
                for n in saes
                if saes[n].cfg.hook_site == main_site
                and saes[n].cfg.d_sae == fam.width_for_ks
                and saes[n].cfg.k == fam.k
            ),
            width_sweep[0],
        )
        regressors = {
            n: s
            for n, s in saes.items()
            if s.cfg.hook_site
            in {
                f"blocks.{layer - 1}.hook_resid_post",
                f"blocks.{layer}.hook_mlp_out",
                f"blocks.{layer}.hook_attn_out",
            }
        }
        probe = load_probe(self.out / "probes" / f"{target}.safetensors")
        extra: dict[str, Any] = {"target": target}
        el = None
        if regressors:
            try:
                el = earlier_layer_predictors(
                    store,
                    saes[target],
                    probe,
                    regressors,
                    split_seed=cfg.split_seed,
                    train_fraction=cfg.train_fraction,
                    progress=self.progress("earlier layers"),
                )
            except (
                DataError
            ) as exc:  # e.g. too few tokens for the joint regression: say so, keep the run going
                extra["skipped"] = str(exc)
                self.log(f"earlier layers: skipped ({exc})")
        if el is not None:
            joint_ce = downstream_ce_with_joint(
                self.lm,
                tokens,
                saes[target],
                regressors,
                el.joint_map,
                start=start,
                probe=probe,
                progress=self.progress("CE with the joint map", "ctx"),
            )
            extra["joint_ce"] = joint_ce.model_dump()
            el_data = el.model_dump()
            figs = {
                "bars": self._rel(
                    fg.plot_earlier_layer_r2(
                        el.regressors, {t: [el.r2[r][t] for r in el.regressors] for t in el.targets}, figdir
                    )
                )
            }
        else:
            el_data = {
                "experiment": "earlier_layers",
                "regressors": [],
                "notes": [extra.get("skipped", "no regressor SAEs in the family")],
            }
            figs = {}
        try:
            extra["mlp_probe"] = mlp_probe(
                store,
                saes[target],
                probe,
                hidden=nl.mlp_hidden,
                epochs=nl.mlp_epochs,
                split_seed=cfg.split_seed,
                train_fraction=cfg.train_fraction,
                seed=cfg.seed,
                progress=self.progress("MLP probe", "pass"),
            )
        except DataError as exc:
            extra["mlp_probe"] = {"skipped": str(exc)}
            self.log(f"MLP probe: skipped ({exc})")
        el_data |= extra | {"figures": figs, "config_hash": key, "seed": cfg.seed}
        write_result(self.out, WithFigures.model_validate(el_data))
        self.log(
            f"earlier layers ({target}): joint R² on NonlinearError "
            f"{el_data.get('r2', {}).get('joint', {}).get('nonlinear', float('nan')):.3f}; MLP probe R² on "
            f"NonlinearError {extra['mlp_probe'].get('r2_nonlinear_mean_over_dims', float('nan')):.3f}"
        )

    def step_error_saes(self, store: ActivationStore, saes: dict[str, SAE]) -> None:
        """SAEs trained on LinearError and NonlinearError, then auto-interpretability of their latents."""
        from darkmatter.study_error_saes import run_autointerp_step, run_error_saes_step

        trained = run_error_saes_step(self, store, saes)
        if trained is not None:
            run_autointerp_step(self, store, saes, *trained)

    def step_report(self) -> Path:
        from darkmatter.report.html import write_report

        path = write_report(self.out)
        self.log(f"report: {path}")
        return path

    def run(self) -> Path:
        """Every step in order; returns the report path."""
        self.cfg.require_local()  # everything that would need a download, in one error, before any work
        self.remove_stale_temporaries()
        store = self._timed("harvest", self.step_harvest)
        saes = self._timed("sae_family", lambda: self.step_family(store))
        self._timed("error_experiments", lambda: self.step_error_experiments(store, saes))
        self._timed("layer_baselines", self.step_layer_baselines, self.cfg.layer_sweep.enabled)
        self._timed("synthetic", lambda: self.step_synthetic(store, saes), self.cfg.synthetic.enabled)
        self._timed("pursuit", lambda: self.step_pursuit(store, saes), self.cfg.pursuit.enabled)
        self._timed("nonlinear", lambda: self.step_nonlinear(store, saes), self.cfg.nonlinear.enabled)
        self._timed("error_saes", lambda: self.step_error_saes(store, saes), self.cfg.error_saes.enabled)
        self._timed("report", self.step_report)
        if self.deferred_errors:  # raised only now, so the report and every other result are written
            raise self.deferred_errors[0]
        return self.out / "report.html"

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed run left behind (atomic writes name them ``.NAME.*.tmp``)."""
        if self.out.is_dir():
            for path in self.out.rglob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)

    def _timed(self, name: str, fn: Callable[[], Any], enabled: bool = True) -> Any:
        self._step = name
        self.status[name] = "ran" if enabled else "disabled"
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = time.perf_counter() - t0
            self._step = ""

    def summary(self) -> list[tuple[str, str, float, str]]:
        """(step, status, seconds, headline) per step of the last ``run``, headlines read from results."""
        rows = []
        for name, seconds in self.timings.items():
            rows.append((name, self.status.get(name, "ran"), seconds, _headline(self.out, name)))
        return rows


def _headline(out: Path, step: str) -> str:
    """One line of the step's main numbers, from its result files ('' when there is none)."""
    import json

    def load(name: str) -> dict[str, Any] | None:
        path = out / "results" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    try:
        if step == "harvest" and (r := load("harvest")):
            return f"{r['store']['tokens']:,} tokens"
        if step == "sae_family" and (r := load("sae_family")):
            fvus = [s["fvu"] for s in r["saes"]]
            return f"{len(fvus)} SAEs, held-out FVU {min(fvus):.3f}-{max(fvus):.3f}"
        if step == "error_experiments" and (r := load("error_prediction")):
            nl = [s["fvu_nonlinear"] for s in r["saes"] if s["name"] in r["width_sweep"]]
            vec = [s["vector_r2"] for s in r["saes"]]
            text = f"vector R² {min(vec):.2f}-{max(vec):.2f}"
            return text + (f", FVU_nonlinear {min(nl):.3f}-{max(nl):.3f}" if nl else "")
        if step == "layer_baselines" and (r := load("layer_baselines")):
            acts = r["r2"]["activations"]
            return f"{len(acts)} layers, R²(activations → ‖e‖²) {min(acts):.2f}-{max(acts):.2f}"
        if step == "synthetic" and (r := load("synthetic_simulation")):
            return f"Table 1 diagonal dominant: {r.get('diagonal_ok')}"
        if step == "pursuit" and (r := load("pursuit")):
            return ", ".join(f"{s['d_sae']}: FVU {s['fvu']:.3f}→{s['pursuit_fvu']:.3f}" for s in r["saes"])
        if step == "nonlinear" and (r := load("downstream_ce")):
            rows = [v for v in r["saes"].values() if v.get("ce_recovered_linear") is not None]
            return "CE recovered lin/nonlin " + ", ".join(
                f"{v['ce_recovered_linear']:.2f}/{v['ce_recovered_nonlinear']:.2f}" for v in rows
            )
        if step == "error_saes" and (r := load("error_saes")):
            text = ", ".join(f"FVU on {c} {q['fvu']:.3f}" for c, q in r["saes"].items())
            if (a := load("autointerp")) and a.get("components"):
                bal = [
                    f"{c} {v['summary']['balanced_accuracy']:.2f}"
                    for c, v in a["components"].items()
                    if v["summary"].get("balanced_accuracy") is not None
                ]
                text += "; detection " + (", ".join(bal) if bal else "unscored (judge answers unparsed)")
            return text
        if step == "report":
            return str(out / "report.html")
    except (KeyError, TypeError, ValueError):
        return ""
    return ""


def run_study(cfg: StudyConfig, out: str | Path, **kwargs: Any) -> Path:
    """Run a whole study; see ``Study``."""
    return Study(cfg, out, **kwargs).run()
