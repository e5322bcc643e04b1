"""``python -m diffmis ...`` (used under ``torchrun -m diffmis train ...``)."""

from diffmis.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
