"""One typed settings object, read once and passed down.

Sources, later ones win: built-in defaults, the TOML file (``GHOSTLOOP_CONFIG`` or
``<user config dir>/ghostloop/config.toml``), ``GHOSTLOOP_*`` environment variables,
and the LSP client's ``initializationOptions``. No other module reads the environment.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "ghostloop"
ENV_PREFIX = "GHOSTLOOP_"
BACKENDS = ("torch", "onnxruntime")
# what ``ghostloop replay --backend`` takes: a backend, and onnxruntime's int8 copy
REPLAY_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
TCP_AUTH = ("auto", "required", "off")
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRAIN_METHODS = ("sft", "dpo", "rrhf")


class SettingsError(ValueError):
    """A setting has a value Ghostloop cannot use; the message names the setting."""


def physical_cores() -> int:
    """Physical cores available to this process: torch runs best with one thread per core."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        cpu, physical, core = -1, "", ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                if cpu in allowed:
                    cores.add((physical, core))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def _default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml"


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything a Ghostloop process can be told. Each field is also ``GHOSTLOOP_<NAME>``."""

    model: str = field(
        default="",
        metadata=_help(
            "Hugging Face id, local model directory or .gguf file; "
            "empty = the embedded SmolLM2-135M-Instruct"
        ),
    )
    backend: str = field(default="torch", metadata=_help("inference backend: torch | onnxruntime"))
    onnx_int8: bool = field(
        default=False,
        metadata=_help("onnxruntime: serve an int8 copy of each export (weights in blocks of 128)"),
    )
    device: str = field(
        default="auto",
        metadata=_help("auto (CUDA in bf16 when present, else CPU fp32) | cpu | cuda"),
    )
    database_url: str = field(
        default="", metadata=_help("SQLAlchemy URL; empty = SQLite file in the data dir")
    )
    data_dir: Path = field(
        default_factory=_default_data_dir,
        metadata=_help("where the model cache, database and logs live"),
    )
    model_cache: Path | None = field(
        default=None,
        metadata=_help("where converted models and ONNX exports are kept; none: <data dir>/models"),
    )
    config: Path | None = field(
        default=None, metadata=_help("path of the TOML settings file (env var only)")
    )
    threads: int = field(
        default=0, metadata=_help("torch CPU threads; 0 = the number of physical cores")
    )
    context_tokens: int = field(
        default=512, metadata=_help("prompt budget in tokens (prefix plus suffix)")
    )
    kv_cache_mb: int = field(
        default=256,
        metadata=_help(
            "memory for KV caches kept per document between keystrokes (LRU); 0 = no reuse"
        ),
    )
    batch_size: int = field(
        default=4,
        metadata=_help(
            "most completions (documents waiting at once) decoded together, one forward pass "
            "per token for all (torch backend); 1 = one at a time"
        ),
    )
    suffix_share: float = field(
        default=0.25, metadata=_help("share of the budget given to the suffix (FIM models)")
    )
    max_new_tokens: int = field(default=48, metadata=_help("most tokens generated per completion"))
    max_lines: int = field(default=8, metadata=_help("most lines in a multi-line completion"))
    deadline_ms: int = field(
        default=3000,
        metadata=_help("a completion running longer returns what it has generated so far"),
    )
    max_document_chars: int = field(
        default=2_000_000, metadata=_help("documents larger than this get no completions")
    )
    max_stored_prompt_chars: int = field(
        default=16_000,
        metadata=_help("stored prompt prefix and suffix are each cut to this many characters"),
    )
    survival_windows_s: str = field(
        default="30,120,600",
        metadata=_help("seconds after an accept at which the kept share is measured"),
    )
    user: str = field(
        default_factory=_default_user, metadata=_help("who completions are attributed to")
    )
    hash_user: bool = field(
        default=False,
        metadata=_help("store a SHA-256 digest of the user name instead of the name"),
    )
    telemetry: bool = field(
        default=True,
        metadata=_help("record suggestions and their fate; false = store nothing of your code"),
    )
    log_level: str = field(
        default="INFO",
        metadata=_help(
            "DEBUG | INFO | WARNING | ERROR (logs go to stderr, and on stdio to the editor as "
            "window/logMessage once a session is initialized; DEBUG adds every LSP message)"
        ),
    )
    tcp_auth: str = field(
        default="auto",
        metadata=_help(
            "serve --tcp: auto (clients off loopback need a token from `ghostloop users add`) "
            "| required (every client does) | off (nobody does: a trusted network only)"
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=_help("serve --tcp: PEM certificate chain; with tls_key, TLS")
    )
    tls_key: Path | None = field(
        default=None, metadata=_help("serve --tcp: PEM private key of tls_cert")
    )
    rate_limit_per_minute: int = field(
        default=600,
        metadata=_help("serve --tcp: completions a user may ask for per minute; 0 = no limit"),
    )
    max_message_bytes: int = field(
        default=16 * 2**20,
        metadata=_help(
            "a longer LSP message is refused: on TCP its connection closes, on stdio it is skipped"
        ),
    )
    max_open_documents: int = field(
        default=500, metadata=_help("documents one connection may hold open at once")
    )
    message_timeout_s: float = field(
        default=30.0,
        metadata=_help("serve --tcp: a message must arrive whole within this many seconds"),
    )
    idle_timeout_s: float = field(
        default=3600.0,
        metadata=_help("serve --tcp: a connection silent this long is closed; 0 = never"),
    )
    metrics_port: int = field(
        default=0,
        metadata=_help("serve Prometheus metrics at http://metrics_host:PORT/metrics; 0 = off"),
    )
    metrics_host: str = field(
        default="127.0.0.1", metadata=_help("address of the metrics endpoint (loopback only)")
    )
    # -- the nightly job (ghostloop train); defaults are what the lab run supports
    # (docs/architecture.md) and the replays measured (docs/results.md)
    train_method: str = field(
        default="sft",
        metadata=_help("sft | dpo | rrhf: the method `ghostloop train` uses without --method"),
    )
    lora_rank: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata=_help("modules LoRA adapts, separated by commas"),
    )
    learning_rate: float = field(default=5e-4, metadata=_help("learning rate for sft and dpo"))
    rrhf_learning_rate: float = field(
        default=1e-4, metadata=_help("learning rate for rrhf (lower: its ranking loss is sharper)")
    )
    train_context_tokens: int = field(
        default=0,
        metadata=_help(
            "prompt budget in training, tokens: the nearest part of the served prompt (its "
            "end, token healing included, is the same); 0 = the served prompt whole (the "
            "default: 7 % more typing saved held out than 256-token training prompts, at twice "
            "the training time)"
        ),
    )
    epochs: int = field(
        default=1,
        metadata=_help(
            "passes over the training data (1: held-out typing saved as with 2, within noise, "
            "at half the training time)"
        ),
    )
    train_batch_size: int = field(default=4, metadata=_help("examples per optimiser step"))
    train_processes: int = field(
        default=1,
        metadata=_help("training processes (accelerate launch): the GPUs to use, or CPU processes"),
    )
    context_loss_weight: float = field(
        default=0.0,
        metadata=_help(
            "sft: weight of a likelihood term on the prompt's own tokens (the code before the "
            "cursor in the developer's files) beside the one on the kept text; 0 = kept text only"
        ),
    )
    dpo_beta: float = field(default=0.1, metadata=_help("DPO's beta"))
    nll_weight: float = field(
        default=1.0,
        metadata=_help("weight of the likelihood term on the kept text in dpo and rrhf"),
    )
    rrhf_samples: int = field(
        default=0,
        metadata=_help("extra candidates per prompt sampled from the model for rrhf (slow)"),
    )
    eval_share: float = field(
        default=0.2, metadata=_help("share of the newest examples held out for the gate")
    )
    max_user_share: float = field(
        default=0.5, metadata=_help("most of a training batch one user may contribute")
    )
    min_train_examples: int = field(
        default=16, metadata=_help("fewer training examples than this: nothing is trained")
    )
    min_eval_examples: int = field(
        default=8, metadata=_help("fewer held-out examples than this: nothing is trained")
    )
    gate_min_lift: float = field(
        default=0.0,
        metadata=_help(
            "relative rise in characters saved per completion an adapter needs to be "
            "published (its paired 95% interval must exclude zero too)"
        ),
    )
    gate_enforced: bool = field(
        default=True,
        metadata=_help(
            "false publishes an adapter the gate refused, its decision stored beside it: for "
            "measuring a candidate (ghostloop replay --ungated), never for a team's server"
        ),
    )
    keep_adapters: int = field(default=5, metadata=_help("adapter versions kept in the registry"))
    # -- serving adapters (hot-swap and canary)
    adapter_poll_s: float = field(
        default=30.0,
        metadata=_help(
            "seconds between the server's checks of the adapters table; 0 = at start only"
        ),
    )
    canary_share: float = field(
        default=0.0,
        metadata=_help(
            "share of users a newly published adapter is served to first (sticky per user); "
            "0 = it serves everyone at once (one developer cannot be split into arms)"
        ),
    )
    canary_min_completions: int = field(
        default=200,
        metadata=_help("settled completions per arm between two tests of a canary"),
    )
    canary_max_completions: int = field(
        default=2000,
        metadata=_help("per arm: by then a canary no better and no worse is retired"),
    )
    canary_confidence: float = field(
        default=0.95,
        metadata=_help("confidence of the canary's verdict over all its tests together"),
    )
    canary_check_s: float = field(
        default=300.0, metadata=_help("seconds between a server's tests of a running canary")
    )
    seed: int = field(default=0, metadata=_help("seed for training, sampling and intervals"))

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SettingsError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise SettingsError(f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(
                f"log_level={self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        for name, low in (
            ("threads", 0),
            ("context_tokens", 16),
            ("kv_cache_mb", 0),
            ("batch_size", 1),
            ("max_new_tokens", 1),
            ("max_lines", 1),
            ("deadline_ms", 1),
            ("max_document_chars", 1),
            ("max_stored_prompt_chars", 0),
            ("lora_rank", 1),
            ("lora_alpha", 1),
            ("train_context_tokens", 0),
            ("epochs", 1),
            ("train_batch_size", 1),
            ("train_processes", 1),
            ("rrhf_samples", 0),
            ("min_train_examples", 1),
            ("min_eval_examples", 1),
            ("keep_adapters", 1),
            ("adapter_poll_s", 0),
            ("canary_min_completions", 1),
            ("canary_check_s", 0),
            ("metrics_port", 0),
            ("rate_limit_per_minute", 0),
            ("max_message_bytes", 1024),
            ("max_open_documents", 1),
            ("idle_timeout_s", 0),
        ):
            if getattr(self, name) < low:
                raise SettingsError(f"{name}={getattr(self, name)} must be at least {low}")
        try:
            windows = self.survival_windows
        except ValueError:
            windows = ()
        if not windows or any(w <= 0 for w in windows) or list(windows) != sorted(windows):
            raise SettingsError(
                f"survival_windows_s={self.survival_windows_s!r} must be increasing positive "
                "seconds separated by commas, e.g. '30,120,600'"
            )
        if self.train_method not in TRAIN_METHODS:
            raise SettingsError(
                f"train_method={self.train_method!r} is not one of {', '.join(TRAIN_METHODS)}"
            )
        for name in ("eval_share", "max_user_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise SettingsError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if not 0.0 <= self.context_loss_weight <= 100.0:
            raise SettingsError(
                f"context_loss_weight={self.context_loss_weight} must be in [0, 100]"
            )
        if not 0.0 <= self.canary_share < 1.0:
            raise SettingsError(f"canary_share={self.canary_share} must be in [0, 1)")
        if not 0.5 <= self.canary_confidence < 1.0:
            raise SettingsError(f"canary_confidence={self.canary_confidence} must be in [0.5, 1)")
        if self.canary_max_completions < self.canary_min_completions:
            raise SettingsError(
                f"canary_max_completions={self.canary_max_completions} must be at least "
                f"canary_min_completions={self.canary_min_completions}"
            )
        if not self.lora_target_modules:
            raise SettingsError("lora_targets is empty; name modules such as 'q_proj,v_proj'")
        if self.metrics_port > 65535:
            raise SettingsError(f"metrics_port={self.metrics_port} must be a port (1-65535) or 0")
        if self.tcp_auth not in TCP_AUTH:
            raise SettingsError(f"tcp_auth={self.tcp_auth!r} is not one of {', '.join(TCP_AUTH)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError(
                "TLS needs both tls_cert and tls_key (PEM files); set both or neither"
            )
        if self.message_timeout_s <= 0:
            raise SettingsError(f"message_timeout_s={self.message_timeout_s} must be positive")
        if not 0.0 <= self.suffix_share < 1.0:
            raise SettingsError(f"suffix_share={self.suffix_share} must be in [0, 1)")

    @property
    def stored_user(self) -> str:
        """The user as completion rows name it: the name, or its digest with hash_user."""
        if not self.hash_user:
            return self.user
        return "sha256:" + hashlib.sha256(self.user.encode("utf-8")).hexdigest()[:32]

    @property
    def survival_windows(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.survival_windows_s.split(","))

    @property
    def canary_plan(self) -> dict[str, Any]:
        """How a canary is tested: the keyword arguments of ``feedback.canary.check``."""
        return {
            "min_completions": self.canary_min_completions,
            "max_completions": self.canary_max_completions,
            "confidence": self.canary_confidence,
            "seed": self.seed,
        }

    @property
    def lora_target_modules(self) -> list[str]:
        return [part.strip() for part in self.lora_targets.split(",") if part.strip()]

    @property
    def adapters_dir(self) -> Path:
        """The adapter registry: one directory per published version."""
        return self.data_dir / "adapters"

    @property
    def torch_threads(self) -> int:
        return self.threads or physical_cores()

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache or self.data_dir / "models"

    def with_overrides(self, values: Mapping[str, Any], *, source: str) -> Settings:
        """A copy with ``values`` applied; unknown names and bad values raise SettingsError."""
        changes = {
            _CAMEL.get(name, name): _coerce(name, value, source) for name, value in values.items()
        }
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_CAMEL = {
    "".join(p.capitalize() if i else p for i, p in enumerate(n.split("_"))): n for n in _FIELDS
}


def _field_type(name: str) -> str:
    return str(_FIELDS[name].type)


def _coerce(name: str, value: Any, source: str) -> Any:
    canonical = _CAMEL.get(name, name)
    if canonical not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise SettingsError(f"unknown setting {name!r} in {source}; known settings: {known}")
    kind = _field_type(canonical)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind in ("Path", "Path | None"):
            return Path(str(value)).expanduser() if str(value) else None
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {canonical}={value!r} in {source} is not a valid {kind}"
        ) from None


def backend_name(settings: Settings) -> str:
    """What a server of ``settings`` generates with, as ``replay --backend`` names it."""
    if settings.backend == "onnxruntime" and settings.onnx_int8:
        return "onnxruntime-int8"
    return settings.backend


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the TOML file and environment once; ``overrides`` (e.g. CLI flags) win over both."""
    env = os.environ if environ is None else environ
    settings = Settings()
    config_path = (
        Path(env[f"{ENV_PREFIX}CONFIG"]).expanduser()
        if env.get(f"{ENV_PREFIX}CONFIG")
        else _default_config_path()
    )
    explicit = bool(env.get(f"{ENV_PREFIX}CONFIG"))
    if config_path.is_file():
        try:
            table = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SettingsError(f"config file {config_path} is not valid TOML: {error}") from None
        table = table.get("ghostloop", table)
        table.pop("config", None)
        settings = settings.with_overrides(table, source=str(config_path))
    elif explicit:
        raise SettingsError(
            f"GHOSTLOOP_CONFIG names {config_path}, which does not exist; "
            "create it or unset GHOSTLOOP_CONFIG"
        )
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in _FIELDS
    }
    from_env["config"] = str(config_path) if config_path.is_file() else ""
    settings = settings.with_overrides(from_env, source="the environment")
    if overrides:
        settings = settings.with_overrides(overrides, source="the command line")
    return settings


