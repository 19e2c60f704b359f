"""The error tree: every exception class of the package is in tierkernel.errors, under its root.

A new exception defined anywhere else in the package (outside tierkernel/guest/, which runs
inside the guests with the standard library only) fails here.
"""

import errno
import importlib
import inspect
import pkgutil

import pytest

import tierkernel
from tierkernel import errors
from tierkernel.errors import BaseTierkernelError, TierkernelError


def _import_every_module() -> None:
    for info in pkgutil.walk_packages(tierkernel.__path__, "tierkernel."):
        # The guest's code is not part of the tree; __main__ starts the kernel's fork.
        if info.name.startswith("tierkernel.guest") or info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)


def _package_exceptions() -> list[type[BaseException]]:
    _import_every_module()
    found, pending = [], [BaseException]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        module = cls.__module__
        if module.startswith("tierkernel.") and not module.startswith("tierkernel.guest"):
            found.append(cls)
    return found


def test_every_exception_of_the_package_is_in_the_tree():
    found = _package_exceptions()
    assert len(found) >= 30, found
    outside = [f"{cls.__module__}.{cls.__qualname__}" for cls in found
               if cls.__module__ != "tierkernel.errors"]
    assert not outside, f"define these in tierkernel/errors.py, under its tree: {outside}"
    rootless = [cls.__name__ for cls in found if not issubclass(cls, BaseTierkernelError)]
    assert not rootless


def test_only_the_timeout_is_not_an_exception():
    """CellTimeoutError ends a cell as the stop button does; everything else is an Exception
    under TierkernelError, so ``except Exception`` code keeps catching it."""
    for cls in _package_exceptions():
        if cls in (BaseTierkernelError, errors.CellTimeoutError):
            continue
        assert issubclass(cls, TierkernelError), cls
    assert issubclass(errors.CellTimeoutError, KeyboardInterrupt)
    assert not issubclass(errors.CellTimeoutError, Exception)


def test_every_error_says_what_it_is_for():
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, BaseException):
            assert cls.__doc__ and cls.__doc__ != BaseException.__doc__, name


@pytest.mark.parametrize(("error", "branch", "builtin"), [
    (errors.TierUsageError, errors.UsageError, ValueError),
    (errors.CellTooLargeError, errors.UsageError, ValueError),
    (errors.TierUnavailableError, errors.TierError, RuntimeError),
    (errors.EngineError, errors.TierError, RuntimeError),
    (errors.LineTooLong, errors.TierError, OSError),
    (errors.FsxQuotaError, errors.FsxError, OSError),
    (errors.FsxConfigError, errors.FsxError, ValueError),
    (errors.CopyBudgetError, errors.FsxError, OSError),
    (errors.AddressRefused, errors.HelperError, PermissionError),
    (errors.OutputLimitError, errors.CellLimitError, Exception),
])
def test_a_domain_error_is_also_the_builtin_its_callers_catch(error, branch, builtin):
    assert issubclass(error, branch) and issubclass(error, builtin)


def test_an_fsx_quota_error_keeps_its_errno():
    exc = errors.FsxQuotaError(errno.EDQUOT, "over the workspace's quota", "/big")
    assert isinstance(exc, OSError) and exc.errno == errno.EDQUOT and exc.filename == "/big"
