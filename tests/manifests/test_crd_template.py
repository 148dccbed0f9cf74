"""spec.template in the CRD is generated from Kubernetes' types (scripts/crd_template_schema.py) and current."""

from __future__ import annotations

import subprocess
import sys

from tests.crd_schema import ROOT, load_crd

SCRIPT = ROOT / 'scripts' / 'crd_template_schema.py'


def test_the_generated_template_schema_is_current():
    result = subprocess.run([sys.executable, str(SCRIPT), '--check'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_template_offers_exactly_the_documented_fields():
    spec = load_crd()['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']
    template = spec['properties']['template']['properties']
    assert sorted(template['spec']['properties']) == sorted([
        'priorityClassName', 'imagePullSecrets', 'affinity', 'topologySpreadConstraints', 'schedulerName',
        'runtimeClassName', 'securityContext', 'volumes', 'containers'])
    container = template['spec']['properties']['containers']['items']['properties']
    assert sorted(container) == ['env', 'envFrom', 'name', 'volumeMounts']   # no command, image, resources
    volume = template['spec']['properties']['volumes']['items']['properties']
    assert 'hostPath' not in volume and 'persistentVolumeClaim' in volume
    affinity = template['spec']['properties']['affinity']['properties']
    assert sorted(affinity) == ['nodeAffinity', 'podAffinity', 'podAntiAffinity']   # Kubernetes' own type
