"""A tier module that cannot be imported (it needs a library that is not installed)."""

raise ImportError("echo-broken needs the frobnicator library, which is not installed")
