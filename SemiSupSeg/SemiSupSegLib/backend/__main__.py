"""``python -m SemiSupSegLib.backend``: the same command line as ``semisupseg``."""

from SemiSupSegLib.backend.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
