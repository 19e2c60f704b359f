"""What every agent tier (process, wasm, sandbox) shares: their base class (``base.py``), the
host side of the agent session, the completion and inspection queries, and the view of the
notebook's own folder."""
