"""The admission webhook's HTTPS server: certificates, how the API server reaches it, failures.

- **Certificates.** ``kopf`` mode: a CA and a serving certificate generated here with
  ``cryptography`` at start-up (kopf's own generator needs ``certbuilder``/``oscrypto``,
  which cannot load OpenSSL 3). ``cert-manager`` mode: ``tls.crt``, ``tls.key`` and
  ``ca.crt`` from a mounted folder; kopf reloads them when they are renewed.
- **Reaching it.** With a Service name configured, the MutatingWebhookConfiguration points at
  the Service (``clientConfig.service``: kube-apiserver routes to it without cluster DNS);
  otherwise at ``https://<host>:<port>`` (sandbox, tests, out-of-cluster development).
- **Registering.** trainguard, not kopf, keeps its one MutatingWebhookConfiguration current
  (``Registration``; why in ``trainguard.domain.admission``): kopf's managed mode also
  manages a validating configuration, and any refusal there stops the operator.
- **Failing.** A webhook server that cannot start, or a configuration the API server refuses
  (RBAC, an admission policy), is logged, counted and reported on the operator's Pod; it
  never takes the operator down: kopf's other tasks keep reconciling, a refused registration
  is retried with back-off, and the webhook is registered with ``failurePolicy: Ignore``, so
  while it is away runs are admitted as written and the operator's own reconcile applies
  the same CPU-safety rewrite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import pathlib
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trainguard import GROUP, PLURAL, VERSION
from trainguard.domain.admission import mutating_webhook_configuration, mutating_webhooks, retry_delay

log = logging.getLogger(__name__)
CERT_DAYS = 365


@dataclasses.dataclass(frozen=True)
class CertificateFiles:
    certfile: pathlib.Path   # the serving certificate (tls.crt)
    pkeyfile: pathlib.Path   # its private key (tls.key)
    cafile: pathlib.Path     # the CA that signed it (ca.crt): the caBundle of the configuration


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_certificates(directory: pathlib.Path, hostnames: Sequence[str],
                          now: datetime.datetime | None = None) -> CertificateFiles:
    """A private CA and a serving certificate for these DNS names and IP addresses.

    The CA's key never leaves memory: only the serving key is written, with mode 0600.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name('trainguard-webhook-ca')
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hostnames[0])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid_from).not_valid_after(valid_to)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(directory / 'tls.crt', directory / 'tls.key', directory / 'ca.crt')
    files.pkeyfile.touch(mode=0o600)
    files.pkeyfile.write_bytes(_pem_key(key))
    files.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def folder_certificates(directory: pathlib.Path) -> CertificateFiles:
    """cert-manager's Secret layout; a missing file is an error that names it."""
    files = CertificateFiles(directory / 'tls.crt', directory / 'tls.key', directory / 'ca.crt')
    for path in (files.certfile, files.pkeyfile, files.cafile):
        if not path.is_file():
            raise FileNotFoundError(f'webhook certificate file {path} is missing')
    return files


@dataclasses.dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str
    port: int = 443


class TrainguardWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS server, reached through a Service when one is named, and never fatal."""

    def __init__(self, *, service: ServiceRef | None = None, startup_error: BaseException | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 on_config: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.startup_error = startup_error  # e.g. certificates that could not be made or read
        self.on_failure = on_failure
        self.on_config = on_config  # each client config (URL or Service, CA bundle) once it is served

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        try:
            if self.startup_error is not None:
                raise self.startup_error
            async for config in super().__call__(fn):
                if self.service is not None:
                    config = {'service': {'namespace': self.service.namespace, 'name': self.service.name,
                                          'port': self.service.port, 'path': ''},
                              **({'caBundle': config['caBundle']} if config.get('caBundle') else {})}
                if self.on_config is not None:
                    self.on_config(dict(config))
                yield config
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as error:  # any start-up failure: bad certificates, a port in use, ...
            log.error('the admission webhook could not start, runs are admitted unchanged and the operator '
                      'applies CPU safety itself: %s', error)
            if self.on_failure is not None:
                self.on_failure(error)
            await asyncio.Event().wait()  # stay pending: kopf would stop the operator if this task ended


def build_server(*, port: int, host: str, cert_dir: str, service: tuple[str, str] | None,
                 on_failure: Callable[[BaseException], None], on_config: Callable[[dict[str, Any]], None],
                 addr: str = '0.0.0.0') -> TrainguardWebhookServer:
    """The server for the operator's configuration; certificate problems surface when it starts."""
    reference = ServiceRef(*service) if service else None
    hostnames = [name for name in dict.fromkeys([
        *([f'{reference.name}.{reference.namespace}.svc', f'{reference.name}.{reference.namespace}.svc.cluster.local']
          if reference else []),
        host, 'localhost', '127.0.0.1']) if name]
    try:
        if cert_dir:
            files = folder_certificates(pathlib.Path(cert_dir))
        else:
            files = generate_certificates(pathlib.Path(tempfile.mkdtemp(prefix='trainguard-webhook-')), hostnames)
    except (OSError, ValueError) as error:
        return TrainguardWebhookServer(addr=addr, port=port, startup_error=error, on_failure=on_failure)
    return TrainguardWebhookServer(addr=addr, port=port, host=host or None, certfile=files.certfile,
                                   pkeyfile=files.pkeyfile, cafile=files.cafile, service=reference,
                                   on_failure=on_failure, on_config=on_config)


class Registration:
    """Keeps the MutatingWebhookConfiguration pointing at the server that serves now; never raises.

    Each client config the server yields (at start, and when cert-manager renews the
    certificates) replaces the one being registered. A refused registration is logged, counted
    and reported once per config through ``on_failure``, then retried with back-off for as long
    as the operator runs, so fixing the RBAC later is enough. Nothing is removed on stop: in a
    rolling update the old pod stops after the new one registered, and would unregister it.
    """

    def __init__(self, apply: Callable[[dict[str, Any]], None], *,
                 on_failure: Callable[[BaseException], None], on_retry: Callable[[], None]) -> None:
        self._apply = apply            # blocking: runs in a worker thread
        self._on_failure = on_failure
        self._on_retry = on_retry      # every failed attempt (a counter)
        self._task: asyncio.Task[None] | None = None

    def submit(self, client_config: dict[str, Any]) -> None:
        if self._task is not None:
            self._task.cancel()
        webhooks = mutating_webhooks(client_config, group=GROUP, version=VERSION, plural=PLURAL)
        self._task = asyncio.get_running_loop().create_task(self._register(mutating_webhook_configuration(webhooks)))

    async def _register(self, configuration: dict[str, Any]) -> None:
        failures = 0
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._apply, configuration)
            except Exception as error:  # RBAC, an admission policy, the API away: all retried
                failures += 1
                delay = retry_delay(failures)
                log.error('could not register the admission webhook (attempt %d, next in %.0f s); runs are '
                          'admitted as written and the operator applies CPU safety itself: %s',
                          failures, delay, error)
                self._on_retry()
                if failures == 1:
                    self._on_failure(error)
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info('registered the admission webhook after %d failed attempts', failures)
            return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
