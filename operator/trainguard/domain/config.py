"""Operator configuration from environment variables (the Helm chart sets them).

Parsing is pure (a mapping in, a Config out) so every variable and its error message is
unit-tested; a bad value stops the operator at start-up naming the variable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from trainguard.domain import identity
from trainguard.domain.builders import PodSettings
from trainguard.domain.policy import CpuLimits
from trainguard.domain.reconcile import Settings

DEFAULT_TRAINER_IMAGE = 'ghcr.io/trainguard/trainer:0.1.0'
DEFAULT_TRAINER_GPU_IMAGE = 'ghcr.io/trainguard/trainer:0.1.0-cuda'


_PULL_POLICIES = {'always': 'Always', 'ifnotpresent': 'IfNotPresent', 'never': 'Never'}


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Config:
    settings: Settings
    namespaces: tuple[str, ...]        # empty: every namespace
    webhook: bool
    webhook_host: str
    webhook_port: int
    webhook_cert_dir: str              # tls.crt, tls.key, ca.crt (cert-manager); empty: self-signed at start-up
    webhook_service: tuple[str, str] | None  # (namespace, name) the API server reaches the webhook through
    log_format: str                    # text | json
    sweep_seconds: float               # how often every run is re-checked for stalls
    metrics_port: int                  # 0: no Prometheus endpoint
    peering_priority: int | None       # kopf peering: highest live priority is active; None: random per process
    peering_lifetime: int              # seconds a silent peer counts as alive (how fast a standby takes over)
    trainer_identity: str = 'auto'     # auto | namespace | run (trainguard.domain.identity)


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, '').strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f'{name} must be an integer, got {raw!r}') from None
    if not low <= value <= high:
        raise ConfigError(f'{name} must be between {low} and {high}, got {value}')
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, '').strip().lower() or default
    if value not in choices:
        raise ConfigError(f'{name} must be one of {", ".join(choices)}, got {value!r}')
    return value


def _service(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    raw = env.get(name, '').strip()
    if not raw:
        return None
    namespace, _, service = raw.partition('/')
    if not namespace or not service or '/' in service:
        raise ConfigError(f'{name} must be NAMESPACE/NAME, got {raw!r}')
    return namespace, service


def webhook_enabled(env: Mapping[str, str]) -> bool:
    return _choice(env, 'TRAINGUARD_WEBHOOK', 'off', ('on', 'off', 'true', 'false')) in ('on', 'true')


def config_from_env(env: Mapping[str, str]) -> Config:
    limits = CpuLimits(
        num_workers=_int(env, 'TRAINGUARD_CPU_NUM_WORKERS', 0, 0, 64),
        max_batch_size=_int(env, 'TRAINGUARD_CPU_MAX_BATCH_SIZE', 4, 1, 4096),
        max_resolution=_int(env, 'TRAINGUARD_CPU_MAX_RESOLUTION', 128, 16, 4096),
        max_crop_3d=_int(env, 'TRAINGUARD_CPU_MAX_CROP_3D', 64, 16, 512),
        max_batch_3d=_int(env, 'TRAINGUARD_CPU_MAX_BATCH_SIZE_3D', 2, 1, 4096),
        max_resolution_3d=_int(env, 'TRAINGUARD_CPU_MAX_RESOLUTION_3D', 96, 16, 1024),
    )
    pod = PodSettings(
        image=env.get('TRAINGUARD_TRAINER_IMAGE', '').strip() or DEFAULT_TRAINER_IMAGE,
        gpu_image=env.get('TRAINGUARD_TRAINER_GPU_IMAGE', '').strip() or DEFAULT_TRAINER_GPU_IMAGE,
        heartbeat_seconds=_int(env, 'TRAINGUARD_HEARTBEAT_SECONDS', 10, 1, 3600),
        image_pull_policy=_PULL_POLICIES[_choice(env, 'TRAINGUARD_IMAGE_PULL_POLICY', 'ifnotpresent',
                                                 tuple(_PULL_POLICIES))],
    )
    namespaces = tuple(ns.strip() for ns in env.get('TRAINGUARD_NAMESPACES', '').split(',') if ns.strip())
    sweep = _int(env, 'TRAINGUARD_SWEEP_SECONDS', 5, 1, 300)
    return Config(
        settings=Settings(limits=limits, pod=pod, first_status_grace_seconds=float(
            _int(env, 'TRAINGUARD_FIRST_STATUS_GRACE_SECONDS', 5, 0, 60))),
        namespaces=namespaces,
        webhook=webhook_enabled(env),
        webhook_host=env.get('TRAINGUARD_WEBHOOK_HOST', '').strip(),
        webhook_port=_int(env, 'TRAINGUARD_WEBHOOK_PORT', 9443, 1, 65535),
        webhook_cert_dir=env.get('TRAINGUARD_WEBHOOK_CERT_DIR', '').strip(),
        webhook_service=_service(env, 'TRAINGUARD_WEBHOOK_SERVICE'),
        log_format=_choice(env, 'TRAINGUARD_LOG_FORMAT', 'text', ('text', 'json')),
        sweep_seconds=float(sweep),
        metrics_port=_int(env, 'TRAINGUARD_METRICS_PORT', 0, 0, 65535),
        peering_priority=_int(env, 'TRAINGUARD_PEERING_PRIORITY', 0, 1, 2**31 - 1)
        if env.get('TRAINGUARD_PEERING_PRIORITY', '').strip() else None,
        peering_lifetime=_int(env, 'TRAINGUARD_PEERING_LIFETIME_SECONDS', 60, 10, 3600),
        trainer_identity=_choice(env, 'TRAINGUARD_TRAINER_IDENTITY', 'auto', identity.CHOICES),
    )
