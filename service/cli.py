"""The ``cmv-cds`` command: ``cmv-cds serve`` runs the service under gunicorn with sync workers; ``cmv-cds migrate``
creates the database schema (the deployment's one-shot step).

Gunicorn is driven programmatically (a ``BaseApplication`` subclass), with the settings of
``service.gunicorn_conf`` plus the command-line flags on top. The master never imports the Flask app:
each worker builds it with ``service.app.create_app()``, which reads the ``CMV_CDS_*`` environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.config import KNOWN_SETTINGS

from service.config import ENV_PREFIX, ConfigError, Settings

PROG = "cmv-cds"
EXIT_CONFIG_ERROR = 2


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _default(field: str) -> Any:
    return next(f.default for f in dataclasses.fields(Settings) if f.name == field)


def _show(value: object) -> str:
    """A default as it would be written in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "(unset: automatic)"
    return str(value) if value != "" else "(empty)"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, not {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Building it reads no settings, so ``--help`` works with a broken environment."""
    env_lines = "\n".join(
        f"  {_env_name(f.name):<34} default: {_show(f.default)}" for f in dataclasses.fields(Settings)
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="FHIR-native CDS Hooks service for CMV antiviral treatment.",
        epilog=(
            'Configuration is read from these environment variables (see the README, "Configuration"):\n' + env_lines
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the service under gunicorn (sync workers)",
        description=(
            "Run the CDS Hooks service under gunicorn with sync workers. Each flag overrides its "
            "environment variable; the other gunicorn settings are in service/gunicorn_conf.py. "
            "All other configuration comes from the CMV_CDS_* environment variables (cmv-cds --help)."
        ),
    )
    serve.add_argument(
        "--host",
        metavar="H",
        help=f"address to listen on (env {_env_name('host')}, default {_default('host')}; "
        "0.0.0.0 in the container image)",
    )
    serve.add_argument(
        "--port",
        metavar="P",
        type=_port,
        help=f"TCP port to listen on (env {_env_name('port')}, default {_default('port')})",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        type=_positive_int,
        help=f"number of sync worker processes (env {_env_name('workers')}, default {_default('workers')})",
    )
    _add_migrate_parser(commands)
    _add_report_parser(commands)
    _add_demo_parser(commands)
    _add_token_parser(commands)
    return parser


def _add_migrate_parser(commands: Any) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="create the database schema (one-shot; before the service starts)",
        description=(
            "Create the tables of the feedback store (issued cards, feedback, JWT replay) if they do not exist. "
            "Idempotent, and safe while other instances run or start. Meant as the one-shot step of a deployment "
            "(the compose `migrate` service, the Kubernetes Job), so that the service's own database user needs no "
            f"right to create tables. Reads {_env_name('database_url')} (or --database-url); waits for a database "
            "that is still starting."
        ),
    )
    migrate.add_argument(
        "--database-url",
        metavar="URL",
        help=f"SQLAlchemy URL of the feedback store (default: {_env_name('database_url')})",
    )
    migrate.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="how long to retry while the database does not answer (default %(default)g; 0: one attempt)",
    )


def _since(text: str) -> Any:
    from service.errors import InvalidRequest
    from service.report import parse_since

    try:
        return parse_since(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _service_id(text: str) -> str:
    from service.errors import InvalidRequest
    from service.report import check_service_id

    try:
        return check_service_id(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _add_report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="CDS governance report from the feedback store",
        description=(
            "Per rule id: cards shown (issued), accepted and overridden (cards with such feedback), acceptance "
            "rate (accepted / shown), override reasons with counts, and feedback on cards never issued. Reads "
            f"the feedback database of {_env_name('database_url')} (or --database-url). "
            "The same report is served as JSON at GET /cds-services/report."
        ),
    )
    report.add_argument("--service", metavar="ID", type=_service_id, help="only this CDS service id")
    report.add_argument(
        "--since",
        metavar="DATE",
        type=_since,
        help="only cards issued and feedback received from then on: YYYY-MM-DD (UTC) or an ISO 8601 date-time",
    )
    report.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    report.add_argument(
        "--database-url",
        metavar="URL",
        help=f"SQLAlchemy URL of the feedback store (default: {_env_name('database_url')})",
    )


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="send an example request to a running service and print the cards",
        description=(
            "Send a CDS Hooks request (a JSON file, or the name of one in examples/) to a running service and "
            "print the cards it answers: indicator, summary, detail, suggestions with their actions, source."
        ),
    )
    demo.add_argument("example", metavar="EXAMPLE", help="a request file, or a file name in examples/")
    demo.add_argument("--url", help=f"the service's base URL (default {_LOCAL_URL_HELP})")
    demo.add_argument(
        "--token", metavar="JWT", help="a CDS Hooks client JWT for the service's hook endpoint, when auth is on"
    )


def _add_token_parser(commands: Any) -> None:
    from service import dev_token

    token = commands.add_parser(
        "token",
        help="mint a short-lived client JWT from a local development key (to try authentication locally)",
        description=(
            "Print a CDS Hooks client JWT for one endpoint of a service running locally, signed with a development "
            "key made on first use in --key-dir (private key readable by you only, never committed). With "
            "--trusted-issuers, print instead the CMV_CDS_TRUSTED_ISSUERS value that makes the service trust that "
            "key. Each token is for one endpoint (aud), lives --lifetime seconds and is accepted once (jti). "
            "For local development only."
        ),
    )
    token.add_argument(
        "target",
        nargs="?",
        metavar="ENDPOINT",
        help="the id of a CDS service (its hook endpoint), a path such as /cds-services or "
        "/cds-services/ID/feedback, or a full URL",
    )
    token.add_argument(
        "--url",
        help=f"the service's base URL as it sees itself ({_env_name('public_base_url')} when set; "
        f"default {_LOCAL_URL_HELP})",
    )
    token.add_argument(
        "--key-dir",
        metavar="DIR",
        default=dev_token.DEFAULT_KEY_DIR,
        help="where the development key is kept (default %(default)s in the working directory)",
    )
    token.add_argument(
        "--lifetime",
        metavar="SECONDS",
        type=_lifetime,
        default=dev_token.DEFAULT_LIFETIME_SECONDS,
        help=f"token lifetime, 1 to {dev_token.MAX_LIFETIME_SECONDS} (default %(default)s)",
    )
    token.add_argument(
        "--trusted-issuers",
        action="store_true",
        help="print the CMV_CDS_TRUSTED_ISSUERS value (JSON, a static jwks) that trusts the key, not a token",
    )


def _lifetime(text: str) -> int:
    from service.dev_token import MAX_LIFETIME_SECONDS

    value = _positive_int(text)
    if value > MAX_LIFETIME_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LIFETIME_SECONDS} seconds, not {value}")
    return value


# The local service the demo and token commands talk to by default: the port `cmv-cds serve` listens on.
_LOCAL_URL_HELP = f"http://127.0.0.1:${_env_name('port')}, i.e. http://127.0.0.1:{_default('port')} when unset"


def local_service_url() -> str:
    """``http://127.0.0.1:<CMV_CDS_PORT>``: where ``cmv-cds serve`` listens, given the same environment.
    Raises ConfigError for an unusable port."""
    raw = os.environ.get(_env_name("port"), "").strip()
    if not raw:
        return f"http://127.0.0.1:{_default('port')}"
    try:
        return f"http://127.0.0.1:{_port(raw)}"
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{_env_name('port')}: {exc}") from None


# Names gunicorn accepts as settings: what it would read from a ``-c python:module`` config.
_GUNICORN_SETTINGS = frozenset(setting.name for setting in KNOWN_SETTINGS)


def gunicorn_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Gunicorn settings: everything in ``service.gunicorn_conf``, then ``bind`` and ``workers`` from the
    flags, falling back to the settings, and ``loglevel`` from the settings. Raises ConfigError for an
    unusable host, port or worker count."""
    from service import gunicorn_conf

    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    workers = args.workers if args.workers is not None else settings.workers
    if not host:
        raise ConfigError(f"{_env_name('host')} / --host must not be empty")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{_env_name('port')} / --port must be between 1 and 65535, not {port}")
    if workers < 1:
        raise ConfigError(f"{_env_name('workers')} / --workers must be at least 1, not {workers}")

    options = {name: value for name, value in vars(gunicorn_conf).items() if name in _GUNICORN_SETTINGS}
    options["bind"] = gunicorn_conf.bind_address(host, port)
    options["workers"] = workers
    options["loglevel"] = settings.log_level.lower()
    return options


class CdsApplication(BaseApplication):  # type: ignore[misc]  # gunicorn has no type information
    """Gunicorn with fixed options; the Flask app is built in each worker."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        super().__init__(prog=PROG)

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        from service.app import create_app

        return create_app()


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.load()
        options = gunicorn_options(args, settings)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # Runs until gunicorn stops; gunicorn ends the process with SystemExit (0 after SIGTERM/SIGINT,
    # 3 when a worker cannot boot).
    CdsApplication(options).run()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """``cmv-cds migrate``: 0 once the schema exists; 1 (database error after --wait) or 2 (configuration)."""
    import time

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from service.store import FeedbackStore

    try:
        url = make_url(args.database_url or Settings.load().database_url)
        store = FeedbackStore(url.render_as_string(hide_password=False))
    except (ConfigError, ArgumentError) as exc:
        print(f"{PROG} migrate: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    shown_url = url.render_as_string(hide_password=True)
    deadline = time.monotonic() + max(0.0, args.wait)
    delay = 0.5
    try:
        while True:
            try:
                store.create_schema()
                break
            except SQLAlchemyError as exc:
                if time.monotonic() + delay > deadline:
                    reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
                    print(f"{PROG} migrate: database error at {shown_url}: {reason[:300]}", file=sys.stderr)
                    return 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        store.dispose()
    print(f"{PROG} migrate: schema up to date at {shown_url}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """``cmv-cds report``: 0 with the report on stdout; 1 (database error) or 2 (configuration) with one line."""
    import json
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from service.report import report_json, report_text
    from service.store import FeedbackStore

    try:
        url = make_url(args.database_url or Settings.load().database_url)
    except (ConfigError, ArgumentError) as exc:
        print(f"{PROG} report: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    shown_url = url.render_as_string(hide_password=True)
    database = url.database or ""
    # Connecting to a missing SQLite file would create an empty database: a mistyped path would look empty.
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not Path(database).is_file():
        print(f"{PROG} report: no feedback database at {shown_url}", file=sys.stderr)
        return 1
    try:
        store = FeedbackStore(url.render_as_string(hide_password=False))
    except ConfigError as exc:
        print(f"{PROG} report: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        rules = store.report(args.service, args.since)
    except SQLAlchemyError as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"{PROG} report: database error at {shown_url}: {reason[:300]}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    document = report_json(rules, args.service, args.since)
    if args.format == "json":
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(report_text(document))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from service import demo

    try:
        url = args.url or local_service_url()
    except ConfigError as exc:
        print(f"{PROG} demo: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return demo.run(args.example, url, args.token, sys.stdout, sys.stderr, prog=PROG)


def _token(args: argparse.Namespace) -> int:
    """``cmv-cds token``: a token (or, with --trusted-issuers, the issuers value) on stdout, nothing else."""
    import json
    from pathlib import Path

    from service import dev_token

    if not args.trusted_issuers and not args.target:
        print(f"{PROG} token: name the ENDPOINT the token is for (e.g. cmv-antiviral-order-select)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        url = args.url or local_service_url()
        key, created = dev_token.load_or_create_key(Path(args.key_dir))
    except (ConfigError, dev_token.DevKeyError) as exc:
        print(f"{PROG} token: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if created:
        # The command as the user typed it (.venv/bin/cmv-cds, or cmv-cds on PATH), so the hint can be pasted.
        invoked = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == PROG else PROG
        print(
            f"{PROG} token: made a development key in {args.key_dir}/ (local use only); the service trusts it "
            f'with {_env_name("trusted_issuers")}="$({invoked} token --trusted-issuers)"',
            file=sys.stderr,
        )
    if args.trusted_issuers:
        print(json.dumps(dev_token.trusted_issuers(key), separators=(",", ":")))
    else:
        print(dev_token.mint(key, dev_token.endpoint_url(url, args.target), args.lifetime))
    return 0


_COMMANDS = {"serve": _serve, "migrate": _migrate, "report": _report, "demo": _demo, "token": _token}
# The exit status of a command whose reader went away (`cmv-cds report | head`), as for a process ended by
# SIGPIPE (128 + 13): what a shell reports for `cat` in the same place.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cmv-cds`` console script. Returns the exit status."""
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout (`| head`) has gone: stop quietly, as command-line tools do. Point stdout at
        # /dev/null so the interpreter's own flush at exit cannot fail again (Python docs, "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # stdout is not a file descriptor (embedded use): nothing to flush later
            pass
        return EXIT_BROKEN_PIPE
    return status


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    command = _COMMANDS.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())
