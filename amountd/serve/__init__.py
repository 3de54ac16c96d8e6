"""`amountd serve`, by job: listeners (listeners.py), one subscriber's connection
(connection.py), the pump from the source through the table to the broker (pump.py),
the daemon's parts: systemd, signals and SIGHUP, metrics, status (daemon.py,
systemd.py), and the settings (config.py); server.py puts them together.

    from amountd.serve import ServeConfig, serve
    await serve(ServeConfig(unix="/run/amountd/amountd.sock"))
"""

from __future__ import annotations

from .config import ServeConfig, check_config
from .daemon import Service, serve_config
from .server import Server, serve

__all__ = ["ServeConfig", "Server", "Service", "check_config", "serve", "serve_config"]
