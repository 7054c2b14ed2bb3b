"""``python -m probekit``: the same command line as ``probekit``."""

from probekit.cli import run

if __name__ == "__main__":
    run()
