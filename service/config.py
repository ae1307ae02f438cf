"""Service configuration: environment variables prefixed ``CMV_CDS_`` with safe defaults.

Every setting is documented in the README ("Configuration"). ``create_app(config)`` accepts a
mapping that overrides the environment, keyed either by the field name (``require_auth``) or by the
environment variable name (``CMV_CDS_REQUIRE_AUTH``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from cards.engine import DEFAULT_DOSING_WEIGHT, DEFAULT_HIGH_VIRAL_LOAD_IU_ML

ENV_PREFIX = "CMV_CDS_"

DosingWeight = Literal["actual", "adjusted"]


class ConfigError(ValueError):
    """A configuration value that cannot be used; raised at start-up, never per request."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed, immutable service settings."""

    # Authentication: every request (discovery included) needs a CDS Hooks JWT unless this is false.
    require_auth: bool = True
    # Feedback store. SQLite in the working directory by default: embedded, zero set-up.
    database_url: str = "sqlite:///cmv-cds-feedback.sqlite3"
    # Issued-card audit spool (service/audit_log.py): rows wait here for the database. Empty: beside a SQLite
    # database file (<file>.spool), else ./cmv-cds-spool. Above spool_max_bytes new rows are dropped (counted).
    spool_dir: str = ""
    spool_max_bytes: int = 256 * 1024 * 1024
    # Public base URL of the service as the EHR calls it (JWT `aud` behind a proxy). Empty: the
    # request's own URL is used.
    public_base_url: str = ""
    # Calls to the EHR's FHIR server (absent prefetch keys).
    # FHIR servers the service may contact (comma-separated URL prefixes). A trusted issuer may carry its
    # own list ("fhirServers" in CMV_CDS_TRUSTED_ISSUERS). Empty: none while auth is on; any https (or a
    # loopback http) server when auth is off.
    fhir_server_allowlist: str = ""
    fhir_timeout_seconds: float = 3.0
    fhir_max_pages: int = 10
    fhir_max_workers: int = 6
    fhir_max_response_bytes: int = 8 * 1024 * 1024
    # Whole-request budget for FHIR fetching, so a slow FHIR server cannot hold a worker.
    fhir_deadline_seconds: float = 8.0
    # Request body cap in bytes (HTTP 413 above it).
    max_body_bytes: int = 2 * 1024 * 1024
    # Clinical options (docs/policy.md §4 and §9).
    dosing_weight: DosingWeight = DEFAULT_DOSING_WEIGHT
    high_viral_load_iu_ml: float = DEFAULT_HIGH_VIRAL_LOAD_IU_ML
    log_level: str = "INFO"
    # Browser-based CDS clients (e.g. the CDS Hooks sandbox): comma-separated allowed origins, "*" for any.
    # Empty: no CORS headers are sent.
    cors_origins: str = ""
    # `cmv-cds serve` (gunicorn).
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    # CDS client JWT verification (service/auth.py). Trusted issuers: inline JSON or a path to a JSON
    # file, {"<iss>": {"jku": [JWKS URLs], "jwks": {static JWK Set}, "algorithms": [...],
    # "tenants": [...]}}. Empty: no client is trusted and every call is refused (fail closed).
    trusted_issuers: str = ""
    # Clock skew tolerated on exp/iat/nbf, in seconds.
    jwt_leeway_seconds: int = 30
    # Longest accepted token lifetime (exp - iat): bounds the replay window the jti store must cover.
    jwt_max_lifetime_seconds: int = 3600
    # How long a JWK Set fetched from a jku is reused before it is fetched again.
    jwks_cache_seconds: int = 300
    # GET /metrics (Prometheus) without a JWT. Off by default: the metrics carry no patient data (labels are
    # service ids, route templates, statuses, rule ids, indicators and prefetch keys only), but traffic,
    # error rates and clinical rule frequencies are operational data to keep from anonymous callers.
    metrics_public: bool = False
    # Client profile (cards/profiles.py) for calls without a verified issuer, i.e. with authentication off: the
    # answer shaped for what the client can apply. "cds-hooks-2.0" (the default) or "epic". With
    # authentication on, each trusted issuer's own "profile" decides (default "cds-hooks-2.0").
    client_profile: str = "cds-hooks-2.0"
    # Epic preference-list items of the institution (profile epic): a JSON object mapping the name of a
    # medication the service proposes (e.g. "foscarnet") to the item's code. A trusted issuer's own
    # "preferenceListItems" replaces it. Empty: creates are coded in RxNorm.
    preference_list_items: str = ""
    # Card preview for integrators (GET /preview, service/preview.py): a page that runs a pasted or example
    # request against this service and shows the cards as an EHR would. None (unset): on only when
    # require_auth is false; true/false override. With auth on, the page asks for a token for its hook call.
    preview_enabled: bool | None = None

    @property
    def preview_active(self) -> bool:
        """Whether the /preview routes exist: the explicit setting, else only when auth is off."""
        return not self.require_auth if self.preview_enabled is None else self.preview_enabled

    @property
    def fhir_server_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.fhir_server_allowlist.split(",") if p.strip())

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment, then apply ``overrides``."""
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, field in fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _coerce(name, field.type, raw)
        for key, raw_value in (overrides or {}).items():
            name = key[len(ENV_PREFIX) :].lower() if key.upper().startswith(ENV_PREFIX) else key.lower()
            if name not in fields:
                raise ConfigError(f"unknown setting {key!r}")
            values[name] = _coerce(name, fields[name].type, raw_value)
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.dosing_weight not in ("actual", "adjusted"):
            raise ConfigError("CMV_CDS_DOSING_WEIGHT must be 'actual' or 'adjusted'")
        if (
            self.fhir_timeout_seconds <= 0
            or self.fhir_deadline_seconds <= 0
            or self.fhir_max_pages < 1
            or self.fhir_max_workers < 1
            or self.fhir_max_response_bytes < 1024
        ):
            raise ConfigError("FHIR timeout, page and worker limits must be positive")
        if self.spool_max_bytes < 1024 * 1024:
            raise ConfigError("CMV_CDS_SPOOL_MAX_BYTES must be at least 1048576 (1 MiB)")
        if self.max_body_bytes < 1024:
            raise ConfigError("CMV_CDS_MAX_BODY_BYTES must be at least 1024")
        if self.high_viral_load_iu_ml <= 0:
            raise ConfigError("CMV_CDS_HIGH_VIRAL_LOAD_IU_ML must be positive")
        if not 0 < self.port < 65536 or not 1 <= self.workers <= 64:
            raise ConfigError("CMV_CDS_PORT must be 1-65535 and CMV_CDS_WORKERS 1-64")
        for prefix in self.fhir_server_prefixes:
            if not prefix.startswith(("https://", "http://")):
                raise ConfigError("CMV_CDS_FHIR_SERVER_ALLOWLIST entries must be absolute http(s) URL prefixes")
        if self.public_base_url and not self.public_base_url.startswith(("http://", "https://")):
            raise ConfigError("CMV_CDS_PUBLIC_BASE_URL must be an absolute http(s) URL")
        if not 0 <= self.jwt_leeway_seconds <= 300:
            raise ConfigError("CMV_CDS_JWT_LEEWAY_SECONDS must be between 0 and 300")
        if not 1 <= self.jwt_max_lifetime_seconds <= 86400:
            raise ConfigError("CMV_CDS_JWT_MAX_LIFETIME_SECONDS must be between 1 and 86400")
        if not 1 <= self.jwks_cache_seconds <= 86400:
            raise ConfigError("CMV_CDS_JWKS_CACHE_SECONDS must be between 1 and 86400")
        from cards.profiles import PROFILES

        if self.client_profile not in PROFILES:
            raise ConfigError(f"CMV_CDS_CLIENT_PROFILE must be one of: {', '.join(PROFILES)}")
        parse_preference_list_items(self.preference_list_items, "CMV_CDS_PREFERENCE_LIST_ITEMS")
        if self.trusted_issuers:
            # Imported here: service.auth imports this module. Parsing raises ConfigError at start-up.
            from service.auth import load_trusted_issuers

            load_trusted_issuers(self.trusted_issuers)


def parse_preference_list_items(raw: Any, where: str) -> dict[str, str]:
    """An Epic preference-list map (JSON text, or an already parsed object): medication name → item code.
    Names are matched case-insensitively; ``ConfigError`` for anything but an object of non-empty strings."""
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not all(
        isinstance(name, str) and name.strip() and isinstance(code, str) and code.strip() for name, code in raw.items()
    ):
        raise ConfigError(f"{where} must be a JSON object mapping medication names to preference-list item codes")
    return {name.strip().lower(): code.strip() for name, code in raw.items()}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, declared: Any, raw: Any) -> Any:
    type_name = declared if isinstance(declared, str) else getattr(declared, "__name__", str(declared))
    try:
        if type_name == "bool | None" and (raw is None or str(raw).strip() == ""):
            return None  # an optional switch left unset: its documented automatic default
        if type_name in ("bool", "bool | None"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return str(raw).strip()
    except ValueError as exc:
        raise ConfigError(f"invalid value for {ENV_PREFIX}{name.upper()}: {raw!r}") from exc
