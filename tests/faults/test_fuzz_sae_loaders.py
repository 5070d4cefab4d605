"""Fuzzing every SAE loader: damaged input is a DarkMatterError, never a crash, a foreign exception or a hang.

Each hypothesis example writes a valid tiny SAE with ``sae_helpers`` (one of several variants per format),
damages its files with one to three mutations of one family, and loads it:

- ``config``: JSON fields deleted or set to values of the wrong type or range (strings for ints, negative,
  zero, huge, NaN, inf, nested garbage), a non-object top level, non-UTF-8 or cut text; for ``.pt``
  checkpoints the same edits of their plain-Python entries (``activation``, ``k``, ``norm_factor``, ...);
- ``tensors``: tensors dropped, added, renamed, reshaped against the config, transposed, cast to int, bool,
  complex, float16, bfloat16 or float64 (or big-endian and string arrays in ``.npz``), poisoned with NaN or
  inf; ``.npz`` object arrays and ``.pt`` entries whose unpickling would run code; legacy ``.pt`` files;
- ``bytes``: files deleted, emptied, truncated, bit-flipped, replaced by garbage or by a directory.

``load_sae`` must return a working SAE (a finite reconstruction of the right shape) or raise a
``DarkMatterError`` whose one-line message names the SAE; no pickle may ever run code. A sample of the same
damage goes through ``darkmatter sae inspect`` (exit 0 or 2, one stderr line, no traceback), and a sweep sets
every config field of every format to each kind of wrong value in turn.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import signal
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkmatter.cli import main
from darkmatter.errors import DarkMatterError
from darkmatter.sae import load_sae

from sae_helpers import (
    Exploit,
    write_dictionary_learning,
    write_gemma_scope,
    write_gemma_scope_2,
    write_json,
    write_llama_scope,
    write_llamascopium,
    write_openai,
    write_saelens,
    write_sparsify,
)

pytestmark = pytest.mark.slow

EXAMPLES_PER_CASE = 60  # per (format, mutation family): 180 per format (120 for Gemma Scope v1)
CLI_EXAMPLES = 60
HANG_SECONDS = 20  # a hard stop for a loader that never returns (the deadline only measures)
FUZZ = settings(
    max_examples=EXAMPLES_PER_CASE,
    deadline=3_000,  # ms; examples take ~10 ms
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- valid starting points


def _saelens_with_scaler(folder: Path) -> None:
    write_saelens(folder, architecture="jumprelu", normalize="expected_average_only_in")
    write_json(folder / "activation_scaler.json", {"scaling_factor": 0.7})


def _llamascopium_pt(folder: Path) -> None:
    write_llamascopium(folder, act_fn="topk", top_k=4)
    weights = folder / "sae_weights.safetensors"
    torch.save({"sae": safetensors.torch.load_file(str(weights))}, folder / "sae_weights.pt")
    weights.unlink()


def _gemma_v1(folder: Path) -> None:
    write_gemma_scope(folder / "params.npz")


_OUT_NORM: dict[str, Any] = {"dataset_average_activation_norm": {"in": 6.5, "out": 3.25}}
VARIANTS: dict[str, list[tuple[str, Callable[[Path], Any]]]] = {  # (path to load under the root, writer)
    "saelens": [
        ("s", partial(write_saelens, architecture="topk", k=5, normalize="layer_norm")),
        ("s", partial(write_saelens, architecture="topk", k=3, v6=False)),
        ("s", partial(write_saelens, v6=False, finetuning_scaling_factor=True, normalize=False)),
        ("s", partial(write_saelens, architecture="topk", k=4, rescale_acts_by_decoder_norm=True)),
        ("s", _saelens_with_scaler),
    ],
    "gemma_scope": [
        ("gemma-scope-2b-pt-res/layer_3/average_l0_9", _gemma_v1),
        ("sae.npz", partial(write_gemma_scope, lowercase=True)),
    ],
    "gemma_scope_2": [("g2", write_gemma_scope_2)],
    "llama_scope": [
        ("l", write_llama_scope),
        ("l", partial(write_llama_scope, act_fn="topk")),
        ("l", partial(write_llama_scope, apply_decoder_bias_to_pre_encoder=True, **_OUT_NORM)),
    ],
    "llamascopium": [("l2", write_llamascopium), ("l2", _llamascopium_pt)],
    "sparsify": [
        ("layers.3", write_sparsify),
        ("layers.3", partial(write_sparsify, cfg={"num_latents": 32})),
    ],
    "dictionary_learning": [
        ("d", partial(write_dictionary_learning, dict_class="BatchTopKSAE")),
        ("d", partial(write_dictionary_learning, dict_class="JumpReluAutoEncoder")),
        ("d", partial(write_dictionary_learning, dict_class="MatryoshkaBatchTopKSAE")),
        ("d", partial(write_dictionary_learning, dict_class="AutoEncoder", write_config=False)),
        ("d", partial(write_dictionary_learning, dict_class="AutoEncoderTopK", backup_norm_factor=2.0)),
    ],
    "openai": [
        ("resid_post_mlp_v5_32k/autoencoders/3.pt", write_openai),
        ("o/5.pt", partial(write_openai, activation="ReLU")),
    ],
}
SUFFIXES = {  # the kinds of file each format's variants write
    "saelens": {".json", ".safetensors"}, "gemma_scope": {".npz"}, "gemma_scope_2": {".json", ".safetensors"},
    "llama_scope": {".json", ".safetensors"}, "llamascopium": {".json", ".safetensors", ".pt"},
    "sparsify": {".json", ".safetensors"}, "dictionary_learning": {".json", ".pt"}, "openai": {".pt"},
}  # fmt: skip


def build(variant: tuple[str, Callable[[Path], Any]], root: Path) -> Path:
    """Write a valid SAE under ``root``; returns the path to load."""
    name, write = variant
    write(root / name)
    return root / name


# --------------------------------------------------------------------------- mutation strategies

KNOWN_KEYS = (  # fields some loader reads that the valid files may lack
    "k", "d_sae", "norm_scaling_factor", "activation_fn_kwargs", "scaling_factor", "hook_name", "width",
    "type", "num_latents", "top_k", "sae_type", "trainer", "dict_class", "transcode", "skip_connection",
    "lm_name", "use_glu_encoder", "affine_connection", "jump_relu_threshold",
    "dataset_average_activation_norm",
)  # fmt: skip
TENSOR_KEYS = (
    "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "k", "norm_factor", "group_sizes",
    "encoder.weight", "bias", "pre_bias", "latent_bias", "W_skip", "scaling_factor", "ae", "step", "sae",
    "dataset_average_activation_norm.in", "activation", "activation_state_dict", "config", "_orig_mod.W_enc",
)  # fmt: skip
BAD_VALUES = (
    None, True, 0, -1, 0.5, 10**30, 10**400, 1e308, float("nan"), float("inf"), "", "8", "abc", [], [1, 2],
    {}, {"k": 3},
)  # fmt: skip
"""One value of each kind a field should not hold (or holds only at the edge of its range)."""
SPECIAL = (
    1, 2, 8, 32, -(10**30), 2**63, 1e-308, float("-inf"), False, "NaN", "relu", "topk", "jumprelu", "gated",
    "dataset-wise", "token-wise", "layers.3", "TopK", "expected_average_only_in", "\udcff", {"in": 0.0},
    {"k": "abc"}, {"dict_class": "AutoEncoder"}, [[[]]],
)  # fmt: skip
"""Plausible-looking values of the wrong meaning."""
ODD_TENSORS = (
    torch.zeros(3), torch.tensor(float("nan")), torch.ones(32, 8), torch.arange(4), torch.tensor(-1.0)
)  # fmt: skip
VALUES = st.one_of(
    *[st.sampled_from(BAD_VALUES)] * 3,
    st.sampled_from(SPECIAL),
    st.recursive(
        st.integers() | st.floats() | st.text(max_size=6),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KNOWN_KEYS), inner, max_size=3)
        ),
        max_leaves=6,
    ),
)
PT_VALUES = VALUES | st.sampled_from(ODD_TENSORS)
TORCH_DTYPES = ("int32", "int64", "int8", "uint8", "bool", "float16", "bfloat16", "float64", "complex64")
NUMPY_DTYPES = ("int32", "int64", "uint8", "bool", "float16", "float64", "complex64", ">f4", "<U3")
SHAPES = st.lists(st.integers(0, 40), max_size=3).map(tuple)
INDEX = st.integers(0, 2**32 - 1)  # picks an entry modulo the number there is (about uniformly)


def op(name: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    """A mutation: its name and its drawn parameters."""
    return st.tuples(st.just(name), *args)


BYTE_OPS = st.one_of(
    op("delete"), op("empty"), op("directory"), op("truncate", st.floats(0.0, 1.0)),
    op("flip", st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=4)),
    op("garbage", st.binary(max_size=96)),
    op("prefix", st.sampled_from([b"\xff\xfe", b"\x80", b"\x00" * 8, b"PK\x03\x04"])),
)  # fmt: skip
JSON_OPS = st.one_of(  # mostly wrong values and missing keys; a few whole-file changes
    *[op("set_path", INDEX, VALUES)] * 6, *[op("drop_path", INDEX)] * 2,
    op("set", st.sampled_from(KNOWN_KEYS), VALUES),
    op("top", st.sampled_from([[], [1], 3, 1.5, "cfg", None, True])),
    op("encoding", st.sampled_from(["utf-16", "latin-1", "cut"])),
)  # fmt: skip
TENSOR_OPS = st.one_of(
    op("drop_t", INDEX), op("extra_t", st.sampled_from(TENSOR_KEYS), SHAPES), op("shape_t", INDEX, SHAPES),
    op("transpose_t", INDEX), op("rename_t", INDEX, st.sampled_from(TENSOR_KEYS)), op("clear_t"),
    op("poison_t", INDEX, st.sampled_from([float("nan"), float("inf"), float("-inf")]), INDEX),
)  # fmt: skip
SAFETENSORS_OPS = TENSOR_OPS | op("dtype_t", INDEX, st.sampled_from(TORCH_DTYPES))
NPZ_OPS = TENSOR_OPS | op("dtype_t", INDEX, st.sampled_from(NUMPY_DTYPES)) | op("object_t", INDEX)
PT_PLAIN_OPS = st.one_of(
    *[op("set_path", INDEX, PT_VALUES)] * 6, *[op("drop_path", INDEX)] * 2,
    op("set", st.sampled_from(TENSOR_KEYS), PT_VALUES),
    op("top_pt", st.sampled_from(["list", "tensor", "int", "none", "nested"])),
)  # fmt: skip
PT_TENSOR_OPS = SAFETENSORS_OPS | op("exploit", INDEX) | op("legacy")
FAMILIES: dict[str, dict[str, st.SearchStrategy[tuple[Any, ...]]]] = {
    "config": {".json": JSON_OPS, ".pt": PT_PLAIN_OPS},  # JSON configs; plain entries of a checkpoint
    "tensors": {".safetensors": SAFETENSORS_OPS, ".npz": NPZ_OPS, ".pt": PT_TENSOR_OPS},
    "bytes": dict.fromkeys((".json", ".safetensors", ".npz", ".pt"), BYTE_OPS),
}
CASES = [(fmt, fam) for fmt in sorted(VARIANTS) for fam in FAMILIES if SUFFIXES[fmt] & set(FAMILIES[fam])]
BYTE_KINDS = frozenset({"delete", "empty", "directory", "truncate", "flip", "garbage", "prefix"})


# --------------------------------------------------------------------------- applying mutations


def _pick(keys: list[Any], index: int) -> Any:
    return sorted(keys, key=repr)[index % len(keys)] if keys else None


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into nested dicts (tensors and lists are leaves)."""
    if not isinstance(obj, dict):
        return []
    return [p for key, value in obj.items() for p in [(*prefix, key), *_paths(value, (*prefix, key))]]


