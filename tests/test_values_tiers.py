"""Variables between tiers (--in, --out, %get, %put, %tiervars) in a real kernel: every
direction between native, process, wasm and sandbox, values compared exactly; and a sandboxed
cell that forges what it sends gets a clear error, with nothing run on the host."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_session import KernelSession
from tests.tier_support import need_tier

TIERS = ["process", "wasm", "sandbox"]

#: Values whose types every tier's numpy and pandas keep as they are (the sandbox image has
#: Debian's pandas 1.5, which has no string dtype and only nanosecond datetimes).
PORTABLE = """\
import numpy as np, pandas as pd
from tests.test_values_codec import same
V = {
    "scalars": [None, True, 2**70, -0.0, float("nan"), 1 + 2j, "é\\U0001f600", b"\\x00\\xff"],
    "nested": {"a": (1, [2, {"b": None}]), 3: b"x", (1, 2): "t"},
    "matrix": np.arange(12, dtype="int16").reshape(3, 4),
    "times": np.array(["2024-01-01T00:00:00.123", "NaT"], dtype="datetime64[ms]"),
    "scalar": np.float32(0.25),
    "frame": pd.DataFrame({
        "i": np.arange(3, dtype="int64"), "f": [0.5, np.nan, 1e300],
        "cat": pd.Categorical(["a", "b", "a"], categories=["b", "a"], ordered=True),
        "tz": pd.date_range("2024-03-30", periods=3, freq="D",
                            tz="Europe/Paris").astype("datetime64[ns, Europe/Paris]"),
        "when": pd.to_datetime(["2020-01-01", None, "2021-06-01"]).astype("datetime64[ns]"),
        "obj": pd.Series(["x", None, "z"], dtype=object),
        "n": pd.array([1, None, 3], dtype="Int64"),
        "b": [True, False, True],
        "td": pd.to_timedelta([1, 2, 3], unit="s").astype("timedelta64[ns]")},
        index=pd.Index([10, 20, 30], name="id")),
    "series": pd.Series([1.5, 2.5], name="s", index=pd.date_range(
        "2020-01-01", periods=2, freq="D", name="day").astype("datetime64[ns]")),
}
"""


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSession]:
    session = KernelSession(extra_arguments=["--TierKernel.value_limit=64m"],
                            cwd=str(Path(__file__).resolve().parent.parent))
    ok = session.run(PORTABLE)
    assert ok.status == "ok", ok.error
    yield session
    session.close()


def run_ok(session: KernelSession, code: str) -> str:
    out = session.run(code, timeout=120)
    assert out.status == "ok", (code, out.error, out.stdout)
    return out.stdout


@pytest.mark.parametrize("tier", TIERS)
def test_native_values_go_to_a_tier_and_come_back_exactly(kernel: KernelSession, tier: str):
    need_tier(tier)
    seen = run_ok(kernel, f"%%tier {tier} --in V --out W\nW = V\n"
                          "print(type(V['frame']).__name__, V['frame']['cat'].dtype, "
                          "type(V['matrix']).__name__, V['scalars'][2])")
    assert seen == "DataFrame category ndarray 1180591620717411303424\n"
    run_ok(kernel, "for k in V:\n    same(V[k], W[k])")


@pytest.mark.parametrize("source, target",
                         [(a, b) for a in TIERS for b in TIERS if a != b])
def test_a_value_made_in_one_tier_is_read_in_another(kernel: KernelSession, source: str,
                                                     target: str):
    need_tier(source)
    need_tier(target)
    name = f"made_{source}_{target}"
    run_ok(kernel, f"%%tier {source} --out {name}\nimport pandas as pd, numpy as np\n"
                   f"{name} = pd.DataFrame({{'k': pd.Categorical(['x', 'y']), "
                   f"'v': np.array([1.5, -2.0])}})")
    # The kernel has it now; the target's cell takes it from there.
    out = run_ok(kernel, f"%%tier {target} --in {name} --out back\n"
                         f"back = {name}.assign(w={name}.v * 2)\n"
                         f"print(list({name}.k), {name}.v.sum())")
    assert out == "['x', 'y'] -0.5\n"
    run_ok(kernel, f"same(back, {name}.assign(w={name}.v * 2))")


def test_get_put_and_tiervars_between_cells(kernel: KernelSession):
    need_tier("sandbox")
    need_tier("wasm")
    run_ok(kernel, "%%tier sandbox\nimport numpy as np\nkept = np.arange(6).reshape(2, 3)")
    assert run_ok(kernel, "%get sandbox kept") == "kept: from the sandbox tier into the kernel.\n"
    run_ok(kernel, "assert kept.sum() == 15 and kept.shape == (2, 3)")
    run_ok(kernel, "total = int(kept.sum()) + 1")
    assert run_ok(kernel, "%put wasm total") == "total: from the kernel into the wasm tier.\n"
    assert run_ok(kernel, "%%tier wasm\nprint(total)") == "16\n"
    table = run_ok(kernel, "%tiervars")
    kept_row = next(line for line in table.splitlines() if line.startswith("kept "))
    assert "native, sandbox" in kept_row and "numpy.ndarray" in kept_row
    # --in finds a name the kernel lacks in the tier that sent it last.
    run_ok(kernel, "%%tier sandbox --out later\nlater = {'v': [1, 2]}")
    run_ok(kernel, "del later")
    assert run_ok(kernel, "%%tier wasm --in later\nprint(later)") == "{'v': [1, 2]}\n"


def test_unsupported_and_unknown_names_say_what_to_do(kernel: KernelSession):
    need_tier("sandbox")
    out = kernel.run("%%tier sandbox --out f\nf = lambda: 1")
    assert out.status == "error" and out.error["ename"] == "ValueTransferError"
    assert "builtins.function" in out.error["evalue"] and "supported" in out.error["evalue"]
    out = kernel.run("%%tier sandbox --in nowhere\npass")
    assert out.error["ename"] == "ValueTransferError" and "%get TIER nowhere" in out.error["evalue"]
    out = kernel.run("%%tier sandbox --out missing_here\npass")
    assert "not defined in this tier" in out.error["evalue"]
    out = kernel.run("%%tier sandbox --in 1x\npass")
    assert out.error["ename"] == "TierUsageError" and "variable names" in out.error["evalue"]
    out = kernel.run("%tier sandbox --in V")  # IPython shows a magic's UsageError on stderr
    assert out.status == "error" and "that cell's %%tier line" in out.stderr
    out = kernel.run("%put remote V")
    assert out.error["ename"] == "ValueTransferError" and "does not take or send variables" \
        in out.error["evalue"]
    out = kernel.run("x = 1\n%get sandbox kept")
    assert out.status == "error" and "cell of its own" in out.stderr


FORGE = """\
%%tier sandbox --out x
import base64, builtins, json, os, pickle, struct
agent = builtins.__tierkernel_agent__

