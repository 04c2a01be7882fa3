"""Every file pefref writes is written atomically; `schema --out` deletes only what it generated.

The tests that exercise behaviour patch the standard library (``os.replace``, ``tempfile.mkstemp``,
``os.access``) rather than pefref's own modules, so that they run against any version of pefref."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.errors import PefrefError
from pefref.runtime.api import apply

from .conftest import tiny_model

runner = CliRunner()


def _fail_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)


def test_atomic_write_replaces_whole_file_and_keeps_mode(tmp_path: Path) -> None:
    from pefref.language.atomic import atomic_write_bytes, atomic_write_text

    p = tmp_path / "f.txt"
    atomic_write_text(p, "one\n")
    assert p.read_text() == "one\n"
    os.chmod(p, 0o640)
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert p.stat().st_mode & 0o777 == 0o640
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_failure_leaves_target_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pefref.language.atomic import atomic_open, atomic_write_text

    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(p) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert p.read_text() == "old"
    _fail_replace(monkeypatch)
    with pytest.raises(PefrefError, match="No space left"):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_refuses_folder_target(tmp_path: Path) -> None:
    from pefref.language.atomic import atomic_write_text

    with pytest.raises(PefrefError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PefrefError, match="not a folder"):
        atomic_write_text(tmp_path / "file" / "child", "x")


def test_save_is_atomic_whatever_safetensors_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch as st

    a = apply(tiny_model("llama"), "lora", r=4)
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"previous")

    def no_save_file(*args: object, **kwargs: object) -> None:
        raise AssertionError("save() must not let safetensors write the file")

    monkeypatch.setattr(st, "save_file", no_save_file)
    with monkeypatch.context() as m:
        _fail_replace(m)
        with pytest.raises(PefrefError, match="cannot write"):
            a.save(target)
    assert target.read_bytes() == b"previous"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]
    a.save(target)
    loaded = st.load_file(str(target))
    assert set(loaded) == set(a.state_dict())
    for k, t in a.state_dict().items():
        assert torch.equal(loaded[k], t)


def test_schema_out_deletes_only_generated_files(tmp_path: Path) -> None:
    assert runner.invoke(app, ["schema", "--out", str(tmp_path)]).exit_code == 0
    mark = json.loads(sorted(tmp_path.glob("*.schema.json"))[0].read_text()).get("$comment", "")  # what generated files carry
    mine = tmp_path / "mine.schema.json"
    mine.write_text('{"title": "a user schema"}\n')
    stale = tmp_path / "old.schema.json"
    stale.write_text(json.dumps({"$comment": mark}) + "\n")
    assert runner.invoke(app, ["schema", "--check", "--out", str(tmp_path)]).exit_code == 1
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert mine.exists() and not stale.exists()
    assert runner.invoke(app, ["schema", "--check", "--out", str(tmp_path)]).exit_code == 0


def test_schema_out_to_a_file_is_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for target in (f, f / "sub"):
        result = runner.invoke(app, ["schema", "--out", str(target)])
        assert result.exit_code == 1
        assert "not a folder" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert f.read_text() == "x"


def test_schema_out_to_read_only_folder_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the OS refuse as it would for a user
        real = tempfile.mkstemp

        def refuse(*args: object, dir: str | None = None, **kw: object):
            if dir is not None and Path(dir) == ro:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: real_access(p, mode, **kw) and not (Path(p) == ro and mode & os.W_OK))
    try:
        result = runner.invoke(app, ["schema", "--out", str(ro)])
    finally:
        os.chmod(ro, 0o755)
    assert result.exit_code == 1, result.output
    assert "not writable" in result.output or "Permission denied" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(ro.iterdir()) == []


def test_saving_an_adapter_on_the_meta_device_is_a_pefref_error(tmp_path: Path) -> None:
    """An adapter applied to a meta-device model has no values: save() says so, writes nothing, and torch's
    'Cannot copy out of meta tensor' never reaches the user."""
    import transformers

    import pefref
    from pefref.language.errors import PefrefError

    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    adapter = pefref.apply(model, "lora", r=2)
    out = tmp_path / "a.safetensors"
    with pytest.raises(PefrefError, match="meta device"):
        adapter.save(out)
    assert not out.exists()
