"""``sentiment serve``: run the online endpoint in the foreground on a local Ray (or ``RAY_ADDRESS``).

Flags and the config file are read into `ServeArgs` before Ray is imported, so a typo fails at
once; ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deployments.args import ServeArgs
from sentiment.cli import UsageError, add_model_arguments, load_config_file, model_config_from_args
from sentiment.config import format_validation_error
from sentiment.engines import prepare_onnx
from sentiment.errors import SentimentError
from sentiment.flags import add_flags, flag_values
from sentiment.loading import fetch_checkpoint

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_APP_NAME = "sentiment"
IMPORT_PATH = "deployments.app:build_app"


@dataclass(frozen=True)
class ServeCommand:
    """What ``sentiment serve`` runs: the app's args and where its HTTP proxy listens."""

    args: ServeArgs
    host: str
    port: int
    route_prefix: str
    app_name: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}/"


def register(commands: Any) -> None:
    """Add the ``serve`` subcommand to the ``sentiment`` command's subparsers."""
    parser = commands.add_parser(
        "serve",
        help="serve the HTTP endpoint on Ray Serve in the foreground (Ctrl-C stops it)",
        description=(
            "Start a local Ray (or join RAY_ADDRESS), deploy the classifier behind Ray Serve and serve "
            "until Ctrl-C. --config takes a Ray Serve config (deployments/serve.yaml: its first "
            "application's args, route_prefix and name, and http_options) or a plain YAML of ServeArgs "
            "fields with a 'model' section."
        ),
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("serving")
    group.add_argument("--host", help=f"address the HTTP proxy binds (default {DEFAULT_HOST})")
    group.add_argument("--port", type=int, help=f"HTTP port (default {DEFAULT_PORT})")
    group.add_argument("--route-prefix", help="URL prefix of the app (default /)")
    parser.set_defaults(handler=run_serve, _serve_flags=add_flags(group, ServeArgs, only=("num_replicas",)))


def command_from_args(args: argparse.Namespace, file_data: Mapping[str, Any]) -> ServeCommand:
    """Merge the config file and flags (flags win) into a checked `ServeCommand`."""
    if "applications" in file_data:
        applications = file_data["applications"]
        if not isinstance(applications, list) or len(applications) != 1 or not isinstance(applications[0], dict):
            raise UsageError("applications: sentiment serve runs exactly one application; use `serve run` for more")
        application = applications[0]
        if application.get("import_path", IMPORT_PATH) != IMPORT_PATH:
            raise UsageError(f"applications[0].import_path: must be {IMPORT_PATH}, got {application['import_path']!r}")
        section = dict(application.get("args") or {})
        route_prefix = application.get("route_prefix", "/")
        app_name = application.get("name", DEFAULT_APP_NAME)
    else:
        section = {key: value for key, value in file_data.items() if key != "http_options"}
        route_prefix, app_name = "/", DEFAULT_APP_NAME
    http = file_data.get("http_options") or {}
    if not isinstance(http, dict):
        raise UsageError("http_options: must be a mapping with host and port")

    section["model"] = model_config_from_args(args, {"model": section.get("model")})
    flags = flag_values(args, getattr(args, "_serve_flags", {}))
    if "num_replicas" in flags:
        section.pop("autoscaling", None)
    section.update(flags)
    try:
        serve_args = ServeArgs.model_validate(section)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, prefix="args.")) from exc
    route_prefix = args.route_prefix or route_prefix
    if not str(route_prefix).startswith("/"):
        raise UsageError(f"route_prefix: must start with '/', got {route_prefix!r}")
    port = args.port if args.port is not None else http.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError(f"port: must be a TCP port number, got {port!r}")
    return ServeCommand(
        args=serve_args,
        host=str(args.host or http.get("host") or DEFAULT_HOST),
        port=port,
        route_prefix=str(route_prefix),
        app_name=str(app_name),
    )


def run_serve(args: argparse.Namespace) -> int:
    """Deploy, print the URL, serve until Ctrl-C (or SIGTERM), then clean up."""
    command = command_from_args(args, load_config_file(args))
    joined = bool(os.environ.get("RAY_ADDRESS"))
    replica_env = None
    if not joined:
        # Before Ray starts: a model that cannot be found or fetched fails here, in seconds. A hub id
        # is downloaded once into the local cache (progress on the terminal); the replicas of the Ray
        # started here share this machine's cache, so they load it offline and never download it again.
        # (On a joined cluster the replicas' nodes have their own files: nothing is fetched here.)
        model = command.args.model
        if not Path(model.model_id).expanduser().is_dir():
            print(f"Fetching model {model.model_id} into the local Hugging Face cache (once)...", flush=True)
        print(f"Model files: {fetch_checkpoint(model)}", flush=True)
        # ONNX Runtime on a torch checkpoint: exported once into the local cache here, not by every replica.
        onnx_model = prepare_onnx(model)
        if onnx_model is not None:
            print(f"ONNX model: {onnx_model}", flush=True)
        replica_env = {"HF_HUB_OFFLINE": "1"}

    import ray
    from ray import serve

    from deployments.builder import application

    # "local": a Ray of its own, as the README says, even when a `ray start` cluster runs on this
    # machine (plain ray.init() would attach to it, then shut its Serve down on exit).
    context = ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    # SIGTERM (docker stop, systemd) cleans up like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": command.host, "port": command.port})
        try:
            serve.run(
                application(command.args, replica_env=replica_env),
                name=command.app_name,
                route_prefix=command.route_prefix,
            )
        except RuntimeError as exc:
            raise SentimentError(f"the application did not start: {_replica_failure(command.app_name) or exc}") from exc
        print(f"Serving {command.args.model.model_id} at {command.url} (API docs: {command.url}docs)", flush=True)
        for line in operator_hints(context.dashboard_url, os.environ):
            print(line, flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping...", file=sys.stderr, flush=True)
        return 0
    finally:
        # On a shared cluster remove only this app; a local Ray started here goes away entirely.
        if joined:
            serve.delete(command.app_name)
        else:
            serve.shutdown()
        ray.shutdown()


def operator_hints(dashboard_url: str | None, environ: Mapping[str, str]) -> list[str]:
    """How to look at this Ray with its own tools: the dashboard, and the CLIs under token authentication.

    Ray 2.60 enables token authentication on a local Ray it starts (the token is in ~/.ray/auth_token)
    and sets ``RAY_AUTH_MODE=token`` in the starting process only; in another shell, ``serve status`` and
    ``ray status`` answer "Authentication required" unless that variable is set there too.
    """
    hints = []
    token = environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        hints.append(f"Ray dashboard: {url}" + (" (its API needs the token in ~/.ray/auth_token)" if token else ""))
    if token:
        hints.append("Ray's CLIs on this Ray, from another shell: RAY_AUTH_MODE=token serve status (or ray status)")
    return hints


def _replica_failure(app_name: str) -> str | None:
    """The last line of the error a replica failed to start with (Serve buries it in its status message)."""
    from ray import serve

    try:
        application = serve.status().applications[app_name]
    except Exception:  # the controller may be gone already; the caller falls back to Serve's own message
        return None
    for deployment in application.deployments.values():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        errors = [line for line in lines if "Error:" in line]
        if errors:
            return errors[-1]
    return None