def send(data):
    encoded = base64.b64encode(data).decode()
    for at in range(0, len(encoded), 1 << 19):
        agent.channel.send({"type": "values", "id": agent.cell_id,
                            "data": encoded[at:at + (1 << 19)],
                            "more": at + (1 << 19) < len(encoded)})

def blob(values, buffers=b"", sizes=()):
    header = json.dumps({"values": values, "buffers": list(sizes)}).encode()
    return b"TKV1" + struct.pack(">I", len(header)) + header + buffers

class Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tierkernel-planted-by-sandbox",))

x = 1
"""

FORGED = {
    "a pickle": ("send(pickle.dumps({'x': Planted()}))", "not a tierkernel values blob"),
    "a huge nested list": (
        "send(blob({'x': {'t': 'list', 'items': [{'t': 'none'}] * 1_200_000}}))",
        "structure takes 17.2 MiB, over the limit of 8.0 MiB"),
    "a deep structure": (
        "send(b'TKV1' + struct.pack('>I', 400_000) + b'[' * 400_000)", "nested deeper"),
    "a false size": (
        "send(blob({'x': {'t': 'ndarray', 'dtype': '<f8', 'shape': [1 << 34], 'b': 0}},"
        " b'0' * 8, [8]))", "need 137438953472 bytes but come with 8"),
    "too many bytes": ("send(b'TKV1' + os.urandom(70 << 20))", "over their limit of 64.0 MiB"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_values_from_a_sandbox_are_refused_and_nothing_runs_on_the_host(
        kernel: KernelSession, name: str):
    need_tier("sandbox")
    marker = Path("/tmp/tierkernel-planted-by-sandbox")
    marker.unlink(missing_ok=True)
    code, says = FORGED[name]
    out = kernel.run(FORGE + code, timeout=120)
    assert out.status == "error" and out.error["ename"] == "ValueTransferError", out.error
    assert says in out.error["evalue"], out.error["evalue"]
    assert not marker.exists()
    assert not os.path.exists("/tmp/tierkernel-planted-by-sandbox")
    assert run_ok(kernel, "print('alive')") == "alive\n"
    assert run_ok(kernel, "%%tier sandbox\nprint(x)") == "1\n"  # the tier lives on too


def test_moves_are_in_the_audit_log_marked_down_in_trust(kernel: KernelSession):
    need_tier("sandbox")
    moved = kernel.run("%%tier sandbox --out audited\naudited = [1, 2, 3]")
    assert moved.status == "ok"
    record = kernel.run(f"%executions {moved.reply['execution_count']}")
    shown = "".join(o.content["data"]["text/plain"] for o in record.of_type("display_data"))
    assert "value" in shown and "audited: list, sandbox -> native (down in trust)" in shown
