"""Load and validate riha-node.toml, with RIHA_NODE_* environment overrides.

Every problem becomes one ConfigError that names the key, where it came from (file and line, or the environment
variable) and what is wrong, so an operator can fix a config without reading a traceback.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from riha_node.errors import UserError

ENV_PREFIX = "RIHA_NODE_"
DEFAULT_CONFIG_NAME = "riha-node.toml"

AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash, 1..16 chars


class ConfigError(UserError):
    """The configuration is wrong; the message names the key and the fix."""


def _ae_title(value: str) -> str:
    if not AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, not all spaces, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]
PathValue = Annotated[Path, Field(strict=False)]  # TOML gives strings; everything else stays strictly typed


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NodeConfig(Section):
    ae_title: AETitle = "RIHA"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    storage_dir: PathValue = Path("./riha-data")
    database_url: str = ""
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    max_pdu_size: Annotated[int, Field(ge=0, le=2**32 - 1)] = 262144
    acse_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("database_url")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("use an empty string (SQLite in storage_dir), sqlite:///PATH or postgresql+psycopg://...")
        return value


class PeerConfig(Section):
    """A calling AE title allowed to connect, optionally only from one host."""

    ae_title: AETitle
    host: str | None = None


class DestinationConfig(Section):
    """A DICOM node drafts are sent to (PACS) or that `riha-node echo` can reach."""

    ae_title: AETitle
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: bool = False
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6  # then the study is export_failed until retried
    backoff_s: Annotated[float, Field(gt=0)] = 5.0  # first retry delay; doubles each attempt
    backoff_max_s: Annotated[float, Field(gt=0)] = 300.0
    retry_failed_after_s: Annotated[float, Field(gt=0)] = 1800.0  # export_failed studies are tried again after this


class TlsConfig(Section):
    enabled: bool = False
    certificate: PathValue | None = None
    private_key: PathValue | None = None
    ca_certificates: PathValue | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TlsConfig":
        if self.enabled:
            missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
            if self.require_client_certificate and self.ca_certificates is None:
                missing.append("ca_certificates")
            if missing:
                raise ValueError(f"TLS is enabled but {', '.join(missing)} is not set")
        return self


CHEST_RADIOGRAPH_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)


class StudyConfig(Section):
    quiet_period_s: Annotated[float, Field(ge=0)] = 10.0
    accepted_sop_classes: list[str] = list(CHEST_RADIOGRAPH_SOP_CLASSES)
    accepted_modalities: list[str] = ["CR", "DX"]
    accepted_body_parts: list[str] = ["CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHESTABDOMEN", "CHEST_PA"]
    disk_watermark_percent: Annotated[float, Field(gt=0, le=100)] = 90.0
    retention_days: Annotated[float, Field(ge=0)] = 0.0  # received images of delivered studies kept; 0: forever

    @field_validator("accepted_modalities", "accepted_body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]


class WorkerConfig(Section):
    device: str = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    processes: Annotated[int, Field(ge=0, le=64)] = 1  # worker processes `serve` runs (0: only `riha-node worker`)
    lease_s: Annotated[float, Field(gt=0)] = 120.0  # a worker that stops heartbeating loses its study after this
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3  # then the study is failed with the reason
    retry_backoff_s: Annotated[float, Field(gt=0)] = 30.0  # first retry delay; doubles each attempt
    poll_interval_s: Annotated[float, Field(gt=0)] = 0.2
    threads: Annotated[int, Field(ge=0, le=256)] = 0  # CPU threads for the model; 0: all cores but one (at least 1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value


class ModelConfig(Section):
    checkpoint: PathValue | None = None

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class SrConfig(Section):
    flavour: Literal["comprehensive", "enhanced", "basic_text"] = "comprehensive"
    series_description: Annotated[str, Field(min_length=1, max_length=64)] = "AI DRAFT - NOT VERIFIED"
    series_number: Annotated[int, Field(ge=1)] = 9901


class RetrainConfig(Section):
    """`riha-node retrain` and its schedule: what to fine-tune on, and the gate a candidate must pass."""

    schedule: str = ""  # crontab "minute hour day month day-of-week" (UTC); empty: only by hand
    epochs: Annotated[int, Field(ge=1, le=1000)] = 10
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4
    batch_size: Annotated[int, Field(ge=1, le=256)] = 16
    augment: bool = False  # R2Gen's random crop and flip; the flip mirrors a sided finding its report still names
    processes: Annotated[int, Field(ge=1, le=64)] = 1  # >1: torchrun with that many (one per GPU; Gloo on CPUs)
    min_studies: Annotated[int, Field(ge=2)] = 50
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    metric: Literal["micro_f1", "macro_f1", "BLEU_4"] = "micro_f1"
    margin: Annotated[float, Field(ge=0, le=1)] = 0.0
    lock_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # a retrain that stops heartbeating loses its lock after this

    @field_validator("schedule")
    @classmethod
    def _crontab(cls, value: str) -> str:
        if value.strip():
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value.strip(), timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"not a crontab schedule ({exc}); e.g. \"0 2 * * sun\" for Sundays 02:00 UTC")
        return value.strip()


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MetricsConfig(Section):
    """The Prometheus endpoint (/metrics, /healthz, /readyz) that `serve` runs; loopback unless told otherwise."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: no endpoint


