"""A real Prometheus on loopback, fed the way prometheus-operator feeds one from the chart.

prometheus-operator turns the chart's ServiceMonitor into a scrape job whose targets carry the
labels ``namespace`` (the Service's: where the operator runs), ``service``, ``pod``, ``endpoint``
and ``job`` (the Service's name), with the endpoint's ``honorLabels`` and ``metricRelabelings``;
it turns the PrometheusRule into a rule file. :func:`scrape_config` and :func:`rule_file` do the
same from the chart as ``helm template`` renders it, so the demo and the e2e tier ask a real
Prometheus (Debian's ``prometheus`` package) what the chart's alerts and dashboard would show.
Where no ``prometheus`` binary (or no ``helm``) is installed, :func:`available` says why.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from trainguard_sandbox.cluster import free_port

# chart/ is a link to charts/trainguard/ (packaged like manifests/).
CHART = pathlib.Path(__file__).parent / 'chart'
# What the sandbox calls the operator's install when it renders the chart for Prometheus.
RELEASE, RELEASE_NAMESPACE = 'trainguard', 'trainguard-system'


def helm_binary() -> str | None:
    """helm on PATH, else the one `make tools` puts beside this interpreter."""
    beside = pathlib.Path(sys.executable).parent / 'helm'
    return shutil.which('helm') or (str(beside) if beside.exists() else None)


def available() -> str | None:
    """None when a real Prometheus can run here; otherwise why not, in words."""
    if shutil.which('prometheus') is None:
        return 'no prometheus binary (apt-get install prometheus)'
    if helm_binary() is None:
        return 'no helm to render the chart (make tools)'
    return None


def render_chart(*values: str, helm: str | None = None) -> list[dict[str, Any]]:
    """The chart's ServiceMonitor and PrometheusRule (and whatever else it renders) as documents."""
    result = subprocess.run(
        [helm or helm_binary() or 'helm', 'template', RELEASE, str(CHART.resolve()), '--namespace', RELEASE_NAMESPACE,
         '--set', 'metrics.serviceMonitor.enabled=true', '--set', 'metrics.prometheusRule.enabled=true', *values],
        capture_output=True, text=True, check=True, timeout=120)
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def one_of_kind(documents: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    (found,) = [document for document in documents if document.get('kind') == kind]
    return found


def target_labels(documents: Sequence[Mapping[str, Any]], pod: str) -> dict[str, str]:
    """The labels prometheus-operator's relabelling gives each target of the ServiceMonitor's
    first endpoint: from the Service it selects that has the endpoint's port (its name is the job)."""
    monitor = one_of_kind(documents, 'ServiceMonitor')
    endpoint = monitor['spec']['endpoints'][0]
    wanted = monitor['spec']['selector']['matchLabels']
    (service,) = [document for document in documents if document.get('kind') == 'Service'
                  and wanted.items() <= (document['metadata'].get('labels') or {}).items()
                  and any(port.get('name') == endpoint['port'] for port in document['spec']['ports'])]
    name = service['metadata']['name']
    return {'namespace': service['metadata'].get('namespace') or monitor['metadata']['namespace'],
            'service': name, 'pod': pod, 'container': 'operator', 'endpoint': endpoint['port'], 'job': name}


def _snake(key: str) -> str:
    return re.sub(r'(?<!^)([A-Z])', r'_\1', key).lower()


def relabel_configs(relabelings: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """prometheus-operator's RelabelConfig (camelCase) as Prometheus reads it (snake_case)."""
    return [{_snake(key): value for key, value in relabeling.items()} for relabeling in relabelings]


def scrape_config(documents: Sequence[Mapping[str, Any]], address: str, pod: str,
                  interval: str = '1s') -> dict[str, Any]:
    """The scrape job prometheus-operator derives from the chart's ServiceMonitor, for one target
    address (its kubernetes_sd discovery and relabelling replaced by the labels they produce)."""
    endpoint = one_of_kind(documents, 'ServiceMonitor')['spec']['endpoints'][0]
    meta = one_of_kind(documents, 'ServiceMonitor')['metadata']
    config: dict[str, Any] = {
        'job_name': f'serviceMonitor/{meta["namespace"]}/{meta["name"]}/0',
        'honor_labels': bool(endpoint.get('honorLabels', False)),
        'scrape_interval': interval, 'scrape_timeout': interval,
        'static_configs': [{'targets': [address], 'labels': target_labels(documents, pod)}],
    }
    if endpoint.get('metricRelabelings'):
        config['metric_relabel_configs'] = relabel_configs(endpoint['metricRelabelings'])
    return config


def rule_file(prometheus_rule: Mapping[str, Any]) -> dict[str, Any]:
    """A PrometheusRule's spec is a Prometheus rule file as it stands."""
    return {'groups': list(prometheus_rule['spec']['groups'])}


class LocalPrometheus:
    """``prometheus`` on a loopback port with its own storage under ``workdir``; stopped on exit."""

    def __init__(self, workdir: pathlib.Path, scrape_configs: Sequence[Mapping[str, Any]],
                 rules: Mapping[str, Any] | None = None, evaluation_interval: str = '1s') -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self._scrape_configs, self._rules, self._evaluation = list(scrape_configs), rules, evaluation_interval
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {'global': {'scrape_interval': '1s', 'evaluation_interval': self._evaluation},
                                  'scrape_configs': self._scrape_configs}
        if self._rules is not None:
            (self.workdir / 'rules.yaml').write_text(yaml.safe_dump(self._rules, sort_keys=False))
            config['rule_files'] = [str(self.workdir / 'rules.yaml')]
        (self.workdir / 'prometheus.yml').write_text(yaml.safe_dump(config, sort_keys=False))
        log = (self.workdir / 'prometheus.log').open('wb')
        self._process = subprocess.Popen(
            ['prometheus', f'--config.file={self.workdir / "prometheus.yml"}',
             f'--storage.tsdb.path={self.workdir / "data"}', f'--web.listen-address=127.0.0.1:{self.port}',
             '--storage.tsdb.retention.time=1d', '--log.level=warn'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f'prometheus exited {self._process.returncode}: {self.log_tail()}')
            try:
                with urllib.request.urlopen(f'{self.url}/-/ready', timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f'prometheus not ready after {timeout:.0f}s: {self.log_tail()}')

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
        self._process = None

    def __enter__(self) -> LocalPrometheus:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def log_tail(self) -> str:
        path = self.workdir / 'prometheus.log'
        return path.read_text(errors='replace')[-2000:] if path.exists() else ''

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({key: value for key, value in params.items() if value is not None})
        with urllib.request.urlopen(f'{self.url}{path}?{query}', timeout=10) as response:
            body = json.loads(response.read())
        if body.get('status') != 'success':
            raise RuntimeError(f'{path} {params}: {body}')
        return body['data']

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant vector: [{'metric': {...}, 'value': [time, 'value']}]."""
        return self._get('/api/v1/query', query=expr, time=at)['result']

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range: [{'metric': {...}, 'values': [[time, 'value'], ...]}]."""
        return self._get('/api/v1/query_range', query=expr, start=start, end=end, step=step)['result']

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now: [{'labels', 'annotations', 'state', ...}]."""
        return self._get('/api/v1/alerts')['alerts']

    def series(self, match: str) -> list[dict[str, str]]:
        """The label sets Prometheus stored for a selector."""
        return self._get('/api/v1/series', **{'match[]': match, 'start': time.time() - 3600})

    async def wait_for(self, what: str, check: Any, timeout: float) -> Any:
        """Poll ``check()`` (blocking, run in a thread) until it returns something truthy."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            found = await loop.run_in_executor(None, check)
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f'prometheus: {what} not seen in {timeout:.0f}s')
            await asyncio.sleep(0.5)