def edit_path(obj: Any, path: tuple[Any, ...] | None, value: Any, *, drop: bool = False) -> None:
    """Set (or delete) ``obj[path[0]][path[1]]...``; nothing when ``path`` is None."""
    if path is None:
        return
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def _edit_plain(obj: Any, op: tuple[Any, ...], marker: Path) -> Any:
    """Edits of a JSON config or of a checkpoint's plain-Python entries; returns the object to write."""
    kind = op[0]
    if kind in ("at", "drop_at"):  # a given key path (the sweep)
        edit_path(obj, op[1], copy.deepcopy(op[2]) if kind == "at" else None, drop=kind == "drop_at")
    elif kind in ("set_path", "drop_path", "exploit"):
        value = Exploit(marker) if kind == "exploit" else copy.deepcopy(op[2]) if kind == "set_path" else None
        edit_path(obj, _pick(_paths(obj), op[1]), value, drop=kind == "drop_path")
    elif kind == "set" and isinstance(obj, dict):
        obj[op[1]] = copy.deepcopy(op[2])
    elif kind == "top":
        return op[1]
    elif kind == "top_pt":
        tops = {"list": [obj], "tensor": torch.zeros(3), "int": 7, "none": None, "nested": {"x": obj}}
        return tops[op[1]]
    return obj