class Config(Section):
    node: NodeConfig = NodeConfig()
    peers: list[PeerConfig] = []
    pacs: list[DestinationConfig] = []
    tls: TlsConfig = TlsConfig()
    study: StudyConfig = StudyConfig()
    worker: WorkerConfig = WorkerConfig()
    model: ModelConfig = ModelConfig()
    sr: SrConfig = SrConfig()
    retrain: RetrainConfig = RetrainConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("pacs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @property
    def database_url(self) -> str:
        return self.node.database_url or f"sqlite:///{self.node.storage_dir / 'riha-node.db'}"

    def destination(self, ae_title: str) -> DestinationConfig:
        for dest in self.pacs:
            if dest.ae_title == ae_title:
                return dest
        known = ", ".join(d.ae_title for d in self.pacs) or "none"
        raise ConfigError(f"No destination with AE title {ae_title!r} in [pacs] (configured: {known}).")


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (or defaults when none is given and ./riha-node.toml is absent), apply overrides, validate."""
    environ = os.environ if environ is None else environ
    explicit = path is not None or ENV_PREFIX + "CONFIG" in environ
    config_path = Path(path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_NAME)
    raw: dict[str, Any] = {}
    text = ""
    if config_path.exists():
        try:
            text = config_path.read_text(encoding="utf-8")
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML ({exc}).") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot be read ({exc}).") from None
    elif explicit:
        raise ConfigError(f"Configuration file {config_path} does not exist; pass --config with the right path.")
    env_sources = _apply_environment(raw, environ)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_path, text, env_sources)) from None
    base = config_path.resolve().parent
    return _resolve_paths(config, base, config_path.resolve() if text else None)


def _apply_environment(raw: dict[str, Any], environ: dict[str, str]) -> dict[tuple[str, str], str]:
    """RIHA_NODE_SECTION_KEY=value overrides [section] key; values are read as TOML values, else as strings."""
    sources: dict[tuple[str, str], str] = {}
    sections = {name for name, field in Config.model_fields.items() if name != "source"}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in sections or not key:
            raise ConfigError(f"Environment variable {name} names no configuration key; "
                              f"use {ENV_PREFIX}<SECTION>_<KEY>, SECTION one of {', '.join(sorted(sections))}.")
        if section in ("peers", "pacs"):
            raise ConfigError(f"Environment variable {name}: [{section}] is a list; set it in the config file.")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        raw.setdefault(section, {})[key] = parsed
        sources[(section, key)] = name
    return sources


def _resolve_paths(config: Config, base: Path, source: Path | None) -> Config:
    def resolve(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else base / path)

    node = config.node.model_copy(update={"storage_dir": resolve(config.node.storage_dir)})
    tls = config.tls.model_copy(update={k: resolve(getattr(config.tls, k))
                                        for k in ("certificate", "private_key", "ca_certificates")})
    model = config.model.model_copy(update={"checkpoint": resolve(config.model.checkpoint)})
    return config.model_copy(update={"node": node, "tls": tls, "model": model, "source": source})


def _describe(exc: ValidationError, path: Path, text: str, env_sources: dict[tuple[str, str], str]) -> str:
    """One sentence per problem: where the key is, which key, what is wrong."""
    lines = _key_lines(text)
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc)
        if error["type"] == "extra_forbidden":
            why = "is not a known key (check the spelling against riha-node.toml's comments)"
        elif error["type"] == "missing":
            why = "is required"
        else:
            why = f"is invalid: {error['msg'].removeprefix('Value error, ')}"
            if "input" in error and error["type"] not in ("model_type", "list_type"):
                why += f" (got {error['input']!r})"
        env_name = env_sources.get(tuple(str(p) for p in loc[:2])) if len(loc) >= 2 else None
        if env_name:
            where = f"environment variable {env_name}"
        else:
            line = lines.get(loc) or lines.get(loc[:-1])
            where = f"{path}:{line}" if line else str(path)
        problems.append(f"{where}: {key} {why}.")
    return " ".join(problems)


_TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Map (section, [index,] key) to its line number; tomllib keeps no positions, and this covers our flat layout."""
    lines: dict[tuple[Any, ...], int] = {}
    prefix: tuple[Any, ...] = ()
    array_counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if table := _TABLE.match(line):
            name = table.group(2)
            if table.group(1) == "[[":
                index = array_counts.get(name, -1) + 1
                array_counts[name] = index
                prefix = (name, index)
            else:
                prefix = (name,)
            lines.setdefault(prefix, number)
            lines.setdefault(prefix[:1], number)
        elif key := _KEY.match(line):
            lines.setdefault(prefix + (key.group(1),), number)
            if prefix[:1] == ("pacs",) and len(prefix) == 1:
                lines.setdefault(("pacs", 0, key.group(1)), number)
    return lines
