"""``workbench serve``: the whole service on one machine.

Starts (unless given URLs) a private redis-server and a SQLite store under
``data/serve/``, then the background processes: the outbox relay, one worker
per handler group, the fan-out worker and the expiry timers, and finally the HTTP API under
uvicorn (``--workers N`` processes, each with its own live reader and hub).
Children get SIGTERM when this process exits, however it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from workbench.children import signal_on_parent_death
from workbench.handlers import ALL_GROUPS
from workbench.redis_server import attach_or_start

BACKGROUND = ("relay", "timers", *ALL_GROUPS)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    mpesa: str = "sim"
    redis_url: str | None = None
    database_url: str | None = None
    prefix: str = "wb"
    debug: bool = False
    api_only: bool = False
    data_dir: Path = Path("data") / "serve"
    user_maxlen: int = 1000


def spawn_background(
    env: dict[str, str], options: ServeOptions, logs: Path
) -> dict[str, subprocess.Popen[bytes]]:
    """Start the relay and the workers; their output goes to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name in BACKGROUND:
        argv = [sys.executable, "-m", "workbench"]
        if name == "relay":
            argv += ["relay", "--prefix", options.prefix]
        elif name == "timers":
            argv += ["timers"]
        else:
            argv += ["worker", name, "--prefix", options.prefix, "--block-ms", "1000"]
            if name == "fanout":
                argv += ["--user-maxlen", str(options.user_maxlen)]
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        processes[name] = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=signal_on_parent_death(signal.SIGTERM),  # graceful when serve goes
        )
    return processes


def stop_background(processes: dict[str, subprocess.Popen[bytes]], timeout: float = 15) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def serve(options: ServeOptions) -> None:
    """Run until Ctrl-C / SIGTERM."""
    import uvicorn

    from workbench.edge import uvicorn_options

    options.data_dir.mkdir(parents=True, exist_ok=True)
    database_url = options.database_url or f"sqlite:///{options.data_dir / 'workbench.db'}"
    with attach_or_start(
        options.redis_url, options.data_dir / "redis", appendonly=True, appendfsync="everysec"
    ) as (redis_url, _):
        env = dict(os.environ)
        env.update(
            REDIS_URL=redis_url,
            DATABASE_URL=database_url,
            WORKBENCH_PREFIX=options.prefix,
            WORKBENCH_MPESA=options.mpesa,
            WORKBENCH_CALLBACK_URL=f"http://{options.host}:{options.port}/mpesa/callback",
            WORKBENCH_DEBUG="1" if options.debug else "",
        )
        os.environ.update(env)  # uvicorn's worker processes build the app from these
        from workbench.store import Store

        store = Store(database_url)
        store.create_schema()  # once, before several processes race to create it
        store.close()
        processes = {} if options.api_only else spawn_background(env, options, options.data_dir)
        try:
            uvicorn.run(
                "workbench.api:app_from_env",
                factory=True,
                host=options.host,
                port=options.port,
                workers=options.workers,
                log_level="warning",
                timeout_graceful_shutdown=3,
                # uvicorn restarts a worker that does not answer its health
                # ping within this; the default 5 s is too short for a busy
                # 2-core machine importing the app, and loops forever.
                timeout_worker_healthcheck=60,
                **uvicorn_options(),  # body, header and idle limits (workbench.edge)
            )
        finally:
            stop_background(processes)
