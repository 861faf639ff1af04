"""Import heavy optional dependencies where they are used, with an error that names the extra."""

import importlib

from ticknorm.base.errors import MissingDependencyError


def require(module: str, extra: str):
    """Import `module` or raise one sentence saying which `pip install ticknorm[extra]` fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed ({exc}); install it with: pip install 'ticknorm[{extra}]'"
        ) from exc
