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
    assert settings.inference.model == "from-env"
    assert settings.serving.max_new_tokens == 7
    assert settings.config == config


def test_initialization_options_accept_camel_case_and_win():
    settings = Settings().with_overrides({"maxNewTokens": 5, "telemetry": "false"}, source="x")
    assert settings.serving.max_new_tokens == 5 and settings.store.telemetry is False


def test_unknown_setting_is_named_in_the_error():
    with pytest.raises(SettingsError, match="unknown setting 'modle'"):
        Settings().with_overrides({"modle": "x"}, source="initializationOptions")


def test_bad_values_name_the_setting():
    with pytest.raises(SettingsError, match="max_new_tokens='many'"):
        load_settings({"GHOSTLOOP_MAX_NEW_TOKENS": "many"})
    with pytest.raises(SettingsError, match="backend='tensorflow'"):
        load_settings({"GHOSTLOOP_BACKEND": "tensorflow"})
    with pytest.raises(SettingsError, match="deadline_ms=0"):
        Settings.of(deadline_ms=0)
    with pytest.raises(SettingsError, match=r"context_loss_weight=-1.0 must be in \[0, 100\]"):
        load_settings({"GHOSTLOOP_CONTEXT_LOSS_WEIGHT": "-1"})
    settings = load_settings({"GHOSTLOOP_CONTEXT_LOSS_WEIGHT": "0.5"})
    assert settings.training.sft.context_loss_weight == 0.5


def test_missing_explicit_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"GHOSTLOOP_CONFIG": str(tmp_path / "nope.toml")})


def test_corrupt_config_file_is_an_error(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("model = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({"GHOSTLOOP_CONFIG": str(config)})


def test_threads_default_to_physical_cores():
    assert Settings().inference.torch_threads == physical_cores() >= 1
    assert Settings.of(threads=3).inference.torch_threads == 3


def test_the_settings_page_is_generated_from_the_settings_themselves():
    page = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert page.read_text(encoding="utf-8") == settings_markdown(), (
        "docs/settings.md is out of date: python -m ghostloop.settings > docs/settings.md"
    )


def test_names_stay_flat_while_the_code_reads_groups(tmp_path: Path):
    """Environment names and TOML keys are what they always were; a group's own name for
    a setting (canary.share) is never one a user has to learn."""
    config = tmp_path / "config.toml"
    config.write_text("canary_share = 0.25\ntrain_batch_size = 2\n")
    settings = load_settings(
        {
            "GHOSTLOOP_CONFIG": str(config),
            "GHOSTLOOP_DPO_BETA": "0.3",
            "GHOSTLOOP_RRHF_LEARNING_RATE": "2e-5",
            "GHOSTLOOP_TCP_AUTH": "required",
        }
    )
    assert settings.canary.share == 0.25 and settings.training.batch_size == 2
    assert settings.training.dpo.beta == 0.3 and settings.team.tcp_auth == "required"
    assert settings.training.config_for("rrhf").learning_rate == 2e-5
    assert settings.training.config_for("sft").learning_rate == 5e-4  # rrhf's is its own
    assert settings.value("canary_share") == 0.25 and settings.value("dpo_beta") == 0.3
    with pytest.raises(SettingsError, match="unknown setting 'share'"):
        Settings.of(share=0.5)


def test_a_key_two_methods_share_sets_both():
    settings = load_settings({"GHOSTLOOP_LEARNING_RATE": "1e-3", "GHOSTLOOP_NLL_WEIGHT": "2"})
    training = settings.training
    assert training.sft.learning_rate == training.dpo.learning_rate == 1e-3
    assert training.rrhf.learning_rate == 1e-4
    assert training.dpo.nll_weight == training.rrhf.nll_weight == 2.0


def test_each_group_checks_itself_and_a_bad_value_changes_nothing():
    from ghostloop.settings import CanarySettings, DpoConfig, ServingSettings, TrainingSettings

    with pytest.raises(SettingsError, match="canary_max_completions=10 must be at least"):
        CanarySettings(min_completions=20, max_completions=10)
    with pytest.raises(SettingsError, match=r"suffix_share=1.5 must be in \[0, 1\)"):
        ServingSettings(suffix_share=1.5)
    with pytest.raises(SettingsError, match="train_method='ppo' is not one of"):
        TrainingSettings(method="ppo")
    assert DpoConfig().beta == 0.1
    settings = Settings.of(max_new_tokens=9)
    with pytest.raises(SettingsError, match="max_new_tokens=0 must be at least 1"):
        settings.with_overrides({"maxNewTokens": 0, "device": "cpu"}, source="x")
    assert settings.serving.max_new_tokens == 9 and settings.inference.device == "auto"
