"""``python -m probekit``: the same command line as ``probekit``."""

from probekit.cli import run  # type: ignore[import-not-found]  # installed from cli/

if __name__ == "__main__":
    run()
