"""zstack-mn: a management-node daemon built on ZStack's stateless-services design."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zstack-mn")
except PackageNotFoundError:
    __version__ = "0+unknown"
"""The installed distribution's version (``pyproject.toml`` is its one source)."""
