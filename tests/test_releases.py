"""SAELens release ids: the bundled catalogue, sae-lens's read as data, local copies, config and CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from darkmatter.cli import main
from darkmatter.config import resolve_config
from darkmatter.errors import ConfigError, SAEFormatError
from darkmatter.sae import load_sae, releases
from darkmatter.sae.cli import app
from darkmatter.study.family_saes import load_external_one
from synthetic import synthetic_store

from sae_helpers import D_IN, inputs, write_gemma_scope

CANONICAL = "gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"
REPO = "google/gemma-scope-2b-pt-res"
FOLDER = "layer_12/width_16k/average_l0_82"
SITE = "blocks.12.hook_resid_post"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    return cache


def cache_gemma_scope(cache: Path, repo: str = REPO, folder: str = FOLDER) -> Path:
    """A Gemma Scope SAE as a hub download leaves it: ``models--owner--name/snapshots/<rev>/<folder>``."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    target = repo_dir / "snapshots" / "abc123" / folder
    write_gemma_scope(target / "params.npz", d_sae=16384)  # width_16k: the loader checks the width
    return target


# --------------------------------------------------------------------------- the catalogue


def test_canonical_ids_are_aliases_of_a_folder_of_the_plain_release() -> None:
    named = releases.resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert (named.repo_id, named.folder, named.format) == (REPO, FOLDER, "gemma_scope")
    plain = releases.resolve("gemma-scope-2b-pt-res", FOLDER)
    assert (plain.repo_id, plain.folder) == (REPO, FOLDER)
    assert named.hub_spec == f"{REPO}:{FOLDER}" and named.name == CANONICAL


@pytest.mark.parametrize(
    ("release", "sae_id", "repo", "folder"),
    [
        ("gemma-scope-2b-pt-mlp", "layer_12/width_16k/average_l0_44", "google/gemma-scope-2b-pt-mlp", None),
        ("gemma-scope-9b-pt-res", "layer_20/width_16k/average_l0_68", "google/gemma-scope-9b-pt-res", None),
        ("gemma-scope-9b-pt-mlp", "layer_20/width_16k/average_l0_41", "google/gemma-scope-9b-pt-mlp", None),
        ("llama_scope_lxr_8x", "l15r_8x", "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x"),
        ("llama_scope_lxa_8x", "l15a_8x", "fnlp/Llama3_1-8B-Base-LXA-8x", "Llama3_1-8B-Base-L15A-8x"),
    ],
)
def test_direct_ids_name_the_folders_the_presets_use(
    release: str, sae_id: str, repo: str, folder: str | None
) -> None:
    named = releases.resolve(release, sae_id)
    assert (named.repo_id, named.folder) == (repo, folder or sae_id)


def test_unknown_ids_and_releases_list_the_nearest() -> None:
    with pytest.raises(
        ConfigError, match=r"no sae_id 'layer_12/width_16k/canonicl'.*layer_12/width_16k/canonical"
    ):
        releases.resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonicl")
    with pytest.raises(
        ConfigError, match=r"Unknown SAELens release 'gemma-scope-2b-pt-rs'.*gemma-scope-2b-pt-res"
    ):
        releases.resolve("gemma-scope-2b-pt-rs", "x")


def test_a_path_is_split_at_the_first_slash_and_only_known_releases_are_names() -> None:
    named = releases.parse(CANONICAL)
    assert named is not None and named.sae_id == "layer_12/width_16k/canonical"
    assert releases.parse("google/gemma-scope-2b-pt-res:layer_12") is None  # a hub path
    assert releases.parse("gemma-scope-2b-pt-res-canonical") is None  # no sae_id


