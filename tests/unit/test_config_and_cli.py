from __future__ import annotations

import pytest

from trainguard.cli import kopf_arguments, main
from trainguard.domain.config import ConfigError, config_from_env


def test_defaults():
    config = config_from_env({})
    assert config.settings.limits.max_batch_size == 4 and config.settings.limits.num_workers == 0
    assert config.settings.limits.max_resolution == 128 and config.webhook is False
    assert config.namespaces == () and config.log_format == 'text' and config.sweep_seconds == 5
    assert config.webhook_service is None
    assert config.peering_priority is None and config.peering_lifetime == 60  # None: random per process
    assert config_from_env({'TRAINGUARD_PEERING_PRIORITY': '7'}).peering_priority == 7
    assert config_from_env({'TRAINGUARD_WEBHOOK_SERVICE': 'ops/tg-webhook'}).webhook_service == ('ops', 'tg-webhook')


@pytest.mark.parametrize(('env', 'name'), [
    ({'TRAINGUARD_CPU_MAX_BATCH_SIZE': 'many'}, 'TRAINGUARD_CPU_MAX_BATCH_SIZE'),
    ({'TRAINGUARD_CPU_MAX_RESOLUTION': '8'}, 'TRAINGUARD_CPU_MAX_RESOLUTION'),
    ({'TRAINGUARD_WEBHOOK': 'maybe'}, 'TRAINGUARD_WEBHOOK'),
    ({'TRAINGUARD_LOG_FORMAT': 'xml'}, 'TRAINGUARD_LOG_FORMAT'),
    ({'TRAINGUARD_IMAGE_PULL_POLICY': 'sometimes'}, 'TRAINGUARD_IMAGE_PULL_POLICY'),
    ({'TRAINGUARD_WEBHOOK_SERVICE': 'trainguard-webhook'}, 'TRAINGUARD_WEBHOOK_SERVICE'),
    ({'TRAINGUARD_PEERING_LIFETIME_SECONDS': '1'}, 'TRAINGUARD_PEERING_LIFETIME_SECONDS'),
], ids=lambda value: str(value)[:30])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        config_from_env(env)


def test_kopf_arguments_follow_the_environment():
    assert kopf_arguments(['--verbose'], {}) == ['run', '-m', 'trainguard.handlers', '--all-namespaces', '--verbose']
    assert kopf_arguments([], {'TRAINGUARD_NAMESPACES': 'a, b', 'TRAINGUARD_LOG_FORMAT': 'json'}) == [
        'run', '-m', 'trainguard.handlers', '--namespace=a', '--namespace=b', '--log-format=json']


def test_cli_refuses_unknown_commands_and_bad_config(monkeypatch, capsys):
    assert main(['dance']) == 2
    monkeypatch.setenv('TRAINGUARD_CPU_MAX_BATCH_SIZE', 'x')
    assert main(['run']) == 2
    assert 'TRAINGUARD_CPU_MAX_BATCH_SIZE' in capsys.readouterr().err
