"""The runtime helpers ``ai``, ``api``, ``db`` and ``console``, run on the host under a policy.

- :mod:`~tierkernel.runtime.policy`: ``c.Runtime`` configuration and each cell's policy;
- :mod:`~tierkernel.runtime.broker`: the one JSON entry point every tier forwards calls to;
- :mod:`~tierkernel.runtime.api`, :mod:`~tierkernel.runtime.db`, :mod:`~tierkernel.runtime.ai`:
  the helpers themselves (console lives in the broker: it only records);
- :mod:`~tierkernel.runtime.audit`: the execution audit log behind ``%executions``;
- :mod:`~tierkernel.runtime.host`: what the kernel holds of all this.

The guest side (what a cell calls) is :mod:`tierkernel.guest.helpers`.
"""
