"""`python -m kn_tutorial.atlas build-world | train | report | probe`: forwards to `kn_tutorial.atlas_build.cli`.

This entry point is the one place where the data package `kn_tutorial.atlas` reaches up into the
build layer (`kn_tutorial.atlas_build`, which imports the methods), and it does so only when run:
nothing imports this module. See `kn_tutorial.atlas_build.cli` for the commands and their options.
"""
from __future__ import annotations


def main(argv=None) -> None:
    from ..atlas_build.cli import main as cli_main  # the build layer, imported only when the command runs

    cli_main(argv)


if __name__ == "__main__":
    main()