def test_sae_lens_catalogue_is_read_as_data_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "sae_lens"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('sae_lens must not be imported')\n")
    (package / "pretrained_saes.yaml").write_text(
        "tiny-release:\n"
        "  repo_id: someone/tiny-saes\n"
        "  model: tiny-model\n"
        "  conversion_func: sparsify\n"
        "  saes:\n"
        "  - id: blocks.3.hook_resid_post\n"
        "    path: layers.3\n"
        "gemma-scope-2b-pt-res:\n"  # a newer sae-lens may list ids the bundle lacks
        "  repo_id: google/gemma-scope-2b-pt-res\n"
        "  model: gemma-2-2b\n"
        "  conversion_func: gemma_2\n"
        "  saes:\n"
        "  - id: layer_99/width_16k/average_l0_7\n"
        "    path: layer_99/width_16k/average_l0_7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert releases.saelens_catalogue_path() == package / "pretrained_saes.yaml"
    named = releases.resolve("tiny-release", "blocks.3.hook_resid_post")
    assert (named.repo_id, named.folder, named.format, named.model) == (
        "someone/tiny-saes",
        "layers.3",
        "sparsify",
        "tiny-model",
    )
    newer = releases.resolve("gemma-scope-2b-pt-res", "layer_99/width_16k/average_l0_7")
    assert newer.folder == "layer_99/width_16k/average_l0_7"
    assert releases.resolve("gemma-scope-2b-pt-res", FOLDER).folder == FOLDER  # bundled ids still there
    assert "tiny-release" in releases.release_names()
    assert "sae_lens" not in sys.modules


# --------------------------------------------------------------------------- local copies and loading


def test_release_and_hub_paths_load_from_the_hub_cache_offline(hub: Path) -> None:
    target = cache_gemma_scope(hub)
    via_release = load_sae(CANONICAL)
    via_hub = load_sae(f"{REPO}:{FOLDER}")
    direct = load_sae(target)
    x = inputs(16, D_IN)
    assert torch.equal(via_release(x), direct(x)) and torch.equal(via_hub(x), direct(x))
    assert via_release.cfg.hook_site == SITE and via_release.cfg.model_name == "google/gemma-2-2b"
    assert via_release.cfg.metadata["release"] == "gemma-scope-2b-pt-res-canonical"
    assert via_release.cfg.metadata["sae_id"] == "layer_12/width_16k/canonical"


def test_without_a_local_copy_offline_the_error_names_repo_folder_and_remedy(hub: Path) -> None:
    with pytest.raises(SAEFormatError, match=rf"folder '{FOLDER}' of hub repo '{REPO}'.*online=True"):
        load_sae(CANONICAL)


def _external(**fields: str) -> str:
    return "family.external=" + json.dumps([{"name": "g", "site": SITE, **fields}])


def test_config_names_an_sae_by_release_and_loads_the_cached_copy(tmp_path: Path, hub: Path) -> None:
    target = cache_gemma_scope(hub)
    release, sae_id = CANONICAL.split("/", 1)
    cfg = resolve_config("tiny", overrides=[_external(release=release, sae_id=sae_id)])
    (ext,) = cfg.family.external
    assert ext.path is None and Path(ext.location) == target
    assert cfg.missing_locally() == []
    again = type(cfg).model_validate(cfg.model_dump())  # a dumped config validates again
    assert again.family.external[0].location == ext.location
    dumped = cfg.section("family")["external"][0]
    assert "path" not in dumped and dumped["release"] == release  # the local copy is not in the hash
    by_path = resolve_config("tiny", overrides=[_external(path=str(target))]).section("family")["external"][0]
    assert "release" not in by_path and "sae_id" not in by_path  # path-form entries hash as before

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        return {SITE: torch.randn(n_ctx, ctx_len, D_IN, generator=gen)}

    store = synthetic_store(tmp_path / "store", make, n_contexts=4, ctx_len=8)
    sae = load_external_one(cfg, ext, store, device="cpu")
    assert sae.cfg.source_format == "gemma_scope" and sae.cfg.metadata["release"] == ext.release
    x = inputs(8, D_IN)
    assert torch.equal(sae(x), load_sae(target)(x))


def test_external_root_and_paths_localise_a_release(tmp_path: Path, hub: Path) -> None:
    release = _external(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_12/width_16k/canonical")
    rooted = resolve_config("tiny", overrides=[release, f"family.external_root={tmp_path / 'root'}"])
    assert rooted.family.external[0].location == str(tmp_path / "root" / "gemma-scope-2b-pt-res" / FOLDER)
    assert any("family.external" in m for m in rooted.missing_locally())  # not there: listed as missing
    pinned = resolve_config("tiny", overrides=[release, f"family.external_paths.g={tmp_path / 'mine'}"])
    assert pinned.family.external[0].location == str(tmp_path / "mine")
    offline = resolve_config("tiny", overrides=[release]).family.external[0]
    assert offline.location == f"{REPO}:{FOLDER}"  # no copy anywhere: the hub path to download


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": "/x", "release": "gemma-scope-2b-pt-res", "sae_id": FOLDER}, "both path and release"),
        ({"release": "gemma-scope-2b-pt-res"}, "needs path, or release and sae_id"),
        ({"sae_id": FOLDER}, "needs path, or release and sae_id"),
        ({}, "needs path, or release and sae_id"),
        ({"release": "gemma-scope-2b-pt-res", "sae_id": "layer_12/width_16k/average_l0_8"}, "Nearest ids"),
        ({"release": "gemma-scope-2b-pt", "sae_id": FOLDER}, "Unknown SAELens release"),
    ],
)
def test_one_of_the_two_forms_or_a_clear_config_error(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"Invalid configuration: family\.external.*{message}"):
        resolve_config("tiny", overrides=[_external(**fields)])


