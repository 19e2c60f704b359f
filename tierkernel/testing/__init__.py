"""Contract suites for third-party tiers and fsx stores, as fsspec ships its abstract tests.

- :mod:`tierkernel.testing.tier`: :class:`~tierkernel.testing.tier.TierContract`, the kernel
  tests every tier passes (Jupyter protocol conformance through jupyter_kernel_test, plus
  what the tier contract promises: reply metadata, interrupts, timeouts, the shared
  workspace), run in a real kernel against a tier named in the registry.
- :mod:`tierkernel.testing.fsx`: :class:`~tierkernel.testing.fsx.FsxContract`, the filesystem
  tests every fsx store passes (content, errno of each failure, quotas).

tierkernel's own tiers and stores run these same suites (``tests/test_conformance.py``,
``tests/fsx/test_backends.py``). They need test dependencies (pytest 8.4 or later
for both, jupyter_kernel_test for the tier suite; ``tierkernel[test]`` has them), so the kernel
never imports this package; import the submodule you need from your test modules.
"""
