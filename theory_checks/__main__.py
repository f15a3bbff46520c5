"""python -m theory_checks [--json PATH] [-k PATTERN] [--area AREA] [--list]: same as `diffusion-lab check`."""
import sys

from diffusion_lab.cli import main

sys.exit(main(["check", *sys.argv[1:]], prog="python -m theory_checks"))
