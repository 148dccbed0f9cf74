"""The trainer's identity: chosen once at start-up, and what a new attempt creates for it."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from trainguard.domain import identity
from trainguard.domain import reconcile as machine
from trainguard.domain.builders import NAMESPACE_IDENTITY, RUN_IDENTITY, PodSettings
from trainguard.domain.config import ConfigError, config_from_env
from trainguard.domain.gang import PodAbsence

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(('choice', 'installed', 'chosen', 'warns'), [
    ('auto', True, NAMESPACE_IDENTITY, False),
    ('auto', False, RUN_IDENTITY, False),
    ('namespace', True, NAMESPACE_IDENTITY, False),
    ('namespace', False, NAMESPACE_IDENTITY, True),   # as configured, but said loudly: nothing narrows it
    ('run', True, RUN_IDENTITY, False),
    ('run', False, RUN_IDENTITY, False),
], ids=['auto-policy', 'auto-no-policy', 'namespace', 'namespace-without-policy', 'run-with-policy', 'run'])
def test_auto_shares_an_identity_only_where_the_policy_narrows_it(choice, installed, chosen, warns):
    got, line, warning = identity.resolve(choice, installed)
    assert (got, warning) == (chosen, warns)
    assert 'trainguard-trainer-own-run' in line or choice == 'run'


@pytest.mark.parametrize(('raw', 'expected'), [('', 'auto'), ('Namespace', 'namespace'), ('run', 'run')])
def test_the_choice_comes_from_the_environment(raw, expected):
    assert config_from_env({'TRAINGUARD_TRAINER_IDENTITY': raw}).trainer_identity == expected


def test_a_misspelled_choice_stops_the_operator_naming_the_variable():
    with pytest.raises(ConfigError, match='TRAINGUARD_TRAINER_IDENTITY must be one of auto, namespace, run'):
        config_from_env({'TRAINGUARD_TRAINER_IDENTITY': 'shared'})


def settings(chosen: str) -> machine.Settings:
    return dataclasses.replace(machine.Settings(), pod=PodSettings(image='x', trainer_identity=chosen))


def run(num_nodes: int = 1) -> dict:
    return {'metadata': {'name': 'r', 'namespace': 'ml', 'uid': 'u', 'generation': 1},
            'spec': {'device': 'cpu', 'numNodes': num_nodes}}


@pytest.mark.parametrize(('chosen', 'num_nodes', 'expected'), [
    (RUN_IDENTITY, 1, [('ServiceAccount', 'r-trainer'), ('Pod', 'r-1'), ('Role', 'r-trainer'),
                       ('RoleBinding', 'r-trainer')]),
    (NAMESPACE_IDENTITY, 1, [('ServiceAccount', 'trainguard-trainer'), ('Pod', 'r-1'),
                             ('Role', 'trainguard-trainer'), ('RoleBinding', 'trainguard-trainer')]),
    (NAMESPACE_IDENTITY, 2, [('ServiceAccount', 'trainguard-trainer'), ('Service', 'r'), ('Pod', 'r-1-0'),
                             ('Pod', 'r-1-1'), ('Role', 'trainguard-trainer'), ('RoleBinding', 'trainguard-trainer')]),
], ids=['per-run', 'per-namespace', 'per-namespace-gang'])
def test_only_what_admission_needs_comes_before_the_pods(chosen, num_nodes, expected):
    plan = machine.reconcile(run(num_nodes), PodAbsence.UNKNOWN, NOW, settings(chosen))
    assert [(child['kind'], child['metadata']['name']) for child in plan.children] == expected
    pods = [child for child in plan.children if child['kind'] == 'Pod']
    account = expected[0][1]
    assert {pod['spec']['serviceAccountName'] for pod in pods} == {account}
    # The policy admits a beat from the pod named in status.podName: rank 0's, written with the attempt.
    assert plan.status_patch['podName'] == pods[0]['metadata']['name']
