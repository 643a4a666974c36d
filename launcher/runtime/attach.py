"""Which Ray cluster a command uses: one rule for every command that needs Ray.

``--address`` or, failing that, ``RAY_ADDRESS`` (set by ``ray job submit``)
names a cluster to join; without either the command starts an embedded Ray
of its own on this machine. It never joins a cluster nobody named: plain
``ray.init()`` would attach to whatever Ray happens to run here (another
user's, another job's), and a profile or a run of that cluster is wrong
without a word. ``--address auto`` is the explicit way to join the cluster
started on this machine with ``ray start``.
"""

from __future__ import annotations

import logging
import os
import socket
from types import ModuleType

from topology.errors import ConfigError

ADDRESS_HELP = ("Ray cluster to join: the head's GCS host:port, ray://host:10001, or auto (the one `ray start` runs on "
                "this machine); default RAY_ADDRESS (set inside `ray job submit`), else an embedded Ray for this command only")


def attach(address: str | None, modules: list[ModuleType], num_cpus: int | None = None, num_gpus: int | None = None,
           verbose: bool = False) -> str:
    """``ray.init`` by the rule above; returns one line saying which cluster it is, for the log.

    Parameters
    ----------
    address : ``--address`` (None: RAY_ADDRESS, else embedded).
    modules : packages the cluster's workers import; shipped with the connection (``py_modules``)
        unless this driver runs inside a Ray job, whose working_dir carries them already.
    num_cpus, num_gpus : size of an embedded Ray (None: what this machine has).
    verbose : let the workers' stdout and stderr through to this console (Ray's ``log_to_driver``).

    Raises
    ------
    ConfigError
        The named address does not accept connections, or Ray cannot join it.
    """
    import ray

    source = "--address" if address else "RAY_ADDRESS"
    target = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    if not target or target == "local":
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        return (f"started an embedded Ray on this machine ({cpus} CPUs); "
                "give --address or RAY_ADDRESS to use a cluster")
    if target != "auto":
        check_reachable(target)
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set in every job driver

    if RAY_JOB_CONFIG_JSON_ENV_VAR not in os.environ:
        kwargs["runtime_env"] = {"py_modules": modules}
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster at {target!r} ({source}): {exc}; start one with `ray start --head` "
                          f"or fix {source}") from None
    return f"joined the Ray cluster at {target} ({source}): {len([n for n in ray.nodes() if n['Alive']])} node(s)"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError naming ``address`` if nothing accepts TCP connections there.

    ``ray.init`` on an unreachable address retries for minutes before it gives up.
    """
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port; give the head's GCS address, e.g. 10.0.0.1:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
                          "or fix --address / RAY_ADDRESS") from None
