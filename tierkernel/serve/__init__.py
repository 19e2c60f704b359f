"""Service mode: tierkernel's execution API over HTTP (``tierkernel serve``).

``settings`` holds ``c.Serve.*`` and the tokens with their ceilings, ``cells`` turns a request
into the cell a kernel runs, ``sessions`` starts and speaks to the kernels (one per session,
through jupyter_client), ``app`` is the FastAPI application, ``command`` the CLI entry.
FastAPI and uvicorn are the ``serve`` extra: nothing here is imported by the kernel.
"""
