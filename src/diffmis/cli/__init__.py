"""Command-line interface (argument parsing only; the library never imports this package)."""
