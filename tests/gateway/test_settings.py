from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_default_config_is_valid() -> None:
    settings = load_settings(REPO / "configs" / "default.yaml")
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert [m.name for m in settings.models] == ["gemma-3-270m"]
    assert settings.models[0].path is None


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  host: 0.0.0.0\n  port: 8100\nmodels:\n  - name: m\n")
    monkeypatch.setenv("LOCKGATE_SERVER__PORT", "9100")
    settings = load_settings(config)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize(
    ("yaml_text", "names"),
    [
        ("models:\n  - name: m\n    n_ctxx: 5\n", "models.0.n_ctxx"),
        ("models:\n  - name: m\n    max_sequences: 0\n", "models.0.max_sequences"),
        ("server:\n  port: 99999\n", "server.port"),
        ("models:\n  - name: m\n    template: mistral\n", "models.0.template"),
        ("models:\n  - name: a\n    backend: vllm\n", "models.0.base_url"),
        ("models:\n  - name: a\n    backend: ollama\n    base_url: ftp://x\n", "base_url"),
        ("models:\n  - name: a\n    backend: tgi\n", "models.0"),
        ("modelz: []\n", "modelz"),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, yaml_text: str, names: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")) as info:
        load_settings(config)
    assert str(config) in str(info.value)


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGATE_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(None)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


def test_built_in_defaults_match_the_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("LOCKGATE_")]:
        monkeypatch.delenv(name)
    assert load_settings(None) == load_settings(REPO / "configs" / "default.yaml")


def test_remote_entries_and_shared_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-test")
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n"
        "  - {name: chat, backend: vllm, base_url: 'http://gpu:8000', upstream_model: m,"
        " api_key_env: UPSTREAM_KEY, concurrency: 64}\n"
        "  - {name: chat, backend: llamacpp, base_url: 'http://cpu:8080'}\n"
        "  - {name: small, backend: ollama, base_url: 'http://cpu:11434', num_ctx: 8192}\n"
    )
    models = load_settings(config).models
    assert [(m.name, m.backend) for m in models] == [
        ("chat", "vllm"),
        ("chat", "llamacpp"),
        ("small", "ollama"),
    ]


def test_a_missing_api_key_variable_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  - {name: m, backend: openai, base_url: 'http://x', api_key_env: NOPE_KEY}\n"
    )
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        load_settings(config)


@pytest.mark.parametrize("name", ["default.yaml", "cpu-box.yaml", "gpu-box.yaml", "teams.yaml"])
def test_example_configs_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "example")
    assert load_settings(REPO / "configs" / name).models


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("tenants:\n  - {id: 'bad id!'}\n", "tenants.0.id"),
        ("tenants:\n  - {id: a}\n  - {id: a}\n", "tenant ids must be unique: a"),
        ("tenants:\n  - {id: a, limits: {requests_per_minute: 0}}\n", "requests_per_minute"),
        ("tenants:\n  - {id: a, keys: [{id: k, hash: 'md5:abc'}]}\n", "tenants.0.keys.0.hash"),
        ("auth: {admin_key: short}\n", "auth.admin_key"),
        ("redis_url: 'http://:hunter2@host'\n", "redis_url: must start with redis://"),
        ("redis_url: 'redis://:hunter2@h/0?db=2'\n", "redis_url: query parameters"),
    ],
)
def test_tenancy_config_errors_name_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_settings(config)
    assert "hunter2" not in str(caught.value)


def test_indexed_override_changes_one_key_of_a_list_entry(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - {name: a, n_ctx: 512}\n  - {name: b, max_sequences: 2}\n")
    env = {"LOCKGATE_MODELS__0__MAX_SEQUENCES": "4", "LOCKGATE_MODELS__1__N_CTX": "1024"}
    first, second = load_settings(config, env).models
    assert (first.name, first.n_ctx, first.max_sequences) == ("a", 512, 4)
    assert (second.name, second.n_ctx, second.max_sequences) == ("b", 1024, 2)


def test_indexed_override_of_the_built_in_model() -> None:
    (model,) = load_settings(None, {"LOCKGATE_MODELS__0__MAX_SEQUENCES": "4"}).models
    assert (model.name, model.max_sequences, model.max_n) == ("gemma-3-270m", 4, 4)


def test_a_json_value_replaces_a_whole_list_and_other_variables_are_ignored() -> None:
    env = {"LOCKGATE_MODELS": '[{"name": "x", "n_ctx": 256}]', "LOCKGATE_URL": "http://h"}
    (model,) = load_settings(None, env).models
    assert (model.name, model.n_ctx) == ("x", 256)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCKGATE_SERVER__PROT": "1"}, r"server\.prot \(from LOCKGATE_SERVER__PROT\)"),
        ({"LOCKGATE_MODELS__0__N_CTX": "x"}, r"models\.0\.n_ctx \(from LOCKGATE_MODELS__0__N_CTX"),
        ({"LOCKGATE_MODELS__3__NAME": "x"}, r"LOCKGATE_MODELS__3__NAME: models has no entry 3"),
        ({"LOCKGATE_MODELS__NAME": "x"}, r"LOCKGATE_MODELS__NAME: models is a list"),
        ({"LOCKGATE_TENANTS": "[{"}, r"LOCKGATE_TENANTS is not valid JSON"),
    ],
)
def test_an_error_from_the_environment_names_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(REPO / "configs" / "default.yaml", env)
    if "from " in message:
        assert "and the environment" in str(info.value)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 8000\n  host: [unclosed\nmodels: []\n")
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert str(info.value).startswith(f"{bad}:4:")
    assert "<unicode string>" not in str(info.value)


def test_a_misspelled_backend_gets_one_message_listing_every_backend(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - {name: a, backend: vlm, base_url: 'http://x'}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    lines = str(info.value).splitlines()[1:]
    assert lines == [
        "  models.0: backend must be one of: embedded, openai, vllm, llamacpp, ollama, fake"
    ]


def test_an_override_into_an_entry_that_is_not_a_mapping_is_a_config_error(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("models: [gemma]\n")
    with pytest.raises(ConfigError, match=r"LOCKGATE_MODELS__0__N_CTX: models\.0 is not a mapping"):
        load_settings(config, {"LOCKGATE_MODELS__0__N_CTX": "512"})
    with pytest.raises(ConfigError, match="is a list; use an index"):
        load_settings(config, {"LOCKGATE_MODELS__²__N_CTX": "512"})


def test_prefix_cache_modes_and_yamls_bare_off(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    for written, mode in [("off", "off"), ("on", "shared"), ("per_tenant", "per_tenant")]:
        config.write_text(f"models:\n  - {{name: m, prefix_cache: {written}}}\n")
        assert load_settings(config).models[0].prefix_cache == mode  # type: ignore[union-attr]
    config.write_text("models:\n  - {name: m, prefix_cache: sometimes}\n")
    with pytest.raises(ConfigError, match=r"models\.0\.prefix_cache"):
        load_settings(config)
