"""bench/audit_callgrind.py's reading of callgrind_annotate output and its arithmetic.

The instruction counts are only as good as the parsing: a call-edge line counted as a
self cost, a Rust name cut at its first ``::`` or libcrypto left in the "without
libcrypto" figure would each print a plausible, wrong number.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # (bench/ is not a package; only for these imports)
try:
    import audit_callgrind as cg
finally:
    sys.path.remove(str(BENCH))

# The shape callgrind_annotate 3.19 prints (self costs), with an inclusive call edge and
# an inlined-from-header line mixed in as --inclusive/--tree output has them.
ANNOTATE = """\
--------------------------------------------------------------------------------
Profile data file 'callgrind-audit-on.out.1' (creator: callgrind-3.19.0)
--------------------------------------------------------------------------------
Events recorded:  Ir
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,862,166,734 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
143,562,000 ( 7.71%)  ???:0x000000000029ad80 [/usr/lib/x86_64-linux-gnu/libcrypto.so.3]
517,370,000 (27.78%)  /tmp/build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault [/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0]
 65,820,000 ( 3.53%)  /tmp/build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0]
  5,094,000 ( 0.27%)  /work/main/proxy/pgcloak/audit/_chain_core.c:chain_completed [/work/main/proxy/pgcloak/audit/_chain_core.cpython-311-x86_64-linux-gnu.so]
    540,000 ( 0.03%)  /root/.pyenv/versions/3.11.7/include/python3.11/object.h:chain_completed [/work/main/proxy/pgcloak/audit/_chain_core.cpython-311-x86_64-linux-gnu.so]
 49,074,450 ( 2.64%)  ???:pyo3::impl_::trampoline::noargs::<X> [/tmp/venv/lib/python3.11/site-packages/cryptography/hazmat/bindings/_rust.abi3.so]
149,443,230 ( 8.03%)  => /work/main/proxy/pgcloak/audit/_chain_core.c:hmac_hex (5,979x) [/work/main/proxy/pgcloak/audit/_chain_core.cpython-311-x86_64-linux-gnu.so]
 3,789,174 ( 0.20%)  >   /tmp/build/Python-3.11.7/Objects/call.c:PyObject_CallNoArgs (20,000x) [/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0]
  2,966,000 ( 0.16%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memcpy_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
          .           static int
"""


def test_annotate_output_is_read_as_self_costs() -> None:
    profile = cg.parse_annotate(ANNOTATE)
    assert profile.total == 1_862_166_734
    got = profile.by_function
    assert got[("libcrypto.so.3", "0x000000000029ad80")] == 143_562_000
    assert got[("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault")] == 517_370_000
    assert got[("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault'2")] == 65_820_000
    # One function inlined from two files: summed.
    assert got[("_chain_core.cpython-311-x86_64-linux-gnu.so", "chain_completed")] == 5_634_000
    # A Rust name keeps its "::" parts.
    assert got[("_rust.abi3.so", "pyo3::impl_::trampoline::noargs::<X>")] == 49_074_450
    # Call edges (=> and >) are not self costs.
    assert ("_chain_core.cpython-311-x86_64-linux-gnu.so", "hmac_hex") not in got
    assert ("libpython3.11.so.1.0", "PyObject_CallNoArgs") not in got
    assert len(got) == 6


def test_libraries_fall_into_their_groups() -> None:
    assert cg.group_of("_chain_core.cpython-311-x86_64-linux-gnu.so") == "pgcloak C: the chain"
    assert cg.group_of("_reply_core.cpython-311-x86_64-linux-gnu.so") == "pgcloak C: the session's calls"
    assert cg.group_of("libpython3.11.so.1.0") == "the interpreter (libpython)"
    assert cg.group_of("libcrypto.so.3").startswith("libcrypto")
    assert cg.group_of("libc.so.6") == "libc"
    assert cg.group_of("libcap.so.2") == "other"  # not libc


def _measured(target: str, transactions: int, counts: dict[tuple[str, str], int]) -> cg.Measured:
    return cg.Measured(target, "prepared", transactions, cg.Profile(sum(counts.values()), Counter(counts)))


def test_report_divides_by_transactions_and_leaves_the_crypto_libraries_out_when_asked() -> None:
    on = _measured(
        "audit-on",
        2000,
        {
            ("libpython3.11.so.1.0", "f"): 1_600_000_000,
            ("libcrypto.so.3", "sha"): 200_000_000,
            ("libcrypto.so.3", "OPENSSL_cleanse"): 20_000_000,
        },
    )
    # The same blind-index work in cryptography's OpenSSL in audit-off: it nets out.
    off = _measured(
        "audit-off", 1000, {("libpython3.11.so.1.0", "f"): 700_000_000, ("_rust.abi3.so", "OPENSSL_cleanse"): 10_000_000}
    )
    summary = cg.report([on, off], plain=True)["prepared"]
    assert summary["audit_on"] == pytest.approx(910_000)
    assert summary["audit_off"] == pytest.approx(710_000)
    assert summary["added"] == pytest.approx(200_000)
    assert summary["added_without_crypto"] == pytest.approx(100_000)
    assert summary["by_library"]["the interpreter (libpython)"] == pytest.approx(100_000)
