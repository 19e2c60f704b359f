"""The agent protocol's names: what the host and every guest agent say to each other.

Standard library only, and nothing but constants, so that every guest has it before its agent
reads the first request. The host imports it as ``tierkernel.guest.protocol``; a guest has its
own copy, loaded by the agent at its start under the private name ``tierkernel_protocol``
(a cell's own module called ``protocol`` is never this one), which the other guest modules
import:

- process tier: the agent runs from its file, and loads this one from beside it;
- sandbox tier: the agent is handed to ``python3 -c`` (no file of tierkernel is in the
  container), and ``tierkernel.guest.agent.agent_program()`` puts this module's source into that
  program;
- wasm tier: the guest folder is mounted read-only in the guest, and the agent loads this
  module from beside itself, as in the process tier.

Messages are JSON objects with a ``"type"``, one per line on the agent's channel (stdin and
stdout, or the sandbox's socket); in the wasm tier one per call of the host tools (see
``tierkernel.guest.wasm_agent``)::

    host -> agent: EXECUTE {"id", "code", "filename", "first_line", "execution_count"
                            [, "inputs" (base64 values blob, set before the code runs),
                            "outputs" (names sent back after it ran), "values_limit"]}
                   INSTALL_HELPERS {"source"[, "packages_source", "packages_site"]}
                   INSTALL_MODULE {"name", "source"} (a guest module, e.g. ishell.py)
                   WATCH_RESET {}
                   INSTALL_WATCH {"source"} (tree_watch.py, for the agent's watched folder)
                   INSTALL_FILES {"source", "config"} (files.py: fsx://, the notebook)
                   PROCS {} | SHUTDOWN {}
                   UNPACK {"seq", "root", "data" (base64 tar), "delete"}
                   PACK {"seq", "root", "limit"}
                   TREE_STATE {"seq"} (did the watched folder change since the last cell?)
                   COMPLETE {"seq", "code", "cursor_pos"[, "budget"]}
                   INSPECT {"seq", "code", "cursor_pos", "detail_level"[, "budget"]}
                   HELPER_RESULT {"seq", "response"} (the answer to a helper call)
                   INPUT_REPLY {"seq", "value" | "error": {"type", "message"}}
    agent -> host: READY {"pid", "python"}
                   STREAM {"id", "name", "text"}
                   DISPLAY | RESULT {"id", "data", "metadata"}
                   CLEAR_OUTPUT {"id", "wait"}
                   ERROR {"id", "ename", "evalue", "traceback"}
                   DONE {"id", "success"[, "workspace_changed", "procs", "last_pid"]}
                   VALUES {"id", "data" (base64 values blob) | "error"} (an EXECUTE's
                   "outputs", before its DONE; see ``tierkernel.guest.values``)
                   PROCS {"count", "last_pid"}
                   UNPACKED {"seq"[, "error"]}
                   PACKED {"seq", "data" | "too_big"[, "error"]}
                   TREE_STATED {"seq", "changed"}
                   COMPLETED {"seq", "matches", "cursor_start", "cursor_end", "metadata"}
                   INSPECTED {"seq", "found", "data", "metadata"}
                   HELPER {"id", "seq", "request": {"helper", "args"}} (ai, api, db, console
                   and %pip's PIP, run on the host; seq None: refused, no answer)
                   INPUT_REQUEST {"id", "seq", "prompt", "password"} (input(), getpass() and
                   sys.stdin.readline() of a cell: the host asks the user on Jupyter's stdin
                   channel and answers with an INPUT_REPLY, read by the waiting cell itself)
                   PROTOCOL_ERROR {"detail"} (a request it could not read or carry out)
"""

# -- requests: host -> agent -------------------------------------------------------------------
EXECUTE = "execute"
INSTALL_HELPERS = "install_helpers"
INSTALL_MODULE = "install_module"
INSTALL_WATCH = "install_watch"
INSTALL_FILES = "install_files"
WATCH_RESET = "watch_reset"
#: A request (how many processes are there?) and its answer, under one name.
PROCS = "procs"
SHUTDOWN = "shutdown"
UNPACK = "unpack"
PACK = "pack"
TREE_STATE = "tree_state"
COMPLETE = "complete"
INSPECT = "inspect"
HELPER_RESULT = "helper_result"
INPUT_REPLY = "input_reply"

# -- messages: agent -> host -------------------------------------------------------------------
READY = "ready"
STREAM = "stream"
DISPLAY = "display"
RESULT = "result"
CLEAR_OUTPUT = "clear_output"
ERROR = "error"
DONE = "done"
UNPACKED = "unpacked"
PACKED = "packed"
TREE_STATED = "tree_stated"
COMPLETED = "completed"
INSPECTED = "inspected"
HELPER = "helper"
INPUT_REQUEST = "input_request"
PROTOCOL_ERROR = "protocol_error"
VALUES = "values"

#: The answer's type of each request that is answered by ``seq``.
ANSWERS = {UNPACK: UNPACKED, PACK: PACKED, TREE_STATE: TREE_STATED, COMPLETE: COMPLETED,
           INSPECT: INSPECTED}

# -- helper calls (a HELPER message's "request", and the broker's answer) ----------------------
#: How every refusal of a helper call made by work an earlier cell left running begins (the
#: agent's, the host's, the JavaScript relay's).
BACKGROUND_REFUSED = "background work of an earlier cell gets no helper access"
#: The helper of ``%pip``, beside ai, api, db and console; its request's ``args["op"]`` is one
#: of the PIP_ operations.
PIP = "pip"
PIP_INSTALL = "install"
PIP_FETCH = "fetch"
PIP_UNINSTALL = "uninstall"

#: The builtin exceptions a helper's refusal may name (``{"ok": false, "error": {"type",
#: "message"}}``); the guest raises anything else as RuntimeError.
HELPER_ERROR_TYPES = ("PermissionError", "ValueError", "TypeError", "TimeoutError",
                      "ConnectionError", "RuntimeError", "KeyError", "LookupError", "OSError")

#: The exceptions an INPUT_REPLY's error may name (the builtins, and IPython's
#: StdinNotImplementedError for a client that takes no input); anything else is RuntimeError.
STDIN_NOT_IMPLEMENTED = "StdinNotImplementedError"
INPUT_ERROR_TYPES = (STDIN_NOT_IMPLEMENTED, "EOFError", "KeyboardInterrupt", "ValueError",
                     "RuntimeError", "PermissionError")
