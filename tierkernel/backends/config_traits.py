"""Config traits shared by the tiers' settings (``ByteSize`` lives in ``tierkernel.sizes``,
below fsx, which uses it too; it is re-exported here for the tiers)."""

from __future__ import annotations

from tierkernel.sizes import ByteSize as ByteSize