def _bytes_op(file: Path, op: tuple[Any, ...]) -> None:
    if file.is_dir():
        return
    data, kind = (file.read_bytes() if file.is_file() else b""), op[0]
    file.unlink(missing_ok=True)
    if kind == "directory":
        (file / "inner").mkdir(parents=True)
    elif kind == "flip":
        buf = bytearray(data)
        for where, xor in op[1] if buf else ():
            buf[min(int(where * len(buf)), len(buf) - 1)] ^= xor
        file.write_bytes(bytes(buf))
    elif kind == "truncate":
        file.write_bytes(data[: int(len(data) * op[1])])
    elif kind != "delete":  # empty, garbage, prefix
        file.write_bytes(b"" if kind == "empty" else op[1] if kind == "garbage" else op[1] + data)


def _json_op(file: Path, op: tuple[Any, ...], marker: Path) -> None:
    try:
        text = json.dumps(_edit_plain(json.loads(file.read_text(encoding="utf-8")), op, marker))
    except (OSError, ValueError):
        return  # already damaged beyond JSON edits
    if op[0] == "encoding":
        raw = {"utf-16": text.encode("utf-16"), "latin-1": (text[:-1] + ', "x": "\xe9"}').encode("latin-1")}
        file.write_bytes(raw.get(op[1], text.encode()[: len(text) // 2]))
    else:
        file.write_text(text, encoding="utf-8")


def _load_tensors(file: Path) -> Any:
    if file.suffix == ".safetensors":
        return safetensors.torch.load_file(str(file))
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    return torch.load(file, weights_only=True)


def _save_tensors(file: Path, obj: Any, legacy: bool = False) -> None:
    if file.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in obj.items()}, str(file))
    elif file.suffix == ".npz":
        np.savez(file, **{k: v if isinstance(v, np.ndarray) else _numpy(v) for k, v in obj.items()})
    else:
        torch.save(obj, file, _use_new_zipfile_serialization=not legacy)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _container(obj: Any) -> dict[str, Any] | None:
    """The dict of tensors to edit: the state dict, or the one nested under ``ae``/``sae``."""
    if not isinstance(obj, dict):
        return None
    return next((obj[k] for k in ("ae", "sae") if isinstance(obj.get(k), dict)), obj)


def _retype(value: torch.Tensor, dtype: str) -> Any:
    value = value.real if value.is_complex() and dtype != "complex64" else value
    if dtype in TORCH_DTYPES:
        return value.to(getattr(torch, dtype))
    return _numpy(value).astype(np.dtype(dtype))


def _tensor_op(state: dict[str, Any], op: tuple[Any, ...], marker: Path) -> None:
    """Edits of the tensors in a state dict, in place."""
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    kind, name = op[0], _pick(tensors, op[1]) if len(op) > 1 and isinstance(op[1], int) else None
    if kind == "extra_t":
        state[op[1]] = torch.randn(op[2]) * 0.5
    elif kind == "clear_t":
        state.clear()
    elif name is None:
        return
    elif kind == "drop_t":
        del state[name]
    elif kind == "shape_t":
        state[name] = torch.randn(op[2]) * 0.5
    elif kind == "transpose_t":
        state[name] = state[name].T.contiguous() if state[name].ndim == 2 else state[name].reshape(-1, 1)
    elif kind == "rename_t":
        state[op[2]] = state.pop(name)
    elif kind == "poison_t" and state[name].numel():
        value = (
            state[name]
            if state[name].is_floating_point() or state[name].is_complex()
            else state[name].float()
        )
        state[name] = value.clone()
        state[name].view(-1)[op[3] % value.numel()] = op[2]
    elif kind == "dtype_t":
        state[name] = _retype(state[name], op[2])
    elif kind == "object_t":
        state[name] = np.array([Exploit(marker), 1.0], dtype=object)


def _structure_op(file: Path, op: tuple[Any, ...], marker: Path) -> None:
    try:
        obj = _load_tensors(file)
    except Exception:  # already damaged beyond structural edits
        return
    if op[0] in ("at", "drop_at", "set_path", "drop_path", "set", "exploit", "top_pt"):
        obj = _edit_plain(obj, op, marker)
    elif (state := _container(obj)) is not None:
        _tensor_op(state, op, marker)
    _save_tensors(file, obj, legacy=op[0] == "legacy")


def mutate(file: Path, op: tuple[Any, ...], marker: Path) -> None:
    """Apply one mutation to ``file`` (a missing file or a directory only takes byte-level mutations)."""
    if op[0] in BYTE_KINDS:
        _bytes_op(file, op)
    elif file.is_file() and file.suffix == ".json":
        _json_op(file, op, marker)
    elif file.is_file():
        _structure_op(file, op, marker)


# --------------------------------------------------------------------------- the property


@contextlib.contextmanager
def hard_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise AssertionError(f"the loader ran for more than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def damaged_sae(data: st.DataObject, fmt: str, family: str, root: Path) -> tuple[Path, Path]:
    """Write a valid SAE of format ``fmt`` under ``root``, damage it, and return (its path, pickle marker)."""
    path = build(data.draw(st.sampled_from(VARIANTS[fmt]), label="variant"), root / "sae")
    marker = root / "pwned"
    ops = FAMILIES[family]
    files = sorted(p for p in (root / "sae").rglob("*") if p.suffix in ops and p.is_file())
    for _ in range(data.draw(st.integers(1, 3 if family == "config" else 2), label="n_mutations")):
        file = data.draw(st.sampled_from(files), label="file")
        mutate(file, data.draw(ops[file.suffix], label=f"mutation of {file.name}"), marker)
    return path, marker


def assert_loads_or_fails_cleanly(path: Path, fmt: str | None, root: Path) -> None:
    """The property: a working SAE, or a one-line DarkMatterError naming what failed to load."""
    try:
        with hard_limit(HANG_SECONDS):
            sae = load_sae(path, format=fmt)
    except DarkMatterError as err:
        message = str(err)
        assert "\n" not in message, f"multi-line message: {message!r}"
        assert str(root) in message, f"the message names no file: {message!r}"
        return
    x = torch.randn(5, sae.cfg.d_in, generator=torch.Generator().manual_seed(0)) * 2.0
    x_hat, codes = sae.reconstruct(x)
    assert x_hat.shape == x.shape, (x_hat.shape, x.shape)
    assert torch.isfinite(x_hat).all(), f"non-finite reconstruction from {sae.cfg}"
    assert codes.indices.shape[:-1] == (5,)


@pytest.mark.parametrize(("fmt", "family"), CASES, ids=[f"{fmt}-{fam}" for fmt, fam in CASES])
@FUZZ
@given(data=st.data())
def test_damaged_sae_is_loaded_or_refused_cleanly(fmt: str, family: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, marker = damaged_sae(data, fmt, family, root)
        explicit = data.draw(st.booleans(), label="explicit format")
        assert_loads_or_fails_cleanly(path, fmt if explicit else None, root)
        assert not marker.exists(), "a pickle ran code while loading"


@settings(FUZZ, max_examples=CLI_EXAMPLES)
@given(data=st.data(), case=st.sampled_from(CASES))
def test_inspect_reports_damage_in_one_line(data: st.DataObject, case: tuple[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, marker = damaged_sae(data, *case, root)
        out, err = io.StringIO(), io.StringIO()
        with hard_limit(HANG_SECONDS), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["sae", "inspect", str(path)])
        stderr = err.getvalue()
        assert code in (0, 2), f"exit {code}: {stderr}"
        assert "Traceback" not in stderr + out.getvalue()
        if code == 2:
            assert stderr.startswith("darkmatter: error: ") and stderr.count("\n") == 1, stderr
        else:
            assert "d_sae:" in out.getvalue()
        assert not marker.exists(), "a pickle ran code while loading"


# --------------------------------------------------------------------------- an exhaustive sweep


def sweep_targets(fmt: str) -> list[tuple[str, tuple[Any, ...]]]:
    """``(file, key path)`` of every config field and plain checkpoint entry of ``fmt``'s first variant."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(VARIANTS[fmt][0], root)
        files = sorted(p for p in root.rglob("*") if p.suffix in (".json", ".pt"))
        read = {".json": lambda f: json.loads(f.read_text()), ".pt": _load_tensors}
        return [(f.relative_to(root).as_posix(), p) for f in files for p in _paths(read[f.suffix](f))]


@pytest.mark.parametrize("fmt", [fmt for fmt in sorted(VARIANTS) if SUFFIXES[fmt] & {".json", ".pt"}])
def test_every_field_with_every_kind_of_wrong_value(fmt: str) -> None:
    """Each config field (and plain checkpoint entry) set to each of ``BAD_VALUES``, or deleted."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path) in enumerate(sweep_targets(fmt)):
            values = [*BAD_VALUES, *(ODD_TENSORS if name.endswith(".pt") else ())]
            for j, edit in enumerate([("drop_at", path), *(("at", path, v) for v in values)]):
                root = Path(tmp) / f"{i}.{j}"
                sae = build(VARIANTS[fmt][0], root)
                mutate(root / name, edit, root / "pwned")
                try:
                    assert_loads_or_fails_cleanly(sae, None, root)
                except Exception as err:  # collect every problem, then report them together
                    shown = f"= {edit[2]!r}" if edit[0] == "at" else "deleted"
                    problems.append(f"{name} {'.'.join(map(str, path))} {shown}: {type(err).__name__}: {err}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
