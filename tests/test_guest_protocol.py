"""The agent protocol's names reach every guest: the agent as a file, and as one program."""

import json
import shutil
import subprocess
import sys

import pytest

from tierkernel.guest import agent, protocol

CELL = "import sys\nprint(sorted(m for m in sys.modules if 'protocol' in m))\n1 + 1"


def _run(argv: list[str], cwd: str) -> list[dict]:
    requests = [{"type": protocol.EXECUTE, "id": "c1", "code": CELL, "filename": "<cell>",
                 "first_line": 1, "execution_count": 1}, {"type": protocol.SHUTDOWN}]
    done = subprocess.run(argv, input="".join(json.dumps(r) + "\n" for r in requests),
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("how", ["program", "file"])
def test_an_agent_without_the_package_has_the_protocol(how, tmp_path):
    """-I -S: no tierkernel to import. The sandbox hands the agent to python3 -c (the program
    carries the protocol's source); the process tier runs the file (protocol.py beside it)."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    if how == "program":
        argv = [python, "-I", "-S", "-c", agent.agent_program()]
    else:
        argv = [python, "-I", "-S", agent.__file__]
    messages = _run(argv, str(tmp_path))
    assert [m["type"] for m in messages] == [protocol.READY, protocol.STREAM, protocol.RESULT,
                                            protocol.DONE]
    # Under its private name only: a cell's own module called "protocol" is not shadowed.
    assert messages[1]["text"] == "['tierkernel_protocol']\n"
    assert messages[2]["data"] == {"text/plain": "2"} and messages[3]["success"] is True