# --------------------------------------------------------------------------- the command line


def test_cli_inspect_resolves_a_release_offline_without_a_copy(hub: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", CANONICAL])
    assert result.exit_code == 0, result.output
    assert f"repo:           {REPO}" in result.output and f"folder:         {FOLDER}" in result.output
    assert "local copy:     none" in result.output
    data = json.loads(CliRunner().invoke(app, ["inspect", CANONICAL, "--json"]).output)
    assert data["release"]["repo_id"] == REPO and data["release"]["folder"] == FOLDER
    assert data["local_copy"] is None


def test_cli_inspect_and_convert_read_the_cached_copy(tmp_path: Path, hub: Path) -> None:
    target = cache_gemma_scope(hub)
    result = CliRunner().invoke(app, ["inspect", CANONICAL])
    assert result.exit_code == 0, result.output
    assert str(target) in result.output and "gemma_scope" in result.output and SITE in result.output
    result = CliRunner().invoke(app, ["convert", CANONICAL, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == SITE and saved["metadata"]["model_name"] == "google/gemma-2-2b"
    assert saved["metadata"]["darkmatter"]["metadata"]["release"] == "gemma-scope-2b-pt-res-canonical"


def test_a_path_on_disk_keeps_its_meaning(tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "gemma-scope-2b-pt-res-canonical" / "layer_3"
    write_gemma_scope(local / "params.npz")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect", "gemma-scope-2b-pt-res-canonical/layer_3"])
    assert result.exit_code == 0, result.output
    assert "release:" not in result.output and "blocks.3.hook_resid_post" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["inspect", "gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonicl"], "Nearest ids"),
        (["inspect", "gemma-scope-2b-pt-res-canonicl/layer_12/width_16k/canonical"], "-res-canonical,"),
        (["convert", "gemma-scope-2b-pt-res/" + FOLDER, "out"], "--online"),
    ],
)
def test_cli_errors_exit_non_zero_in_one_line_without_a_traceback(
    hub: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code = main(["sae", *args])
    err = capsys.readouterr().err
    assert code != 0 and expected in err
    assert err.startswith("darkmatter: error:") and "Traceback" not in err and err.count("\n") == 1
