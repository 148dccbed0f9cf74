"""kopf handlers: thin. They unpack, call the pure core (via Runtime), and apply the result.

``kopf run -m trainguard.handlers`` runs the operator; so does ``trainguard-operator run``.
The watch handlers are async but never block the loop: they update the in-memory view and
decide on the loop whether the event changes anything (most do not: the echo of the
operator's own write, a pod event that changes nothing); only work that calls the API goes
to the runtime's worker threads, where the blocking kubernetes client is safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import random
from typing import Any

import kopf
import prometheus_client

from trainguard import GROUP, PLURAL, VERSION
from trainguard.domain import identity
from trainguard.domain.builders import RUN_IDENTITY, RUN_LABEL, TRAINER_POLICY
from trainguard.domain.config import Config, config_from_env, webhook_enabled
from trainguard.domain.policy import plan_admission
from trainguard.domain.spec import SpecError, parse_spec
from trainguard.kopfstate import NoDiffBase, NoProgress, QuietEventHandlers
from trainguard.kube import KubeApi
from trainguard.runtime import Runtime, system_clock
from trainguard.webhook import Registration, build_server


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The service account in a pod, else $KUBECONFIG read at login time (not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = memo.get('config') or config_from_env(os.environ)
    # trainguard posts its own Events; kopf would post one per handler log line.
    settings.posting.enabled = False
    # Nothing here needs kopf's per-object state: no finalizers, no progress or diff-base
    # annotations, so a new run costs only the writes the design counts.
    settings.persistence.finalizer = 'trainguard.io/finalizer'
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.progress_storage = NoProgress()
    logging.getLogger('kopf.objects').addFilter(QuietEventHandlers())
    settings.watching.server_timeout = 300
    # kopf peering (replicas > 1): kopf pauses *every* operator when live peers share a
    # priority, so each process takes its own (random unless configured); the highest live one
    # is active, and a standby takes over once the active one is silent for the lifetime.
    settings.peering.priority = config.peering_priority or random.SystemRandom().randint(1, 2**31 - 1)
    settings.peering.lifetime = config.peering_lifetime
    settings.watching.client_timeout = 330
    api = memo.get('api') or KubeApi.from_environment()
    config = await _resolve_trainer_identity(config, api, logger)
    memo.runtime = Runtime(config=config, api=api, clock=memo.get('clock') or system_clock)
    if config.webhook:
        # HTTPS with our own certificates (or cert-manager's). trainguard registers the
        # MutatingWebhookConfiguration itself, not kopf's managed mode: see trainguard.webhook.
        runtime = memo.runtime
        memo.webhook_registration = Registration(
            runtime.api.register_mutating_webhooks, on_retry=runtime.metrics.webhook_registration_failures.inc,
            on_failure=functools.partial(_report_webhook_problem, runtime, 'WebhookNotRegistered',
                                         'admission webhook could not be registered'))
        settings.admission.server = build_server(
            port=config.webhook_port, host=config.webhook_host, cert_dir=config.webhook_cert_dir,
            service=config.webhook_service, on_failure=functools.partial(_webhook_failed, runtime),
            on_config=memo.webhook_registration.submit, addr=memo.get('webhook_addr') or '0.0.0.0')
    memo.sweeper = asyncio.create_task(memo.runtime.sweep_forever(logger))
    if config.metrics_port:
        memo.metrics_server, _ = prometheus_client.start_http_server(
            config.metrics_port, registry=memo.runtime.metrics.registry)
    logger.info('trainguard started: trainer image %s, CPU limits %s, namespaces %s, webhook %s',
                config.settings.pod.image, config.settings.limits, config.namespaces or 'all',
                'on' if config.webhook else 'off')


async def _resolve_trainer_identity(config: Config, api: KubeApi, logger: logging.Logger) -> Config:
    """``auto``: the namespace identity where its admission policy is installed (domain.identity)."""
    installed = config.trainer_identity != RUN_IDENTITY and await asyncio.get_running_loop().run_in_executor(
        None, api.trainer_policy_installed, TRAINER_POLICY)
    chosen, line, warn = identity.resolve(config.trainer_identity, installed)
    (logger.warning if warn else logger.info)('%s', line)
    pod = dataclasses.replace(config.settings.pod, trainer_identity=chosen)
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, pod=pod))


def _webhook_failed(runtime: Runtime, error: BaseException) -> None:
    """Counted and reported on the operator's Pod; reconciling goes on (see trainguard.webhook)."""
    runtime.metrics.webhook_failures.inc()
    _report_webhook_problem(runtime, 'WebhookFailed', 'admission webhook could not start', error)


