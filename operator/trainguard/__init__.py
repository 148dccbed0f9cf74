"""trainguard: a Kubernetes operator that runs MONAI segmentation training safely."""

GROUP = 'trainguard.io'
VERSION = 'v1alpha1'
PLURAL = 'trainingruns'
KIND = 'TrainingRun'
