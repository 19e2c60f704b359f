"""Every exception tierkernel raises, and every error name a user sees in a cell, in one tree.

The base of the tree is :class:`TierkernelError`; catch it to handle whatever tierkernel itself
refused or could not do. Each branch below it is one part of the kernel::

    BaseTierkernelError (BaseException)   the root; catch it to include CellTimeoutError too
    ├── CellTimeoutError (KeyboardInterrupt)  a native cell ran past its --timeout
    └── TierkernelError (Exception)           the base of everything else
        ├── UsageError                what the user asked for cannot be done as asked: a
        │                             %%tier line, a cell over its size, an image's packages
        ├── TierError                 a tier could not run the cell (the cell's own code did
        │                             not fail): unavailable, its agent or container, its image
        ├── CellLimitError            a cell went over a limit the host counts; the cell ends
        │                             with the error's name, the kernel and the tier stay usable
        ├── FsxError                  the virtual filesystem: its configuration, its quotas,
        │                             the copies between a tier and the workspace
        ├── HelperError               a call a cell makes to the host (ai, api, db, console,
        │                             %pip, input()) was refused or failed
        ├── ValueTransferError        a variable could not move between tiers (--in, --out,
        │                             %get, %put): its type, its size, or a malformed value
        └── ApiError                  a request tierkernel serve refuses (an HTTP status)

Conventions:

- A domain error also subclasses the builtin a caller would catch for that failure, so code
  written for the builtin keeps working: :class:`FsxQuotaError` is an ``OSError`` with its
  errno (EDQUOT, EFBIG...), so ``except OSError`` handles a full workspace as a full disk;
  :class:`TierUsageError` is a ``ValueError``; :class:`AddressRefused` a ``PermissionError``.
- A failure of a library underneath (Docker, wasmtime, httpx) is translated where it happens,
  ``raise EngineError("what went wrong and what to do") from exc``, so a user reads one line
  that says what to do, never the library's traceback.
- The message of each error says what was wrong and how to fix it.
- The names users see are the classes' names: a tier reports a cell that went over its output
  limit as ``OutputLimitError.__name__``, never as a string of its own, so each name is
  defined here once, with a docstring that says what it means.

:class:`CellTimeoutError` is the one error that is not an ``Exception``: it ends a native
cell the way the stop button does (a ``KeyboardInterrupt``), so the user's ``except
Exception`` cannot swallow the end of the cell's time. That is why the root is a
``BaseException``, as ``BaseExceptionGroup`` is the root of ``ExceptionGroup``.

Code inside ``tierkernel/guest/`` is not in this tree: it runs inside the guests, where only
the standard library is; the names it shares with the host are in
:mod:`tierkernel.guest.protocol`.
"""

from __future__ import annotations

# The one import: stdlib-only guest code, below every other package, so this module stays
# importable from anywhere. CellTimeoutError ends its traceback as a helper's error does.
from tierkernel.guest.helpers import ipython_traceback


class BaseTierkernelError(BaseException):
    """The root of every tierkernel exception, :class:`CellTimeoutError` included.

    Catch :class:`TierkernelError` instead unless the handler is also meant for the end of a
    native cell's time (which, like the stop button, should normally pass through)."""


class TierkernelError(BaseTierkernelError, Exception):
    """The base of every error tierkernel raises or reports by name (see the module's tree).

    ``except TierkernelError`` catches whatever the kernel, a tier, fsx or the runtime
    helpers refused or could not do. Each concrete error also subclasses the builtin its
    callers would catch (``OSError``, ``ValueError``, ``PermissionError``, ...), so
    ``except OSError`` still handles an fsx quota error with its errno."""


class CellTimeoutError(BaseTierkernelError, KeyboardInterrupt):
    """Raised inside a native cell that ran past its ``--timeout``.

    A ``KeyboardInterrupt`` (what the stop button raises), not a ``TimeoutError``: code that
    retries on errors (``except Exception``, or ``except socket.timeout``, which is
    ``TimeoutError``, as HTTP clients do) must not take the end of the cell's time for one
    more error to retry, and IPython's and ipykernel's own code, written to survive a click
    of the stop button at any moment, survives the timeout the same way."""

    def _render_traceback_(self) -> list[str]:
        """IPython's traceback, ending at the cell's line that was running rather than in
        the tier's signal handler (as IPython shows a KeyboardInterrupt)."""
        return ipython_traceback(self)


# -- usage: what the user wrote cannot be done as written ------------------------------------
class UsageError(TierkernelError):
    """The base of the errors about what the user asked for (a magic line, a cell, the
    packages of an image) that cannot be done as asked; the message says what to change."""


class TierUsageError(UsageError, ValueError):
    """A ``%%tier``/``%tier`` line the kernel cannot act on; the message says how to fix it."""


class CellTooLargeError(UsageError, ValueError):
    """A cell over ``c.Runtime.code_size_limit``: refused before it runs."""


class ExtrasError(UsageError, ValueError):
    """An extra package that cannot go into a sandbox image; the message says which and why."""


# -- tiers: the tier, not the cell's code, could not run the cell -----------------------------
class TierError(TierkernelError):
    """A tier could not run a cell: the cell's own code did not fail, the tier did.

    Also the name of the error a cell ends with when its tier raised something unexpected
    (the kernel catches it, says the kernel is fine, and points to ``%tier``)."""


