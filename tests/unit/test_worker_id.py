"""Worker ids key leases and heartbeats: two worker processes must never share one, even
with one host name and one pid (containers on the host network were all `vm-6`)."""

from __future__ import annotations

import os
import re
import socket

from workers.worker import default_worker_id


def test_worker_ids_are_unique_even_for_one_host_and_pid() -> None:
    ids = {default_worker_id() for _ in range(100)}
    assert len(ids) == 100
    prefix = re.escape(f"{socket.gethostname()}-{os.getpid()}-")
    assert all(re.fullmatch(prefix + "[0-9a-f]{8}", worker_id) for worker_id in ids)