def _report_webhook_problem(runtime: Runtime, reason: str, what: str, error: BaseException) -> None:
    """A Warning Event on the operator's own Pod (the downward API names it), where it is seen."""
    pod, namespace = os.environ.get('POD_NAME'), os.environ.get('POD_NAMESPACE')
    if pod and namespace:
        message = f'{what} ({error}); runs are admitted as written and the operator applies CPU safety itself'
        asyncio.get_running_loop().run_in_executor(None, functools.partial(
            runtime.api.post_pod_event, namespace, pod, 'Warning', reason, message, runtime.clock()))


async def stop(memo: kopf.Memo, **_: Any) -> None:
    registration = memo.get('webhook_registration')
    if registration is not None:
        await registration.close()
    server = memo.get('metrics_server')
    if server is not None:
        server.shutdown()
        server.server_close()
        memo.metrics_server = None
    sweeper = memo.get('sweeper')
    if sweeper is not None:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
    runtime = memo.get('runtime')
    if runtime is not None:
        await runtime.close()


async def on_run_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                       **_: Any) -> None:
    runtime: Runtime = memo.runtime
    if event['type'] == 'DELETED':
        runtime.forget_run((body.metadata.namespace, body.metadata.name))
        return
    key = runtime.observe_run(event['object'])
    if runtime.is_own_echo(event['object']):
        return
    await runtime.reconcile_soon(key, logger)


async def on_pod_event(event: kopf.RawEvent, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    key = runtime.observe_pod(event['type'], event['object'])
    if key is not None:
        await runtime.reconcile_soon(key, logger)


def mutate_cpu_safety(body: kopf.Body, old: kopf.Body | None, patch: kopf.Patch, memo: kopf.Memo,
                      logger: logging.Logger, warnings: list[str], **_: Any) -> None:
    """Rewrite at admission, on CREATE and UPDATE, so GitOps dry-runs see the effective spec (no drift).

    An UPDATE of the manifest as written (batch 32 again) is rewritten to the same live values;
    the first admission's original-values annotation is kept when the update omits it.
    """
    spec_raw = dict(body.get('spec') or {})
    try:
        spec = parse_spec(spec_raw)
    except SpecError:
        return  # the operator reports it as Failed/InvalidSpec with the same message
    runtime: Runtime = memo.runtime
    rewrite = plan_admission(spec, spec_raw.get('hyperparameters') or {}, dict(body.metadata.annotations),
                             dict(old.metadata.annotations) if old is not None else {},
                             runtime.config.settings.limits)
    if rewrite.spec_patch is None:
        return
    for section, values in rewrite.spec_patch.items():
        target = patch.setdefault(section, {})
        for key, value in values.items():
            target[key] = value
    for adjustment in rewrite.adjustments:
        warnings.append(adjustment.log_line())
        logger.info(adjustment.log_line())


def register(registry: kopf.OperatorRegistry, *, webhook: bool) -> kopf.OperatorRegistry:
    """Register every handler; the admission handler only when a webhook server will serve it
    (kopf refuses to start with admission handlers and no server)."""
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(start)
    kopf.on.cleanup(registry=registry)(stop)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(on_run_event)
    kopf.on.event('', 'v1', 'pods', registry=registry,
                  labels={RUN_LABEL: kopf.PRESENT, 'app.kubernetes.io/managed-by': 'trainguard'})(on_pod_event)
    if webhook:
        # ignore_failures: failurePolicy Ignore, so runs are admitted while the operator is away;
        # its reconcile then applies the same rewrite (README, "Admission webhook").
        kopf.on.mutate(GROUP, VERSION, PLURAL, operations={'CREATE', 'UPDATE'}, id='cpu-safety',
                       ignore_failures=True, registry=registry)(mutate_cpu_safety)
    return registry


# `kopf run -m trainguard.handlers` reads kopf's default registry.
register(kopf.get_default_registry(), webhook=webhook_enabled(os.environ))
