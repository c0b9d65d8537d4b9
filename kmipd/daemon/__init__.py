"""Running the daemon: config, assembly, supervision (signals, systemd), logging, metrics, checks.

`run_daemon` assembles store, HSM, audit, service and server from a checked `Config`
and serves until told to stop; everything else here is what an operator's tools see of it.
"""

from kmipd.daemon._assembly import RunningDaemon, open_hsm, open_store, run_daemon

__all__ = ["RunningDaemon", "open_hsm", "open_store", "run_daemon"]