def settings_reference() -> list[tuple[str, str, str]]:
    """(env var, default, help) for each setting: docs/settings.md is made from it."""
    defaults = Settings()
    rows = []
    for f in dataclasses.fields(Settings):
        default = getattr(defaults, f.name)
        if f.name == "data_dir":
            shown = "platform user data dir"
        elif f.name == "user":
            shown = "OS user"
        elif default is None or isinstance(default, bool):
            shown = str(default).lower()  # as the TOML file and the environment spell them
        else:
            shown = repr(default)
        rows.append((f"{ENV_PREFIX}{f.name.upper()}", shown, f.metadata.get("help", "")))
    return rows


SETTINGS_DOC_INTRO = """\
# Settings

One settings object, read once. Sources, later ones win: defaults, the TOML file
(`GHOSTLOOP_CONFIG`, or `~/.config/ghostloop/config.toml`; keys as below in snake_case,
optionally under a `[ghostloop]` table), `GHOSTLOOP_*` environment variables, the
client's `initializationOptions` (snake_case or camelCase). An unknown name or a bad value
is an error that names the setting. `ghostloop config` prints the effective values.

This page is generated from the settings' own help (`python -m ghostloop.settings >
docs/settings.md`); a test fails when it is out of date.
"""


def settings_markdown() -> str:
    """docs/settings.md: the introduction and one table row per setting."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, text in settings_reference():
        rows.append(f"| `{name}` | {default} | {text.replace('|', chr(92) + '|')} |")
    return SETTINGS_DOC_INTRO + "\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