class TierUnavailableError(TierError, RuntimeError):
    """A cell asked for a tier that cannot run here; the message says why and what to do."""


class TierSessionLost(TierError):
    """A tier's session ended under its cell (the agent died) or could not be opened; the
    cell ends with this name. The session's variables are gone, and the next cell of that
    tier starts a new session."""


class RemoteStreamError(TierError):
    """A ``tierkernel serve``'s answer to a remote cell broke the rules: more than the cell
    may send (``c.RemoteBackend.max_response_bytes``), or an event that is not JSON."""


class RemoteSessionGone(TierError):
    """The server no longer has the kernel's remote session (idle too long, or restarted):
    the remote tier starts a new one."""


class TierStartInterrupted(TierError):
    """A cell was stopped while it waited for its tier to start (the wasm runtime compiling);
    the tier goes on starting in the background."""


class AgentStartError(TierError, RuntimeError):
    """A tier's interpreter agent did not come up; the message says why and what to check."""


class LineTooLong(TierError, OSError):
    """An agent sent a message line longer than the session's line limit (a transport raises
    it from ``readline``). The rest of that line is never read: the channel is out of step, so
    the agent is killed."""


class ChannelError(TierError, OSError):
    """A sandbox agent did not connect over its socket; the message says why."""


class EngineError(TierError, RuntimeError):
    """The Docker engine could not do what the sandbox tier asked; the message says why and
    what to do about it."""


class ImageBuildError(TierError, RuntimeError):
    """The sandbox image could not be built; the message says what is missing or what
    failed."""


# -- limits: a cell went over what the host allows it ----------------------------------------
class CellLimitError(TierkernelError):
    """The base of the errors a cell ends with when it goes over a limit the host counts
    (whatever a guest can make the host allocate, write, spawn or wait for is counted on the
    host against a limit the guest cannot raise): that cell ends with the error's name, the
    kernel and the other cells are unaffected. A tier reports these by name in the cell's
    error; they are not raised on the host."""


class OutputLimitError(CellLimitError):
    """A cell's output went over the tier's output limit; the rest of it was dropped and
    the cell was stopped."""


class ChannelLimitError(CellLimitError):
    """A cell sent the host more messages or bytes than its channel to the kernel allows;
    the cell was stopped."""


class ProcessLimitError(CellLimitError):
    """A sandbox cell's processes filled the container's process limit and kept it full, so
    the container was removed (its variables and files with it)."""


class WorkspaceCopyError(CellLimitError):
    """What a cell changed in its tier's folder was over the copy-back budget
    (``copy_back_bytes``/``copy_back_files``), so none of it was copied into the workspace."""


# -- fsx: the virtual filesystem -------------------------------------------------------------
class FsxError(TierkernelError):
    """The base of the virtual filesystem's own errors. (A missing file or a file in the way
    is the builtin ``FileNotFoundError``/``FileExistsError`` with its errno, as on a disk.)"""


class FsxConfigError(FsxError, ValueError):
    """A workspace URL or option that fsx cannot use; the message says which and why."""


class FsxQuotaError(FsxError, OSError):
    """A write refused because it would take the workspace over one of its quotas.

    An ``OSError`` (errno EDQUOT, EFBIG or ENAMETOOLONG), so code that handles a full disk
    handles it; ``setting`` is the quota's name in ``c.Fsx`` (``"max_bytes"``...).
    """

    setting: str = ""


class UnsafeArchiveError(FsxError, ValueError):
    """A tar from a container that fsx refuses to apply; nothing was applied."""


class CopyBudgetError(FsxError, OSError):
    """A copy back over its budget (``fsx.sync.Budget``); nothing was applied."""


class CopyStopped(FsxError, OSError):
    """A copy back stopped (the cell was interrupted or ran out of time); nothing applied."""


# -- helpers: the calls a cell makes to the host ----------------------------------------------
class HelperError(TierkernelError):
    """The base of the errors of the calls a cell makes to the host (``ai``, ``api``, ``db``,
    ``console``, ``%pip``, ``input()``). In a cell they arrive as the builtin named by the
    host's answer (:data:`tierkernel.guest.protocol.HELPER_ERROR_TYPES`)."""


class AddressRefused(HelperError, PermissionError):
    """The host name resolved only to addresses ``api()`` may not connect to."""


class PackageError(HelperError):
    """A ``%pip`` request that cannot be done; ``kind`` is the builtin the guest raises."""

    def __init__(self, message: str, kind: str = "RuntimeError") -> None:
        super().__init__(message)
        self.kind = kind


class InputNotAllowed(HelperError):
    """The cell's client does not take input (``allow_stdin`` false); the message is
    ipykernel's."""


class InputCancelled(HelperError):
    """An input wait ended because the cell was stopped."""


# -- values between tiers ----------------------------------------------------------------------
class ValueTransferError(TierkernelError, ValueError):
    """A variable could not move between a tier and the kernel (``--in``, ``--out``, ``%get``,
    ``%put``): a type that does not move, a value over ``c.TierKernel.value_limit``, a name
    no tier holds, or values a tier sent that are not well-formed data."""


# -- serve: the execution API ------------------------------------------------------------------
class ApiError(TierkernelError):
    """A request the execution API (``tierkernel serve``) refuses: ``status`` is the HTTP
    status, ``kind`` the short error name in the JSON answer, the message says what to do."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
