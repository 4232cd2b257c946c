"""The process's settings (router.settings): the MOE_* variables, typed, in one source order, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.cli import main
from router.encoders import cache_root
from router.settings import Settings, SettingsError

_VARS = ("MOE_CACHE_DIR", "MOE_DATA_DIR", "MOE_FAISS_THREADS", "MOE_API_KEY")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_then_the_environment_then_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = Settings.load()
    assert (plain.cache_dir, plain.data_dir, plain.faiss_threads, plain.api_key) == (
        Path.home() / ".cache" / "moe-router", None, 1, None)
    assert plain.model_fields_set == set()
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MOE_FAISS_THREADS", "2")
    monkeypatch.setenv("MOE_API_KEY", "sk-settings-test")
    env = Settings.load()
    assert (env.cache_dir, env.data_dir, env.faiss_threads) == (tmp_path / "cache", tmp_path / "data", 2)
    assert env.api_key is not None and env.api_key.get_secret_value() == "sk-settings-test"
    assert "sk-settings-test" not in repr(env) and "sk-settings-test" not in str(env)
    assert Settings.load(faiss_threads=3).faiss_threads == 3  # an argument wins over the environment
    assert cache_root() == tmp_path / "cache" and cache_root(Settings.load(cache_dir=tmp_path)) == tmp_path


def test_an_empty_variable_counts_as_unset_and_no_dotenv_is_read(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MOE_FAISS_THREADS=7\n")
    loaded = Settings.load()
    assert loaded.cache_dir == Path.home() / ".cache" / "moe-router" and loaded.faiss_threads == 1


@pytest.mark.parametrize(("name", "raw", "why"), [
    ("MOE_FAISS_THREADS", "two", "input should be a valid integer"),
    ("MOE_FAISS_THREADS", "0", "input should be greater than or equal to 1"),
])
def test_a_bad_value_is_named_with_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, raw: str,
                                                why: str) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingsError, match=rf"^{name}='{raw}': {why}"):
        Settings.load()


def test_moe_stops_at_start_on_a_bad_variable(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_FAISS_THREADS", "lots")
    assert main(["config", "check", "configs/demo.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MOE_FAISS_THREADS='lots': input should be a valid integer") and err[-1] == "\n"
    assert err.count("\n") == 1  # one line, no traceback


def test_a_path_setting_expands_the_home_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell expands ``~`` only unquoted and at a word's start; compose files and manifests never do."""
    monkeypatch.setenv("MOE_CACHE_DIR", "~/moe-cache")
    monkeypatch.setenv("MOE_DATA_DIR", "~/moe-data")
    loaded = Settings.load()
    assert (loaded.cache_dir, loaded.data_dir) == (Path.home() / "moe-cache", Path.home() / "moe-data")
    assert Settings.load(cache_dir="~/elsewhere").cache_dir == Path.home() / "elsewhere"


@pytest.mark.parametrize("blank", [" ", "\t", "  \n"])
def test_a_variable_of_blanks_only_counts_as_unset(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    for name in _VARS:
        monkeypatch.setenv(name, blank)
    loaded = Settings.load()
    assert (loaded.cache_dir, loaded.data_dir, loaded.faiss_threads, loaded.api_key) == (
        Path.home() / ".cache" / "moe-router", None, 1, None)
