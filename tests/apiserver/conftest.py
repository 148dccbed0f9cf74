"""A real control plane for the apiserver tier: etcd + kube-apiserver from ``$KUBEBUILDER_ASSETS``.

envtest runs no kube-controller-manager: a deleted namespace stays ``Terminating`` for ever,
deleting an owner collects none of its dependents, and ClusterRoles are not aggregated. So
every case works in names of its own (``unique``, the ``namespace`` fixture) and states its
own preconditions (the TrainingRun CRD present or absent) instead of relying on what another
case left behind: the tier passes in any order (``--reverse``, ``--random-order``).

The folder is setup-envtest's layout (``etcd``, ``kube-apiserver``, ``kubectl``). Without it
the whole tier skips with one reason. The fixture starts both on free loopback ports in a
temporary folder, with RBAC on, service-account token signing (so the TokenRequest API mints
tokens for the operator's and trainers' ServiceAccounts) and a static admin token, and tears
them down at the end of the session. Written from the documented flags of kube-apiserver and
etcd (this project's development machine has neither binary; GitHub Actions runs the tier).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = os.environ.get('KUBEBUILDER_ASSETS', '')
NEEDED = ('etcd', 'kube-apiserver')

AVAILABLE = bool(ASSETS) and all((pathlib.Path(ASSETS) / name).is_file() for name in NEEDED)
SKIP_REASON = ('the apiserver tier needs KUBEBUILDER_ASSETS naming a folder with etcd and kube-apiserver '
               '(setup-envtest use <version> -p path); none here')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a graceful shutdown, as on a real control plane), SIGKILL past ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclasses.dataclass
class ControlPlane:
    url: str
    token: str
    ca: pathlib.Path            # the API server's serving CA (it self-signs into --cert-dir)
    kubeconfig: pathlib.Path    # admin
    folder: pathlib.Path
    apiserver_command: list[str] = dataclasses.field(default_factory=list)
    apiserver: subprocess.Popen[bytes] | None = None

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (etcd and everything in it stay), as an upgrade or a certificate
        rotation on a single-master control plane does: connections cut, then refused."""
        assert self.apiserver is not None
        _stop(self.apiserver, timeout=60)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again over the same etcd, port, serving certificate and
        service-account keys (tokens minted before still authenticate); returns once ready."""
        with (self.folder / 'kube-apiserver.log').open('ab') as log:
            self.apiserver = subprocess.Popen(self.apiserver_command, stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(self.url, self.token, self.ca, [self.apiserver])

    def env(self, kubeconfig: pathlib.Path | None = None) -> dict[str, str]:
        path = os.pathsep.join([ASSETS, str(pathlib.Path(sys.executable).parent), os.environ.get('PATH', '')])
        return {**os.environ, 'KUBECONFIG': str(kubeconfig or self.kubeconfig), 'PATH': path}

    def run(self, *command: str, check: bool = True, kubeconfig: pathlib.Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """kubectl or helm against this control plane; fails with their output."""
        result = subprocess.run(command, env=self.env(kubeconfig), capture_output=True, text=True, timeout=timeout,
                                cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f'{" ".join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}')
        return result

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        """Poll (every 0.5 s) until the server's asynchronous work shows, failing after a deadline."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {timeout:.0f}s waiting for {what}')
            time.sleep(0.5)

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        """``wait_until`` for async cases: the event loop (and the pod runner on it) keeps running."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {timeout:.0f}s waiting for {what}')
            await asyncio.sleep(0.5)

    def token_for(self, namespace: str, account: str, pod: tuple[str, str] | None = None) -> str:
        """A token of this ServiceAccount; ``pod`` (name, uid): bound to that pod, as the kubelet's
        projected token is (1.30+ puts the pod's name into the token's user extra)."""
        bound = ['--bound-object-kind=Pod', f'--bound-object-name={pod[0]}', f'--bound-object-uid={pod[1]}'] \
            if pod else []
        return self.run('kubectl', 'create', 'token', account, '-n', namespace, '--duration=2h',
                        *bound).stdout.strip()

    def kubeconfig_for(self, token: str, name: str) -> pathlib.Path:
        path = self.folder / f'{name}.kubeconfig'
        path.write_text(kubeconfig_text(self.url, self.ca, token))
        return path


def kubeconfig_text(url: str, ca: pathlib.Path, token: str) -> str:
    return f'''apiVersion: v1
kind: Config
clusters: [{{name: envtest, cluster: {{server: "{url}", certificate-authority: "{ca}"}}}}]
users: [{{name: user, user: {{token: "{token}"}}}}]
contexts: [{{name: envtest, context: {{cluster: envtest, user: user, namespace: default}}}}]
current-context: envtest
'''


def _wait_ready(url: str, token: str, ca: pathlib.Path, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f'{process.args[0]} exited with {process.returncode} during start-up')
        try:
            answer = requests.get(f'{url}/readyz', headers={'Authorization': f'Bearer {token}'}, verify=str(ca),
                                  timeout=5)
            if answer.status_code == 200:
                return
        except (requests.ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError('kube-apiserver was not ready within 90 s')


@pytest.fixture(scope='session')
def control_plane() -> Iterator[ControlPlane]:
    folder = pathlib.Path(tempfile.mkdtemp(prefix='trainguard-apiserver-'))
    assets = pathlib.Path(ASSETS)
    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    token = secrets.token_hex(16)
    (folder / 'tokens.csv').write_text(f'{token},admin,admin,"system:masters"\n')
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / 'sa.key').write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption()))
    (folder / 'sa.pub').write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    logs = [(folder / 'etcd.log').open('wb'), (folder / 'kube-apiserver.log').open('wb')]
    etcd = subprocess.Popen([
        str(assets / 'etcd'), f'--data-dir={folder / "etcd"}',
        f'--listen-client-urls=http://127.0.0.1:{etcd_port}', f'--advertise-client-urls=http://127.0.0.1:{etcd_port}',
        f'--listen-peer-urls=http://127.0.0.1:{etcd_peer}', '--unsafe-no-fsync=true',
    ], stdout=logs[0], stderr=subprocess.STDOUT)
    apiserver_command = [
        str(assets / 'kube-apiserver'), f'--etcd-servers=http://127.0.0.1:{etcd_port}',
        '--bind-address=127.0.0.1', f'--secure-port={api_port}', f'--cert-dir={folder / "certs"}',
        '--authorization-mode=RBAC', f'--token-auth-file={folder / "tokens.csv"}',
        '--service-cluster-ip-range=10.0.0.0/24', '--allow-privileged=true',
        '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
        f'--service-account-key-file={folder / "sa.pub"}',
        f'--service-account-signing-key-file={folder / "sa.key"}',
    ]
    apiserver = subprocess.Popen(apiserver_command, stdout=logs[1], stderr=subprocess.STDOUT)
    url = f'https://127.0.0.1:{api_port}'
    ca = folder / 'certs' / 'apiserver.crt'
    plane: ControlPlane | None = None
    try:
        deadline = time.monotonic() + 60
        while not ca.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        _wait_ready(url, token, ca, [etcd, apiserver])
        kubeconfig = folder / 'admin.kubeconfig'
        kubeconfig.write_text(kubeconfig_text(url, ca, token))
        plane = ControlPlane(url=url, token=token, ca=ca, kubeconfig=kubeconfig, folder=folder,
                             apiserver_command=apiserver_command, apiserver=apiserver)
        yield plane
    finally:
        # The apiserver running now: a case may have stopped and started it again.
        for process in (plane.apiserver if plane is not None and plane.apiserver else apiserver, etcd):
            _stop(process, timeout=30)
        for log in logs:
            log.close()
        if not os.environ.get('TRAINGUARD_KEEP_APISERVER'):
            shutil.rmtree(folder, ignore_errors=True)


def unique(prefix: str) -> str:
    """A name no other case (or earlier run against the same server) uses."""
    return f'{prefix}-{secrets.token_hex(3)}'


@pytest.fixture()
def namespace(control_plane: ControlPlane) -> str:
    """A namespace of this case's own, never deleted: on envtest it would stay Terminating for
    ever, and a case that installed into it again would be refused ("being terminated")."""
    name = unique('tg-case')
    control_plane.run('kubectl', 'create', 'namespace', name)
    return name
