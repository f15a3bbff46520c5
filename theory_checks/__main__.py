"""python -m theory_checks [--json PATH] [-k PATTERN] [--only NAME] [--area AREA] [--list]: same as
`diffusion-lab check` (``--only NAME`` is ``-k NAME``).

Check names start with their area (``langevin.corrector_keeps_p_t``); a name with a former letter prefix
(``F.corrector_keeps_p_t``) is translated with a message naming the current spelling.
"""
import sys
import warnings

from diffusion_lab.cli import main


def _argv(argv: list[str]) -> list[str]:
    """--only NAME (and --only=NAME) as -k NAME."""
    out = []
    for a in argv:
        if a == "--only":
            out.append("-k")
        elif a.startswith("--only="):
            out.append("--filter=" + a[len("--only="):])
        else:
            out.append(a)
    return out


warnings.simplefilter("default", UserWarning)
warnings.formatwarning = lambda msg, *a, **k: f"note: {msg}\n"
sys.exit(main(["check", *_argv(sys.argv[1:])], prog="python -m theory_checks"))
