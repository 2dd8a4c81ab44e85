"""Settings: read from FLOW_NEXUS_* once, documented by a table generated from the model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flow_nexus_server import cli
from flow_nexus_server.config import Limits, Settings, env_name, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "settings.md"


@pytest.fixture(autouse=True)
def no_settings_in_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FLOW_NEXUS_"):
            monkeypatch.delenv(name)


def test_the_documentation_table_is_current():
    assert DOC.read_text(encoding="utf-8") == settings_markdown(), \
        "docs/settings.md is stale: flow-nexus-server settings --markdown > docs/settings.md"


def test_cli_prints_the_table_and_the_values_in_effect(tmp_path, capsys, monkeypatch):
    assert cli.main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == settings_markdown()
    monkeypatch.setenv("FLOW_NEXUS_TOKEN", "s3cret-value")
    monkeypatch.setenv("FLOW_NEXUS_MAX_INLINE_BYTES", "1234")
    assert cli.main(["--home", str(tmp_path), "settings"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"FLOW_NEXUS_HOME={tmp_path.resolve()}" in out and "FLOW_NEXUS_MAX_INLINE_BYTES=1234" in out
    assert "FLOW_NEXUS_TOKEN=set" in out and "s3cret" not in "\n".join(out)


def test_every_setting_has_a_type_a_default_and_a_description():
    for model in (Settings, Limits):
        for name, info in model.model_fields.items():
            assert info.annotation is not None and info.description, name
            assert not info.is_required(), name


def test_every_variable_the_code_names_is_documented():
    named = set()
    for tree in ("flow_nexus_server", "workers"):
        for path in (ROOT / tree).rglob("*.py"):
            named |= set(re.findall(r"FLOW_NEXUS_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    documented = set(re.findall(r"^\| `(FLOW_NEXUS_[A-Z0-9_]+)`", settings_markdown(), re.MULTILINE))
    assert named - {"FLOW_NEXUS_"} <= documented, sorted(named - documented)


def test_no_server_module_reads_a_setting_from_the_environment_itself():
    reads = re.compile(r"(environ\.get|getenv)\(\s*(\"FLOW_NEXUS_|[A-Z_]+_ENV\b)")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "flow_nexus_server").rglob("*.py")
                 if path.name != "config.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if reads.search(line)]
    assert offenders == []


def test_values_come_from_the_environment_once(tmp_path, monkeypatch):
    roots = [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("FLOW_NEXUS_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("FLOW_NEXUS_DATA_ROOTS", os.pathsep.join(map(str, roots)))
    monkeypatch.setenv("FLOW_NEXUS_MAX_INLINE_BYTES", "1000")
    monkeypatch.setenv("FLOW_NEXUS_SPAWNER", "plain")
    monkeypatch.setenv("FLOW_NEXUS_RAY_SHIP_WORKERS", "1")
    monkeypatch.setenv("FLOW_NEXUS_TELEMETRY_PORT", "")  # empty: unset
    settings = Settings.from_env()
    assert settings.home == tmp_path / "env-home"
    assert settings.db_url == f"sqlite:///{tmp_path / 'env-home' / 'state.db'}"
    assert settings.allowed_roots == [tmp_path / "env-home", *roots]
    assert (settings.limits.max_inline_dataset_bytes, settings.spawner, settings.ray_ship_workers,
            settings.telemetry_port) == (1000, "plain", True, 0)
    monkeypatch.setenv("FLOW_NEXUS_DATA_ROOTS", str(tmp_path / "later"))
    assert settings.allowed_roots == [tmp_path / "env-home", *roots], "read at start-up, not on every call"

    other = Settings.from_env(tmp_path / "flag-home")  # --home wins over FLOW_NEXUS_HOME
    assert other.home == tmp_path / "flag-home" and other.db_url.endswith("flag-home/state.db")
    monkeypatch.setenv("FLOW_NEXUS_DB_URL", "sqlite:////elsewhere/x.db")
    assert Settings.from_env(tmp_path).db_url == "sqlite:////elsewhere/x.db"


def test_defaults(tmp_path):
    settings = Settings.from_env(tmp_path)
    assert settings.limits == Limits() and settings.limits.max_upload_bytes == 8 << 20
    assert (settings.spawner, settings.docker_image, settings.controller_linger_s, settings.token) == (
        "warm", "flow-nexus-worker:latest", 10.0, None)
    assert settings.allowed_roots == [tmp_path.resolve()]
    assert Settings.from_env(None).home == (Path.home() / ".flow-nexus").resolve()


@pytest.mark.parametrize(("name", "value"), [("FLOW_NEXUS_MAX_EPOCHS", "many"),
                                             ("FLOW_NEXUS_MAX_INLINE_BYTES", "4MB"),
                                             ("FLOW_NEXUS_SPAWNER", "cold")])
def test_a_bad_value_stops_the_start_naming_its_variable(tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"invalid setting: {name}: .*'{value}'"):
        Settings.from_env(tmp_path)


def test_variable_names():
    assert env_name("max_inline_dataset_bytes", Limits.model_fields["max_inline_dataset_bytes"]) == \
        "FLOW_NEXUS_MAX_INLINE_BYTES"
    assert env_name("home", Settings.model_fields["home"]) == "FLOW_NEXUS_HOME"
