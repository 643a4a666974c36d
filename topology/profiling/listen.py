"""Rendezvous stores that listen on one address, at a port nobody can take first.

torch's ``TCPStore(host, port, is_master=True)`` binds every interface
(``::``) whatever ``host`` says, and ``host`` only tells clients where to
connect. A store server that anyone on the network can reach lets them
join the group or feed it keys, so the project never starts one that way:
it binds a socket to the node's cluster address itself, at port 0 (the
kernel picks a free one, so there is no window between choosing a port and
listening on it), and hands that socket to the store through
``master_listen_fd``. The store's ``port`` is then published to the other
ranks.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist


def bound_socket(ip: str) -> socket.socket:
    """A TCP socket bound to ``ip`` at a port the kernel chose (read it with ``getsockname()[1]``)."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((ip, 0))
    except OSError:
        sock.close()
        raise
    return sock


def store_server(ip: str, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server listening on ``ip`` only; clients connect to ``(ip, store.port)``.

    The store owns the socket from here on (it closes it when it goes).
    """
    sock = bound_socket(ip)
    port = sock.getsockname()[1]
    fd = sock.detach()
    try:
        return dist.TCPStore(ip, port, None, True, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise
