from pathlib import Path

import pytest

from ghostloop.settings import (
    Settings,
    SettingsError,
    load_settings,
    physical_cores,
    settings_markdown,
)


def test_environment_overrides_toml_file(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('model = "from-file"\nmax_new_tokens = 7\n')
    settings = load_settings({"GHOSTLOOP_CONFIG": str(config), "GHOSTLOOP_MODEL": "from-env"})
    assert settings.model == "from-env"
    assert settings.max_new_tokens == 7
    assert settings.config == config


def test_initialization_options_accept_camel_case_and_win():
    settings = Settings().with_overrides({"maxNewTokens": 5, "telemetry": "false"}, source="x")
    assert settings.max_new_tokens == 5 and settings.telemetry is False


def test_unknown_setting_is_named_in_the_error():
    with pytest.raises(SettingsError, match="unknown setting 'modle'"):
        Settings().with_overrides({"modle": "x"}, source="initializationOptions")


def test_bad_values_name_the_setting():
    with pytest.raises(SettingsError, match="max_new_tokens='many'"):
        load_settings({"GHOSTLOOP_MAX_NEW_TOKENS": "many"})
    with pytest.raises(SettingsError, match="backend='tensorflow'"):
        load_settings({"GHOSTLOOP_BACKEND": "tensorflow"})
    with pytest.raises(SettingsError, match="deadline_ms=0"):
        Settings(deadline_ms=0)
    with pytest.raises(SettingsError, match=r"context_loss_weight=-1.0 must be in \[0, 100\]"):
        load_settings({"GHOSTLOOP_CONTEXT_LOSS_WEIGHT": "-1"})
    assert load_settings({"GHOSTLOOP_CONTEXT_LOSS_WEIGHT": "0.5"}).context_loss_weight == 0.5


def test_missing_explicit_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"GHOSTLOOP_CONFIG": str(tmp_path / "nope.toml")})


def test_corrupt_config_file_is_an_error(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("model = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({"GHOSTLOOP_CONFIG": str(config)})


def test_threads_default_to_physical_cores():
    assert Settings().torch_threads == physical_cores() >= 1
    assert Settings(threads=3).torch_threads == 3


def test_the_settings_page_is_generated_from_the_settings_themselves():
    page = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert page.read_text(encoding="utf-8") == settings_markdown(), (
        "docs/settings.md is out of date: python -m ghostloop.settings > docs/settings.md"
    )
