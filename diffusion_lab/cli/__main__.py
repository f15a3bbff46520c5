"""python -m diffusion_lab.cli ...: same as the diffusion-lab command (also the torchrun entry for multi-GPU train)."""
import sys

from . import main

sys.exit(main())
