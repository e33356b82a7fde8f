"""aigis: a secured gRPC service for AI systems.

The import package is laid over the repository's folders (see pyproject.toml): ``aigis.server``,
``aigis.auth``, ``aigis.tools``, ``aigis.client_sdk``, ``aigis.benchmarks``, and the generated
protocol packages ``aigis.calculator.v1`` and ``aigis.classifier.v1`` under their proto names.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aigis")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled checkout
    __version__ = "0+unknown"
