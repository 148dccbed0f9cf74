import sys

from trainguard_trainer.cli import main

sys.exit(main())
