"""The webhook server's certificates and how the API server is told to reach it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trainguard.webhook import TrainguardWebhookServer, build_server, generate_certificates


def test_generated_certificates_are_a_ca_and_a_serving_cert_for_every_name(tmp_path):
    now = datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC)
    files = generate_certificates(tmp_path, ['tg-webhook.ops.svc', '127.0.0.1'], now=now)
    ca = x509.load_pem_x509_certificate(files.cafile.read_bytes())
    cert = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    assert cert.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ['tg-webhook.ops.svc']
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address('127.0.0.1')]
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.not_valid_after_utc - now == datetime.timedelta(days=365)
    assert files.pkeyfile.stat().st_mode & 0o077 == 0  # the key is readable by its owner only


@pytest.mark.parametrize(('service', 'expected'), [
    (('ops', 'tg-webhook'), {'service': {'namespace': 'ops', 'name': 'tg-webhook', 'port': 443, 'path': ''}}),
    (None, None),
], ids=['service', 'url'])
async def test_the_client_config_names_the_service_when_one_is_configured(tmp_path, service, expected):
    registered: list[dict] = []
    server = build_server(port=0, host='127.0.0.1', cert_dir='', service=service, on_failure=print,
                          on_config=registered.append, addr='127.0.0.1')

    async def fn(*_, **__):
        return {}

    configs = server(fn)
    config = await configs.__anext__()
    try:
        assert config['caBundle']
        if expected is None:
            assert config['url'].startswith('https://127.0.0.1:')
        else:
            assert {key: value for key, value in config.items() if key != 'caBundle'} == expected
        assert registered == [config]   # handed to the registration as kopf gets it
    finally:
        await configs.aclose()


async def test_a_server_that_cannot_start_reports_once_and_stays_pending(tmp_path):
    failures: list[BaseException] = []
    registered: list[dict] = []
    server = build_server(port=0, host='', cert_dir=str(tmp_path / 'missing'), service=None,
                          on_failure=failures.append, on_config=registered.append)
    assert isinstance(server, TrainguardWebhookServer)

    async def fn(*_, **__):
        return {}

    configs = server(fn)
    task = asyncio.ensure_future(configs.__anext__())
    async with asyncio.timeout(5):  # wait for the report, with a deadline
        while not failures:
            await asyncio.sleep(0.01)
    assert [type(error) for error in failures] == [FileNotFoundError] and not task.done()
    assert registered == []   # nothing to register: the API server is never pointed at a dead server
    task.cancel()
