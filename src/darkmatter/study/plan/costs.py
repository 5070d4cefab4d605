"""Cost models, one per step: tokens, FLOPs, bytes on disk, peak memory and seconds (see ``cost_model``)."""

from __future__ import annotations

from darkmatter.study.budget import (
    DEVICE_SLACK,
    F64,
    engine_sae_bytes,
    group_saes,
    sae_capacity,
    sae_cost,
    sae_weight_bytes,
)
from darkmatter.study.plan.cost_model import (
    E_FORWARD,
    E_GENERATE,
    E_MOMENTS,
    E_PURSUIT,
    E_SAE_ENCODE,
    E_SAE_TRAIN,
    T_FIGURE_STEP,
    T_IMPORT_MODEL,
    T_STEP,
    T_SYNTHETIC_TOKEN,
    Cost,
    Env,
    encode_flops,
    forward_flops,
    load_model_seconds,
    train_flops,
    train_state_bytes,
)
from darkmatter.study.plan.inputs import PlannedSAE, ceil_div
from darkmatter.study.plan.shapes import ModelDims
from darkmatter.study.steps.downstream_ce import BOTH_BATCHES


def harvest(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    dims, tokens = inp.dims, inp.tokens
    layers = dims.n_layers if cfg.harvest.with_loss else inp.last_site_layer + 1
    flops = tokens * forward_flops(dims, inp.ctx_len, layers, cfg.harvest.with_loss)
    sites = len(inp.sites)
    disk = tokens * (sites * inp.d * env.store_value_bytes + 4 * (2 + int(cfg.harvest.with_loss)))
    batch_tokens = cfg.harvest.batch_size * inp.ctx_len
    activations = batch_tokens * (4 * dims.d_model + 2 * dims.d_mlp + 2 * dims.n_heads * inp.ctx_len) * 4
    if cfg.harvest.with_loss:
        activations += batch_tokens * dims.vocab * 4 * 2
    shard = cfg.harvest.shard_contexts * inp.ctx_len * sites * inp.d * env.store_value_bytes * 2
    seconds = load_model_seconds(env) + env.forward(flops, E_FORWARD) + env.write(disk)
    return Cost(
        tokens=tokens,
        disk_bytes=disk,
        flops=flops,
        seconds=seconds,
        passes=1,
        device_bytes=activations if env.cuda else 0,
        host_bytes=shard + (0 if env.cuda else activations),
        uses_model=True,
    )


def family(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    saes = inp.saes
    n_eval = inp.test_tokens
    eval_flops = n_eval * sum(encode_flops(s) for s in saes)
    if cfg.family.external:
        # loaded one group at a time (each SAE read from disk, scored on the test tokens, released)
        groups = sae_groups(env, saes, engine_fixed_bytes(env), "family", blocks=0)
        seconds = env.load_saes(saes) + env.gemm32(eval_flops, E_SAE_ENCODE) + T_STEP * len(saes)
        largest = max((sae_weight_bytes(s.d_in, s.d_sae, 4) for s in saes), default=0)
        group = max(
            (
                sum(sae_weight_bytes(inp.sae(n).d_in, inp.sae(n).d_sae, env.sae_bytes_per_value) for n in g)
                for g in groups
            ),
            default=0,
        )
        chunk = 1024 * max((s.d_sae for s in saes), default=0) * 4 * 2
        return Cost(
            tokens=n_eval,
            flops=eval_flops,
            seconds=seconds,
            passes=len(groups),
            groups=groups,
            device_bytes=group + chunk if env.cuda else 0,
            host_bytes=largest + (0 if env.cuda else group + chunk),
        )
    train = cfg.family.train
    n_train = inp.train_tokens
    steps = ceil_div(int(n_train * train.epochs), train.batch_size)
    val = (steps // train.eval_every + 3) * min(train.validation_tokens, n_eval)
    per_token = sum(train_flops(s) for s in saes)
    if cfg.family.kind == "jumprelu":  # a dense decoder, forward and both gradients
        per_token += sum(6.0 * s.d_in * s.d_sae for s in saes)
    flops = n_train * train.epochs * per_token
    flops += (val + n_eval) * sum(encode_flops(s) for s in saes)
    state = sum(train_state_bytes(s) for s in saes)
    batch = train.batch_size * sum(s.d_sae for s in saes) * 4 * 3  # pre-activations, codes, gradients
    buffer = 4096 * cfg.harvest.shard_contexts * len(inp.sites) * inp.d * 4  # the shuffled train rows
    disk = 2 * sum(sae_weight_bytes(s.d_in, s.d_sae, 4) for s in saes) + state  # saved SAEs, checkpoint
    seconds = env.gemm32(flops, E_SAE_TRAIN) + env.write(disk * (steps / train.checkpoint_every + 1) / 2)
    return Cost(
        tokens=int(n_train * train.epochs),
        disk_bytes=disk,
        flops=flops,
        seconds=seconds + T_STEP,
        passes=int(train.epochs) + 1,
        groups=[[s.name for s in saes]],
        device_bytes=state + batch if env.cuda else 0,
        host_bytes=(0 if env.cuda else state + batch) + min(buffer, inp.tokens * len(inp.sites) * inp.d * 4),
    )


def engine_fixed_bytes(env: Env) -> int:
    """The engine's fixed part on the device: a chunk of activations and the shared input moments."""
    inp = env.inp
    chunk = 1024 if not env.cuda else 8192
    blocks = inp.jackknife_blocks
    return chunk * len(inp.sites) * inp.d * 4 * 3 + 2 * blocks * (inp.d + 2) ** 2 * F64


def sae_groups(
    env: Env, saes: list[PlannedSAE], fixed: int, what: str, *, copies: int = 1, blocks: int | None = None
) -> list[list[str]]:
    """The groups the step itself will form (`sae_cost` per SAE, `sae_capacity` of the budget)."""
    n_blocks = env.inp.jackknife_blocks if blocks is None else blocks
    costs = {
        s.name: sae_cost(s.d_in, s.d_sae, dtype_bytes=env.sae_bytes_per_value, blocks=n_blocks, copies=copies)
        for s in saes
    }
    setting = (
        "resources.sae_memory_gb" if env.inp.cfg.resources.sae_memory_gb else "resources.device_memory_gb"
    )
    return group_saes(costs, capacity(env, fixed), what=what, setting=setting)


def capacity(env: Env, fixed: int) -> int:
    """Device bytes left for SAEs (see `sae_capacity`)."""
    return sae_capacity(
        env.budget,
        model_bytes=env.model_bytes,
        fixed=fixed,
        sae_memory_gb=env.inp.cfg.resources.sae_memory_gb,
    )


def _pursuit_bytes(env: Env, s: PlannedSAE) -> int:
    weights = sae_weight_bytes(s.d_in, s.d_sae, env.sae_bytes_per_value)
    return 2 * (_engine_bytes(env, s) - weights) + weights


def _moment_flops(s: PlannedSAE) -> float:
    """Float64 moment updates per token: inputs against the error and its norms, both passes' share."""
    return 2.0 * (s.d_in + 2) * (s.d_in + 2)


def engine(env: Env) -> Cost:
    inp = env.inp
    saes = inp.saes
    tokens = inp.used_tokens
    fixed = engine_fixed_bytes(env)
    groups = sae_groups(env, saes, fixed, "engine")
    blocks = inp.jackknife_blocks
    f32 = 2 * tokens * sum(encode_flops(s) for s in saes)
    f64 = 2 * tokens * sum(_moment_flops(s) for s in saes)
    solves = sum((blocks + 2) * 2.0 * s.d_in**3 for s in saes)  # Cholesky solves per replicate
    store = inp.tokens * len(inp.sites) * inp.d * env.store_value_bytes
    seconds = env.gemm32(f32, E_SAE_ENCODE) + env.gemm64(f64 + solves, E_MOMENTS)
    seconds += (len(groups) - 1) * 2 * env.read(store) + env.load_saes(saes) + T_STEP + T_FIGURE_STEP
    largest = max((sum(_engine_bytes(env, inp.sae(n)) for n in g) for g in groups), default=0)
    probes = sum(s.d_in * (s.d_in + 1) * 4 for s in saes)
    table = tokens * (4 + 3 * len(saes)) * 8
    grams = len(inp.sites) * (2 * blocks + 2) * 64 * 8
    return Cost(
        tokens=2 * tokens,
        disk_bytes=probes + table // 2 + grams,
        flops=f32 + f64 + solves,
        seconds=seconds,
        groups=groups,
        passes=2 * len(groups),
        device_bytes=fixed + largest if env.cuda else 0,
        # + the host copy of the largest SAE's arrays while it is read from its files
        host_bytes=(0 if env.cuda else fixed + largest) + 16384 * (4 + 3 * len(saes)) * 8 + _load_copy(saes),
    )


def _load_copy(saes: list[PlannedSAE]) -> int:
    return max((sae_weight_bytes(s.d_in, s.d_sae, 4) for s in saes), default=0)


def _engine_bytes(env: Env, s: PlannedSAE) -> int:
    blocks = env.inp.jackknife_blocks
    return engine_sae_bytes(s.d_in, s.d_sae, dtype_bytes=env.sae_bytes_per_value, blocks=blocks)


def per_token(env: Env) -> Cost:
    tokens = env.inp.used_tokens
    table = tokens * (4 + 3 * len(env.inp.saes)) * 8
    return Cost(tokens=tokens, seconds=T_STEP + env.read(table), host_bytes=table, passes=1)


def layer_sweep(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    sweep, dims = cfg.layer_sweep, inp.dims
    layers = sweep.resolve(dims.n_layers)
    n_ctx = min(sweep.n_contexts, cfg.text.n_contexts)
    tokens = n_ctx * inp.ctx_len
    used = n_ctx * max(inp.ctx_len - cfg.text.skip_positions, 1)
    fwd = tokens * forward_flops(dims, inp.ctx_len, dims.n_layers, True)
    saes = [PlannedSAE(f"layer{la}", "", inp.d, sweep.d_sae, sweep.k) for la in layers]
    n_train = int(used * cfg.train_fraction)
    train = n_train * sweep.train.epochs * sum(train_flops(s) for s in saes)
    blocks = max(cfg.engine.interval_blocks, 1)
    passes = 2
    enc = passes * used * sum(encode_flops(s) for s in saes)
    mom = passes * used * sum(_moment_flops(s) for s in saes) + len(saes) * (blocks + 2) * 2.0 * inp.d**3
    disk = tokens * len(layers) * inp.d * env.store_value_bytes + tokens * 8
    disk += sum(2 * sae_weight_bytes(s.d_in, s.d_sae, 4) for s in saes)
    seconds = (
        env.forward(fwd, E_FORWARD)
        + env.gemm32(train, E_SAE_TRAIN)
        + env.gemm32(enc, E_SAE_ENCODE)
        + env.gemm64(mom, E_MOMENTS)
        + env.write(disk)
        + T_STEP
        + T_FIGURE_STEP
    )
    state = max((train_state_bytes(s) for s in saes), default=0)
    batch = sweep.train.batch_size * sweep.d_sae * 4 * 3
    shard = cfg.harvest.shard_contexts * inp.ctx_len * len(layers) * inp.d * env.store_value_bytes * 2
    logits = cfg.harvest.batch_size * inp.ctx_len * dims.vocab * 4 * 2
    held = state + batch + blocks * len(layers) * 2 * (inp.d + 2) ** 2 * F64
    return Cost(
        tokens=tokens,
        disk_bytes=disk,
        flops=fwd + train + enc + mom,
        seconds=seconds,
        groups=[[s.name for s in saes]],
        passes=1 + int(sweep.train.epochs) + passes,
        device_bytes=held + logits if env.cuda else 0,
        host_bytes=shard + (0 if env.cuda else held + logits),
        uses_model=True,
    )


def synthetic(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    s = inp.chosen(cfg.synthetic.sae)
    n = cfg.synthetic.n_tokens
    runs = 2 if cfg.synthetic.random_control else 1
    # simulated x' = Sae(x), its SAE forward, and the moments of the decomposition on it
    f32 = runs * n * 3 * encode_flops(s)
    f64 = runs * n * 2 * _moment_flops(s)
    held = n * s.d_in * 4 * 4 + sae_weight_bytes(s.d_in, s.d_sae, 4)
    return Cost(
        tokens=runs * n,
        flops=f32 + f64,
        # + the Table 1 grid's many small fits and noise draws, which no GEMM count captures
        seconds=env.gemm32(f32, E_SAE_ENCODE)
        + env.gemm64(f64, E_MOMENTS)
        + T_STEP
        + T_FIGURE_STEP
        + runs * n * T_SYNTHETIC_TOKEN,
        groups=[[s.name]],
        passes=runs,
        device_bytes=held if env.cuda else 0,
        host_bytes=0 if env.cuda else held,
    )


def pursuit(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    sweep = [inp.sae(n) for n in inp.width_sweep]
    n_ctx = min(cfg.pursuit.n_contexts, cfg.text.n_contexts)
    tokens = n_ctx * max(inp.ctx_len - cfg.text.skip_positions, 1)
    # k iterations, each correlating the residual with every atom; then the refit and the fixed probes
    f_pursuit = tokens * sum(2.0 * s.k * s.d_in * s.d_sae for s in sweep)
    f_enc = tokens * sum(4 * encode_flops(s) for s in sweep)
    f64 = tokens * sum(4 * _moment_flops(s) for s in sweep)
    groups = sae_groups(env, sweep, engine_fixed_bytes(env), "pursuit", copies=2) if sweep else []
    seconds = env.gemm32(f_pursuit, E_PURSUIT) + env.gemm32(f_enc, E_SAE_ENCODE) + env.gemm64(f64, E_MOMENTS)
    seconds += env.load_saes(sweep)
    largest = max((sum(_pursuit_bytes(env, inp.sae(n)) for n in g) for g in groups), default=0)
    chunk = 1024 * max((s.d_sae for s in sweep), default=0) * 4 * 3
    return Cost(
        tokens=tokens,
        flops=f_pursuit + f_enc + f64,
        seconds=seconds + T_STEP + T_FIGURE_STEP,
        groups=groups,
        passes=2 * max(len(groups), 1),
        device_bytes=largest + chunk if env.cuda else 0,
        host_bytes=0 if env.cuda else largest + chunk,
    )


def _splice_costs(
    env: Env, n_contexts: int, spliced_per_batch: int, batch: int = 4, extra_passes: int = 0
) -> tuple[float, int, int]:
    """(FLOPs, forward passes, memory of one batch) of splices at the study's layer: per batch one clean
    full pass, then ``spliced_per_batch`` passes of the layers after it (the prefix replayed), plus
    ``extra_passes`` spliced passes in all (settings checked on a few batches only)."""
    inp = env.inp
    dims, ctx = inp.dims, inp.ctx_len
    batches = ceil_div(n_contexts, batch)
    scored = max(ctx - inp.cfg.text.skip_positions, 1)
    after = dims.n_layers - inp.cfg.layer - 1
    clean = ctx * forward_flops(dims, ctx, dims.n_layers, False) + scored * dims.head_flops()
    spliced = ctx * forward_flops(dims, ctx, after, False) + scored * dims.head_flops()
    flops = (
        n_contexts * (clean + spliced_per_batch * spliced) + extra_passes * min(batch, n_contexts) * spliced
    )
    rows = min(batch, n_contexts)  # contexts in one batch
    memory = rows * scored * dims.vocab * 4 * 3 + rows * ctx * dims.d_model * 4 * dims.n_layers
    return flops, batches * (1 + spliced_per_batch) + extra_passes, memory


def downstream_ce(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    sweep = [inp.sae(n) for n in inp.width_sweep]
    n_ctx = cfg.downstream_ce.n_contexts
    # per batch: sae, sae+linear, sae+nonlinear per SAE and one zero ablation of the site; the sae+both
    # identity check per SAE on the first BOTH_BATCHES batches only
    both = min(BOTH_BATCHES, ceil_div(n_ctx, 4)) * len(sweep)
    flops, passes, memory = _splice_costs(env, n_ctx, 3 * len(sweep) + 1, extra_passes=both)
    weights = {
        s.name: sae_weight_bytes(s.d_in, s.d_sae, env.sae_bytes_per_value) + s.d_in**2 * 4 for s in sweep
    }
    room = capacity(env, memory) - (int(env.model_bytes / DEVICE_SLACK) if env.cuda else 0)
    groups = group_saes(weights, room, what="downstream_ce") if sweep else []
    held = max((sum(weights[n] for n in g) for g in groups), default=0)
    return Cost(
        tokens=n_ctx * inp.ctx_len,
        flops=flops,
        seconds=env.splices(flops) + env.load_saes(sweep) + T_STEP,
        groups=groups,
        passes=passes,
        device_bytes=memory + held if env.cuda else 0,
        host_bytes=0 if env.cuda else memory + held,
        uses_model=True,
    )


def earlier_layers(env: Env) -> Cost:
    inp, cfg = env.inp, env.inp.cfg
    el = cfg.earlier_layers
    target = inp.sae(inp.target)
    regs = [inp.sae(n) for n in inp.regressors]
    tokens = inp.used_tokens
    p = inp.d * (1 + len(regs))  # the joint map's features
    blocks = inp.jackknife_blocks
    f_enc = tokens * sum(encode_flops(s) for s in [target, *regs])
    f64 = tokens * 2.0 * (p + 2) * (inp.d + p + 2) + (blocks + 2) * 2.0 * p**3
    hidden = el.mlp_hidden
    f_mlp = (
        el.mlp_epochs * inp.train_tokens * 6.0 * (2 * inp.d * hidden) + inp.test_tokens * 4.0 * inp.d * hidden
    )
    ce_ctx = el.ce_contexts or cfg.downstream_ce.n_contexts
    f_ce, ce_passes, memory = _splice_costs(env, ce_ctx, 3)
    seconds = (
        env.gemm32(f_enc, E_SAE_ENCODE)
        + env.gemm64(f64, E_MOMENTS)
        + env.gemm32(f_mlp, E_SAE_TRAIN)
        + env.forward(f_ce, E_FORWARD)
        + T_STEP
        + T_FIGURE_STEP
    )
    held = blocks * 2 * (p + 2) * (p + inp.d + 2) * F64 + p * p * 4 * 2
    held += sum(sae_weight_bytes(s.d_in, s.d_sae, env.sae_bytes_per_value) for s in [target, *regs])
    held += 1024 * sum(s.d_sae for s in [target, *regs]) * 4 * 2
    return Cost(
        tokens=tokens,
        flops=f_enc + f64 + f_mlp + f_ce,
        seconds=seconds,
        groups=[[target.name, *[s.name for s in regs]]],
        passes=2 + el.mlp_epochs + ce_passes,
        # on a GPU the regressions' moments and the model's CE batches are not held at once
        device_bytes=max(held - env.model_bytes, memory) if env.cuda else 0,
        host_bytes=0 if env.cuda else held + memory,
        uses_model=True,
    )


def _error_saes(env: Env) -> tuple[PlannedSAE, list[PlannedSAE]]:
    inp, es = env.inp, env.inp.cfg.error_saes
    s = inp.chosen(es.sae)
    w = es.d_sae or s.d_sae
    k = es.k or s.k or inp.cfg.family.k
    return s, [PlannedSAE(f"{c}-error", s.site, inp.d, w, k) for c in es.components]


def error_saes(env: Env) -> Cost:
    inp = env.inp
    es = inp.cfg.error_saes
    source, trained = _error_saes(env)
    n_train = inp.train_tokens
    # each batch's error components come from the source SAE and its probe, then the SAEs train on them
    f_src = n_train * es.train.epochs * (encode_flops(source) + 2.0 * inp.d**2)
    f_train = n_train * es.train.epochs * sum(train_flops(s) for s in trained)
    steps = ceil_div(int(n_train * es.train.epochs), es.train.batch_size)
    val = (steps // es.train.eval_every + 3) * min(es.train.validation_tokens, inp.test_tokens)
    f_eval = (val + inp.test_tokens) * sum(encode_flops(s) + encode_flops(source) for s in trained)
    state = sum(train_state_bytes(s) for s in trained)
    disk = 2 * sum(sae_weight_bytes(s.d_in, s.d_sae, 4) for s in trained) + state
    seconds = env.gemm32(f_src + f_eval, E_SAE_ENCODE) + env.gemm32(f_train, E_SAE_TRAIN)
    seconds += env.write(disk * (steps / es.train.checkpoint_every + 1) / 2) + T_STEP
    batch = es.train.batch_size * sum(s.d_sae for s in [source, *trained]) * 4 * 3
    return Cost(
        tokens=int(n_train * es.train.epochs),
        disk_bytes=disk,
        flops=f_src + f_train + f_eval,
        seconds=seconds,
        groups=[[s.name for s in trained]],
        passes=int(es.train.epochs) + 1,
        device_bytes=state + batch if env.cuda else 0,
        host_bytes=0 if env.cuda else state + batch,
    )


def autointerp(env: Env, judge: ModelDims | None) -> Cost:
    inp = env.inp
    ic = inp.cfg.error_saes.interp
    source, trained = _error_saes(env)
    tokens = inp.used_tokens
    # examples: one pass over the store through the source SAE, its probe and each error SAE, and one
    # through the source SAE alone for its own sampled latents
    f_examples = tokens * sum(encode_flops(source) + 2.0 * inp.d**2 + encode_flops(s) for s in trained)
    f_examples += tokens * encode_flops(source) * (ic.sae_latents > 0)
    latents = (len(ic.latents) or ic.n_latents) * len(trained) + ic.sae_latents
    explain_prompt = 120 + ic.n_examples_explain * (ic.window + 8)
    tests = 10 * ic.n_per_decile + ic.n_negatives
    detect_prompts = ceil_div(tests, ic.batch_size)
    if ic.fuzzing:  # fuzzing: windows of the activating deciles, half with the latent's tokens marked
        detect_prompts += ceil_div(10 * ic.n_per_decile, ic.batch_size)
    detect_prompt = 100 + ic.batch_size * (ic.window + 6)
    prompt_tokens = latents * (explain_prompt + detect_prompts * detect_prompt)
    gen_tokens = latents * (ic.explain_max_tokens + detect_prompts * ic.batch_size * 2)
    seconds = env.gemm32(f_examples, E_SAE_ENCODE) + T_STEP
    flops = f_examples
    if ic.judge == "local" and judge is not None:
        per_token = forward_flops(judge, 512, judge.n_layers, True)
        flops += (prompt_tokens + gen_tokens) * per_token
        seconds += env.gemm32(prompt_tokens * per_token, E_FORWARD)
        seconds += env.gemm32(gen_tokens * per_token, E_GENERATE)
        if ic.local_model != "embedded" or inp.cfg.model.name != "embedded":
            seconds += T_IMPORT_MODEL + env.read(judge.params() * 4)
    elif ic.judge == "endpoint":
        # a served model: ~2 s per request, interp.concurrency latents at a time
        seconds += ceil_div(latents, max(ic.concurrency, 1)) * (1 + detect_prompts) * 2.0
    held = sum(sae_weight_bytes(s.d_in, s.d_sae, 4) for s in trained) + 1024 * source.d_sae * 4 * 3
    return Cost(
        tokens=tokens,
        flops=flops,
        seconds=seconds,
        groups=[[s.name for s in trained]],
        passes=len(trained) + (ic.sae_latents > 0),
        device_bytes=held if env.cuda else 0,
        host_bytes=0 if env.cuda else held,
        uses_model=True,
    )
