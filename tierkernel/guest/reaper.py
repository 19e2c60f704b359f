"""Runs the process tier's agent and ends every process of its cells when the agent ends.

    python reaper.py IN_FD OUT_FD -- PYTHON AGENT_PATH

The kernel starts this in a session of its own, with a control pipe on stdin, a status pipe
on stdout, and the agent's two protocol pipe ends passed as ``IN_FD`` and ``OUT_FD``. The agent
is started as this process's child with those pipes as its stdin and stdout, so requests and
replies go straight between the kernel and the agent: this process is never on their way.

Linux's child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) makes every orphan of the agent's
tree this process's child instead of PID 1's, so a cell's ``setsid`` or double fork cannot leave
the tree. When the agent ends, when the kernel closes the control pipe (it ended, or it is
stopping the agent), or on SIGTERM, every descendant is stopped at once and killed (SIGSTOP to
all, then SIGKILL to all, until none remain: nothing can fork past it) and reaped, and this
process exits. The agent's process group is killed too, which is all that can be done where
there is no subreaper (then a descendant that left the group can survive).

Status lines the kernel reads on stdout:

- ``agent PID SUBREAPER``: the agent's pid, and 1 if this process is its tree's subreaper, 0 if
  not (with the reason on stderr);
- ``exit CODE``: the agent ended; CODE as ``subprocess`` gives it (negative: killed by that
  signal).

Standard library only, like everything the guest runs.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

#: prctl option (linux/prctl.h): orphaned descendants are re-parented to the caller.
PR_SET_CHILD_SUBREAPER = 36
#: Rounds of stop-and-kill before giving up on a descendant that will not go (one in
#: uninterruptible sleep on a hung mount): each round waits a little for the kills to land.
KILL_ROUNDS = 200


def set_subreaper() -> str | None:
    """Make this process its descendants' subreaper; None on success, else why it failed."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError, ImportError) as exc:
        return f"prctl is not available: {exc!r}"
    return None


def descendants(root: int) -> dict[int, str]:
    """The live processes under ``root`` (by parent links in /proc), with their states.

    Zombies are left out: they are dead, and reaped by their parent (this process, once their
    parents are killed: orphans come here). Threads are not processes here: /proc lists only
    thread-group leaders, and a signal to the leader reaches the whole group.
    """
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                # The command name (field 2) may hold spaces and parentheses: split after it.
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        try:
            pid, state, ppid = int(name), fields[0].decode(), int(fields[1])
        except (IndexError, ValueError):
            continue
        parents[pid] = ppid
        states[pid] = state
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        todo.extend(children.get(pid, ()))
        if states[pid] not in ("Z", "X"):
            found[pid] = states[pid]
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):  # gone already (nothing more to do then)
        os.kill(pid, sig)


def reap(agent: int, status: list[int]) -> bool:
    """Reap every child that has ended (when the agent is one, note its exit code); whether
    any child is left."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == agent and not status:
            code = (-os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status)
                    else os.WEXITSTATUS(wait_status))
            status.append(code)
            report(f"exit {code}")


def kill_tree(agent: int, status: list[int]) -> int:
    """Stop, kill and reap every descendant; the number left (0 unless one would not die)."""
    me = os.getpid()
    left: dict[int, str] = {}
    for _ in range(KILL_ROUNDS):
        # The agent's process group first, in one call: whatever a cell started without
        # leaving the group stops at once, a process that forks and exits in a loop included
        # (a look through /proc is slower than its forks and would chase it for ever).
        with contextlib.suppress(OSError):  # none of the group left
            os.killpg(agent, signal.SIGSTOP)
        # Then the rest, all of them, looking again until the look finds no new one: what
        # left the group (setsid) came here as an orphan, and is stopped before its next
        # fork, so the kills below leave no child of it behind.
        stopped: set[int] = set()
        while True:
            fresh = [pid for pid in descendants(me) if pid not in stopped]
            if not fresh:
                break
            for pid in fresh:
                _signal(pid, signal.SIGSTOP)
            stopped.update(fresh)
        # The group as a whole (without a subreaper, all that can still be reached of what
        # left the tree), then everything found.
        with contextlib.suppress(OSError):
            os.killpg(agent, signal.SIGKILL)
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
        reap(agent, status)
        left = descendants(me)
        if not left:
            # Only the dead are left, each this process's child by now (a parent's exit
            # hands its children over before it becomes a zombie): reap them all, so that
            # nothing is left for PID 1, which may not reap.
            deadline = time.monotonic() + 2.0
            while reap(agent, status) and time.monotonic() < deadline:
                time.sleep(0.005)
            return 0
        time.sleep(0.01)  # the kills are landing (a process in the kernel takes a moment)
        reap(agent, status)
    return len(left)


def report(line: str) -> None:
    """One status line to the kernel, on stdout (it may be gone: then nobody needs it)."""
    with contextlib.suppress(OSError):
        os.write(1, (line + "\n").encode())


def start_agent(argv: list[str], in_fd: int, out_fd: int) -> int:
    """Fork and exec the agent with ``in_fd``/``out_fd`` as its stdin/stdout; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: as little as can be until the exec
        try:
            # A process group of its own: a cell's `kill 0` reaches the agent's group, never
            # this process, which then cleans up after it.
            os.setpgid(0, 0)
            os.dup2(in_fd, 0)
            os.dup2(out_fd, 1)
            for fd in (in_fd, out_fd):
                if fd > 2:
                    os.close(fd)
            # Signals this process handles are reset by the exec, but not ignored ones: these
            # two Python ignores are given back their defaults (as subprocess does).
            for name in ("SIGPIPE", "SIGXFSZ"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            # Every other descriptor of this process is close-on-exec (Python's default).
            os.execvp(argv[0], argv)
        except BaseException as exc:
            try:
                os.write(2, f"reaper: could not start the agent: {exc!r}\n".encode())
            finally:
                os._exit(127)
    # Here too, so that the group exists before this process can signal it (either call
    # may come first; the later one fails harmlessly once the child has exec'd).
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    return pid


def main() -> int:
    """Start the agent, wait for its end (or the kernel's word), end its tree, exit."""
    args = sys.argv[1:]
    if len(args) < 4 or args[2] != "--":
        os.write(2, b"usage: reaper.py IN_FD OUT_FD -- PYTHON AGENT_PATH\n")
        return 2
    in_fd, out_fd, argv = int(args[0]), int(args[1]), args[3:]
    ending: list[str] = []
    # Signals only wake the loop below, through the wakeup pipe; SIGINT too (it is the
    # agent's: the kernel sends it to the agent's pid, but a stray one must not end this).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: ending.append("SIGTERM"))
    signal.signal(signal.SIGHUP, lambda *_: ending.append("SIGHUP"))
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    why_not = set_subreaper()
    if why_not is not None:
        os.write(2, f"reaper: {why_not}; a cell's processes that leave the agent's process "
                    "group will outlive it\n".encode())
    agent = start_agent(argv, in_fd, out_fd)
    os.close(in_fd)
    os.close(out_fd)
    report(f"agent {agent} {0 if why_not else 1}")
    status: list[int] = []
    while not status and not ending:
        try:
            ready, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            ready = []
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        if 0 in ready:
            try:
                data = os.read(0, 512)
            except OSError:  # not readable any more: as good as closed
                data = b""
            if not data:
                ending.append("the kernel closed the control pipe")
        reap(agent, status)
    left = kill_tree(agent, status)
    if left:
        os.write(2, f"reaper: {left} process(es) would not die\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
