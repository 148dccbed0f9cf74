"""The trainer's heartbeat reaches its TrainingRun over HTTP (emulated API, real trainer process)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import kmock

from trainguard_sandbox.cluster import emulated_cluster

RUNS = kmock.resource('trainguard.io', 'v1alpha1', 'trainingruns')


async def test_heartbeat_patches_the_progress_annotation(tmp_path):
    async with emulated_cluster(tmp_path / 'kubeconfig') as emulator:
        async with emulator.post('/apis/trainguard.io/v1alpha1/namespaces/default/trainingruns', json={
                'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'unet'},
                'spec': {}}) as response:
            assert response.status == 200
        process = await asyncio.create_subprocess_exec(
            sys.executable, '-m', 'trainguard_trainer', '--device', 'cpu', '--epochs', '2', '--num-samples', '12',
            '--resolution', '32', '--crop-size', '32', '--channels', '8,16', '--strides', '2',
            '--num-res-units', '0', '--output-dir', str(tmp_path / 'out'),
            env={**os.environ, 'KUBECONFIG': str(tmp_path / 'kubeconfig'), 'TRAINGUARD_RUN_NAME': 'unet',
                 'TRAINGUARD_RUN_NAMESPACE': 'default'},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, output.decode()
        run = emulator.objects[RUNS, 'default', 'unet']
        progress = json.loads(run['metadata']['annotations']['trainguard.io/progress'])
        assert (progress['epoch'], progress['epochs'], progress['step']) == (2, 2, progress['steps'])
        versions = [v for v in run.history if v is not None]
        beats = {v['metadata'].get('annotations', {}).get('trainguard.io/progress') for v in versions} - {None}
        phases = [json.loads(beat)['phase'] for beat in beats]
        # Starting (before the imports), entering PreparingData, the first step, each epoch's
        # validation and each epoch end: the stopped heartbeat interval allows nothing else.
        assert phases.count('Training') == 3 and {'Starting', 'PreparingData', 'Validating'} <= set(phases), phases
