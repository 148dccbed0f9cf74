"""trainguard's trainer: MONAI UNet segmentation training with a step-tied heartbeat."""

__version__ = '0.1.0'
