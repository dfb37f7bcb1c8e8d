"""``homemx-provision``: the provisioning tasks of provision/fabfile.py as one installed command.

    homemx-provision both --site site.toml [--dry-run]
    homemx-provision gateway|backend|check --site site.toml
    homemx-provision --list / --help / both --help

It is Fabric's own ``fab`` program with this package's tasks built in, so it needs no ``-r``, no
fabfile on the search path and no particular current directory (``fab -r provision …`` from a
checkout does the same).
"""

from __future__ import annotations


def main() -> None:
    """Run a provisioning task; arguments as ``fab`` takes them, minus the collection options."""
    from fabric import Config, Executor
    from fabric.main import Fab
    from invoke import Collection

    from provision import fabfile

    Fab(name="homemx-provision", binary="homemx-provision", version="homemx " + _version(),
        namespace=Collection.from_module(fabfile), executor_class=Executor, config_class=Config).run()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("homemx")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
