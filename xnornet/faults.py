"""Fault points for testing recovery: a process can be made to kill itself at a chosen moment.

``XNORNET_FAULT=NAME:N`` makes the N-th call of ``fault_point(NAME)`` in this process send
itself SIGKILL, as a power cut or ``kill -9`` would at that moment. Without the variable a
fault point costs one dictionary lookup. The names in use: ``save.begin`` (a checkpoint
write starts), ``save.written`` (the temporary file is complete, not yet renamed),
``save.replaced`` (renamed over the target), ``log.write`` (before a log line is appended)
and ``train.step`` (after a training step).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "XNORNET_FAULT"


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``XNORNET_FAULT`` names this point and this hit.

    The hits still to go are counted down in the variable itself (``NAME:N`` becomes
    ``NAME:N-1``), so the count is per process and no module state is needed.
    """
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    wanted, _, count = target.rpartition(":")
    if wanted != name:
        return
    if int(count) <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
    os.environ[FAULT_ENV] = f"{name}:{int(count) - 1}"
