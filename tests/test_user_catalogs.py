"""The user's catalogs: folders named by $PEFREF_CATALOG or --catalog, and folders installed packages name through the
``pefref.catalogs`` entry point group, add techniques, families, shapes and compositions to the bundled catalog."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from pefref.cli.app import NO_CATALOG, app
from pefref.language.catalog import _cached, catalog_root, default_catalog
from pefref.language.sources import ENTRY_POINT_GROUP, catalog_sources

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("PEFREF_CATALOG", raising=False)
    _cached.cache_clear()
    yield
    _cached.cache_clear()


def _user_catalog(root: Path, tid: str = "user_lora", family: str = "user_llama", shape: str = "user-tiny") -> Path:
    """A catalog folder with one technique (LoRA under another id), one family, one shape and one composition."""
    src = catalog_root()
    (root / "techniques").mkdir(parents=True)
    text = (src / "techniques" / "lora.yaml").read_text(encoding="utf-8")
    (root / "techniques" / f"{tid}.yaml").write_text(text.replace("\nid: lora\n", f"\nid: {tid}\n", 1), encoding="utf-8")
    (root / "families").mkdir()
    text = (src / "families" / "llama.yaml").read_text(encoding="utf-8")
    (root / "families" / f"{family}.yaml").write_text(text.replace("\nfamily: llama\n", f"\nfamily: {family}\n", 1), encoding="utf-8")
    (root / "models.yaml").write_text(
        f"shapes:\n  - name: {shape}\n    family: {family}\n    description: a user's tiny Llama\n"
        "    config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: false}\n", encoding="utf-8")
    (root / "compositions").mkdir()
    (root / "compositions" / f"{tid}_ia3.yaml").write_text(
        f"id: {tid}_ia3\nname: A user's LoRA with (IA)3\nsummary: the user's LoRA and the bundled (IA)3 side by side.\n"
        f"techniques:\n  - {{name: lora, technique: {tid}}}\n  - {{name: ia3, technique: ia3}}\n", encoding="utf-8")
    return root


def _listed(*args: str) -> list[str]:
    result = runner.invoke(app, ["list", "--json", *args])
    assert result.exit_code == 0, result.output
    return [r["id"] for r in json.loads(result.output)]


def test_a_catalog_named_by_the_flag_or_the_environment_joins_the_bundled_one(tmp_path, monkeypatch) -> None:
    user = _user_catalog(tmp_path / "mine")
    bundled = set(_listed())
    assert "user_lora" not in bundled
    assert set(_listed("--catalog", str(user))) == bundled | {"user_lora"}
    assert set(_listed()) == bundled  # the flag lasts one command
    monkeypatch.setenv("PEFREF_CATALOG", f"{tmp_path / 'missing-but-empty-entries-are-skipped'}{':' if sys.platform != 'win32' else ';'}")
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 1 and "missing-but-empty-entries-are-skipped" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("PEFREF_CATALOG", str(user))
    assert set(_listed()) == bundled | {"user_lora"}
    cat = default_catalog()
    assert cat.origin("user_lora") == "mine" and cat.origin("lora") is None
    assert "user_llama" in cat.families and "user-tiny" in cat.shapes and "user_lora_ia3" in cat.compositions
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0 and "6 compositions" in result.output, result.output
    result = runner.invoke(app, ["apply", "user_lora", "--model", "user-tiny", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["trainable"] == 1792, result.output


def test_every_command_that_reads_the_catalog_takes_the_flag() -> None:
    group = typer.main.get_command(app)
    for name in sorted(group.commands):  # type: ignore[attr-defined]
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0
        assert ("--catalog" in result.output) == (name not in NO_CATALOG), name


def test_the_site_marks_where_each_entry_comes_from(tmp_path, monkeypatch) -> None:
    from pefref.render.site.build import build_site

    monkeypatch.setenv("PEFREF_CATALOG", str(_user_catalog(tmp_path / "mine")))
    cat = default_catalog()
    small = replace(cat, techniques={k: cat.techniques[k] for k in ("lora", "user_lora")}, compositions={})
    build_site(tmp_path / "site", catalog=small)
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    rows = {r.split('"', 1)[0]: r for r in index.split('<tr id="row-')[1:]}
    assert "from mine" in rows["user_lora"] and "from mine" not in rows["lora"]
    assert "from mine" in (tmp_path / "site" / "techniques" / "user_lora.html").read_text(encoding="utf-8")
    assert "from mine" not in (tmp_path / "site" / "techniques" / "lora.html").read_text(encoding="utf-8")
    assert "mine/techniques/user_lora.yaml" in (tmp_path / "site" / "techniques" / "user_lora.html").read_text(encoding="utf-8")


def _installed_package(where: Path, value: str) -> None:
    """A package ``userpkg`` whose import would fail, with a catalog folder and a dist-info naming it as an entry point."""
    pkg = where / "userpkg"
    _user_catalog(pkg / "data" / "catalog", tid="packaged_lora", family="packaged_llama", shape="packaged-tiny")
    (pkg / "__init__.py").write_text("raise RuntimeError('pefref ran code of a package that contributes a catalog')\n")
    info = where / "userpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nuserpkg = {value}\n")


def test_an_installed_package_contributes_a_catalog_without_running_its_code(tmp_path, monkeypatch) -> None:
    _installed_package(tmp_path, "userpkg:data/catalog")
    monkeypatch.syspath_prepend(str(tmp_path))
    ids = _listed()
    assert "packaged_lora" in ids and "lora" in ids
    assert "userpkg" not in sys.modules
    found, problems = catalog_sources()
    assert not problems and found[-1].name == "userpkg" and found[-1].root == (tmp_path / "userpkg" / "data" / "catalog").resolve()
    assert default_catalog().origin("packaged_lora") == "userpkg"


def test_an_entry_point_naming_a_missing_folder_is_a_located_error(tmp_path, monkeypatch) -> None:
    _installed_package(tmp_path, "userpkg:nowhere")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 1 and "entry point userpkg = 'userpkg:nowhere'" in result.output and "Traceback" not in result.output


def test_an_id_defined_twice_names_both_places(tmp_path) -> None:
    user = _user_catalog(tmp_path / "clash", tid="lora", family="llama", shape="tiny-llama")
    result = runner.invoke(app, ["list", "--catalog", str(user)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    bundled = catalog_root()
    assert f"{user / 'techniques' / 'lora.yaml'}:2:" in out or "clash/techniques/lora.yaml:2:" in out
    assert f"technique id 'lora' is also defined at {bundled / 'techniques' / 'lora.yaml'}:" in out
    assert f"architecture map 'llama' is also defined at {bundled / 'families' / 'llama.yaml'}:" in out
    assert f"shape 'tiny-llama' is also defined at {bundled / 'models.yaml'}:" in out
    twice = _user_catalog(tmp_path / "again", tid="lora_ia3_stack_probe")
    (twice / "compositions" / "lora_ia3_stack.yaml").write_text((bundled / "compositions" / "lora_ia3_stack.yaml").read_text())
    result = runner.invoke(app, ["validate", "--catalog", str(twice)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and f"composition id 'lora_ia3_stack' is also defined at {bundled / 'compositions' / 'lora_ia3_stack.yaml'}:" in out, out


def test_a_user_catalog_cannot_replace_the_reference_architecture(tmp_path) -> None:
    user = _user_catalog(tmp_path / "mine")
    (user / "reference").mkdir()
    result = runner.invoke(app, ["list", "--catalog", str(user)])
    assert result.exit_code == 1 and "reference architecture is pefref's own" in " ".join(result.output.split())
