"""One typed settings object in groups, read once and passed down.

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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "ghostloop"
ENV_PREFIX = "GHOSTLOOP_"
BACKENDS = ("auto", "torch", "onnxruntime")
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


def _setting(default: Any = None, *, help: str, key: str = "", factory: Any = None) -> Any:
    """A leaf setting: its default, its help, and its name in the environment and the TOML
    file (``key``; the field's own name unless given), which never changes with the group."""
    metadata = {"help": help, "key": key}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class _Group:
    """A group of settings, validated on its own when made. Its errors name the setting as
    the user sets it (``GHOSTLOOP_<KEY>`` / the TOML key), never the group's attribute."""

    def _key(self, name: str) -> str:
        found = {f.name: f for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return str(found[name].metadata.get("key") or name)

    def _at_least(self, **lows: float) -> None:
        for name, low in lows.items():
            value = getattr(self, name)
            if value < low:
                raise SettingsError(f"{self._key(name)}={value} must be at least {low}")

    def _one_of(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise SettingsError(f"{self._key(name)}={value!r} is not one of {', '.join(choices)}")

    def _within(self, name: str, low: float, high: float, *, closed: str = "[)") -> None:
        value = getattr(self, name)
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        if not (above and below):
            raise SettingsError(
                f"{self._key(name)}={value} must be in {closed[0]}{low:g}, {high:g}{closed[1]}"
            )


@dataclass(frozen=True)
class InferenceSettings(_Group):
    """The model and where it runs: the server, the nightly job and the replay alike."""

    model: str = _setting(
        "",
        help="Hugging Face id, local model directory or .gguf file; "
        "empty = the embedded SmolLM2-135M-Instruct",
    )
    backend: str = _setting(
        "auto",
        help="inference backend: auto (onnxruntime on a CPU, exported on first start while "
        "torch serves; torch on a GPU or without onnxruntime) | torch | onnxruntime",
    )
    onnx_int8: bool = _setting(
        False, help="onnxruntime: serve an int8 copy of each export (weights in blocks of 128)"
    )
    device: str = _setting(
        "auto", help="auto (CUDA in bf16 when present, else CPU fp32) | cpu | cuda"
    )
    threads: int = _setting(0, help="torch CPU threads; 0 = the number of physical cores")

    def __post_init__(self) -> None:
        self._one_of("backend", BACKENDS)
        self._one_of("device", DEVICES)
        self._at_least(threads=0)

    @property
    def torch_threads(self) -> int:
        return self.threads or physical_cores()


@dataclass(frozen=True)
class ServingSettings(_Group):
    """What a completion may be: its prompt, its decoding, its limits."""

    context_tokens: int = _setting(512, help="prompt budget in tokens (prefix plus suffix)")
    suffix_share: float = _setting(
        0.25, help="share of the budget given to the suffix (FIM models)"
    )
    kv_cache_mb: int = _setting(
        256,
        help="memory for KV caches kept per document between keystrokes (LRU); 0 = no reuse",
    )
    batch_size: int = _setting(
        4,
        help="most completions (documents waiting at once) decoded together, one forward pass "
        "per token for all (torch backend); 1 = one at a time",
    )
    max_new_tokens: int = _setting(48, help="most tokens generated per completion")
    max_lines: int = _setting(8, help="most lines in a multi-line completion")
    deadline_ms: int = _setting(
        3000, help="a completion running longer returns what it has generated so far"
    )
    max_document_chars: int = _setting(
        2_000_000, help="documents larger than this get no completions"
    )

    def __post_init__(self) -> None:
        self._at_least(
            context_tokens=16,
            kv_cache_mb=0,
            batch_size=1,
            max_new_tokens=1,
            max_lines=1,
            deadline_ms=1,
            max_document_chars=1,
        )
        self._within("suffix_share", 0.0, 1.0)


@dataclass(frozen=True)
class ContextSettings(_Group):
    """The developer's repository in the prompt: where snippets come from and how much."""

    repo_context_tokens: int = _setting(
        0,
        help="tokens of repository snippets before the file's own prefix (on top of "
        "context_tokens); 0 = none",
    )
    context_chunk_lines: int = _setting(10, help="lines per repository snippet")
    context_max_files: int = _setting(
        5000, help="most files of the workspace indexed (the rest are skipped, said once)"
    )
    context_max_file_kb: int = _setting(512, help="larger files of the workspace are skipped")
    context_max_total_mb: int = _setting(
        64, help="most bytes of the workspace's files indexed in all"
    )

    def __post_init__(self) -> None:
        self._at_least(
            repo_context_tokens=0,
            context_chunk_lines=1,
            context_max_files=0,
            context_max_file_kb=1,
            context_max_total_mb=1,
        )


@dataclass(frozen=True)
class StoreSettings(_Group):
    """Where Ghostloop keeps things, and what it records of each suggestion."""

    data_dir: Path = _setting(
        factory=_default_data_dir, help="where the model cache, database and logs live"
    )
    model_cache: Path | None = _setting(
        None, help="where converted models and ONNX exports are kept; none: <data dir>/models"
    )
    database_url: str = _setting("", help="SQLAlchemy URL; empty = SQLite file in the data dir")
    telemetry: bool = _setting(
        True, help="record suggestions and their fate; false = store nothing of your code"
    )
    user: str = _setting(factory=_default_user, help="who completions are attributed to")
    hash_user: bool = _setting(
        False, help="store a SHA-256 digest of the user name instead of the name"
    )
    max_stored_prompt_chars: int = _setting(
        16_000, help="stored prompt prefix and suffix are each cut to this many characters"
    )
    survival_windows_s: str = _setting(
        "30,120,600", help="seconds after an accept at which the kept share is measured"
    )

    def __post_init__(self) -> None:
        self._at_least(max_stored_prompt_chars=0)
        try:
            windows = self.survival_windows
        except ValueError:
            windows = ()
        if not windows or any(w <= 0 for w in windows) or list(windows) != sorted(windows):
            raise SettingsError(
                f"survival_windows_s={self.survival_windows_s!r} must be increasing positive "
                "seconds separated by commas, e.g. '30,120,600'"
            )

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
    def adapters_dir(self) -> Path:
        """The adapter registry: one directory per published version."""
        return self.data_dir / "adapters"

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache or self.data_dir / "models"


@dataclass(frozen=True)
class TeamSettings(_Group):
    """A connection's limits (stdio and TCP), the team server on TCP, and its metrics."""

    tcp_auth: str = _setting(
        "auto",
        help="serve --tcp: auto (clients off loopback need a token from `ghostloop users add`) "
        "| required (every client does) | off (nobody does: a trusted network only)",
    )
    tls_cert: Path | None = _setting(
        None, help="serve --tcp: PEM certificate chain; with tls_key, TLS"
    )
    tls_key: Path | None = _setting(None, help="serve --tcp: PEM private key of tls_cert")
    rate_limit_per_minute: int = _setting(
        600, help="serve --tcp: completions a user may ask for per minute; 0 = no limit"
    )
    max_message_bytes: int = _setting(
        16 * 2**20,
        help="a longer LSP message is refused: on TCP its connection closes, on stdio it is "
        "skipped",
    )
    max_open_documents: int = _setting(500, help="documents one connection may hold open at once")
    message_timeout_s: float = _setting(
        30.0, help="serve --tcp: a message must arrive whole within this many seconds"
    )
    idle_timeout_s: float = _setting(
        3600.0, help="serve --tcp: a connection silent this long is closed; 0 = never"
    )
    metrics_port: int = _setting(
        0, help="serve Prometheus metrics at http://metrics_host:PORT/metrics; 0 = off"
    )
    metrics_host: str = _setting(
        "127.0.0.1", help="address of the metrics endpoint (loopback only)"
    )

    def __post_init__(self) -> None:
        self._one_of("tcp_auth", TCP_AUTH)
        self._at_least(
            rate_limit_per_minute=0,
            max_message_bytes=1024,
            max_open_documents=1,
            idle_timeout_s=0,
            metrics_port=0,
        )
        if self.metrics_port > 65535:
            raise SettingsError(f"metrics_port={self.metrics_port} must be a port (1-65535) or 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError(
                "TLS needs both tls_cert and tls_key (PEM files); set both or neither"
            )
        if self.message_timeout_s <= 0:
            raise SettingsError(f"message_timeout_s={self.message_timeout_s} must be positive")


@dataclass(frozen=True)
class CanarySettings(_Group):
    """Serving published adapters: the hot-swap's polling and the canary's test."""

    adapter_poll_s: float = _setting(
        30.0, help="seconds between the server's checks of the adapters table; 0 = at start only"
    )
    share: float = _setting(
        0.0,
        key="canary_share",
        help="share of users a newly published adapter is served to first (sticky per user); "
        "0 = it serves everyone at once (one developer cannot be split into arms)",
    )
    min_completions: int = _setting(
        200,
        key="canary_min_completions",
        help="settled completions per arm between two tests of a canary",
    )
    max_completions: int = _setting(
        2000,
        key="canary_max_completions",
        help="per arm: by then a canary no better and no worse is retired",
    )
    confidence: float = _setting(
        0.95,
        key="canary_confidence",
        help="confidence of the canary's verdict over all its tests together",
    )
    check_s: float = _setting(
        300.0, key="canary_check_s", help="seconds between a server's tests of a running canary"
    )

    def __post_init__(self) -> None:
        self._at_least(adapter_poll_s=0, min_completions=1, check_s=0)
        self._within("share", 0.0, 1.0)
        self._within("confidence", 0.5, 1.0)
        if self.max_completions < self.min_completions:
            raise SettingsError(
                f"canary_max_completions={self.max_completions} must be at least "
                f"canary_min_completions={self.min_completions}"
            )


@dataclass(frozen=True)
class SftConfig(_Group):
    """Supervised fine-tuning on what the developer kept."""

    learning_rate: float = _setting(5e-4, help="learning rate for sft and dpo")
    context_loss_weight: float = _setting(
        0.0,
        help="sft: weight of a likelihood term on the prompt's own tokens (the code before the "
        "cursor in the developer's files) beside the one on the kept text; 0 = kept text only",
    )

    def __post_init__(self) -> None:
        self._within("context_loss_weight", 0.0, 100.0, closed="[]")


@dataclass(frozen=True)
class DpoConfig(_Group):
    """DPO on (kept, rejected) pairs, with a likelihood term on the kept text."""

    learning_rate: float = _setting(5e-4, help="learning rate for sft and dpo")
    beta: float = _setting(0.1, key="dpo_beta", help="DPO's beta")
    nll_weight: float = _setting(
        1.0, help="weight of the likelihood term on the kept text in dpo and rrhf"
    )


@dataclass(frozen=True)
class RrhfConfig(_Group):
    """RRHF: candidates ranked by characters saved, with a likelihood term on the kept text."""

    learning_rate: float = _setting(
        1e-4,
        key="rrhf_learning_rate",
        help="learning rate for rrhf (lower: its ranking loss is sharper)",
    )
    nll_weight: float = _setting(
        1.0, help="weight of the likelihood term on the kept text in dpo and rrhf"
    )
    samples: int = _setting(
        0,
        key="rrhf_samples",
        help="extra candidates per prompt sampled from the model for rrhf (slow)",
    )

    def __post_init__(self) -> None:
        self._at_least(samples=0)


MethodConfig = SftConfig | DpoConfig | RrhfConfig


@dataclass(frozen=True)
class TrainingSettings(_Group):
    """The nightly job (``ghostloop train``): its data, its LoRA, its gate; one config per
    method. Defaults are what the lab run supports (docs/architecture.md) and the replays
    measured (docs/results.md)."""

    method: str = _setting(
        "sft",
        key="train_method",
        help="sft | dpo | rrhf: the method `ghostloop train` uses without --method",
    )
    lora_rank: int = _setting(16, help="LoRA rank")
    lora_alpha: int = _setting(32, help="LoRA alpha")
    lora_targets: str = _setting(
        "q_proj,k_proj,v_proj,o_proj", help="modules LoRA adapts, separated by commas"
    )
    context_tokens: int = _setting(
        0,
        key="train_context_tokens",
        help="prompt budget in training, tokens: the nearest part of the served prompt (its "
        "end, token healing included, is the same); 0 = the served prompt whole (the "
        "default: more typing saved held out than 256-token training prompts, at twice the "
        "training time)",
    )
    epochs: int = _setting(
        1,
        help="passes over the training data (1: held-out typing saved as with 2, within noise, "
        "at half the training time)",
    )
    batch_size: int = _setting(4, key="train_batch_size", help="examples per optimiser step")
    processes: int = _setting(
        1,
        key="train_processes",
        help="training processes (accelerate launch): the GPUs to use, or CPU processes",
    )
    eval_share: float = _setting(0.2, help="share of the newest examples held out for the gate")
    max_user_share: float = _setting(0.5, help="most of a training batch one user may contribute")
    min_train_examples: int = _setting(
        16, help="fewer training examples than this: nothing is trained"
    )
    min_eval_examples: int = _setting(
        8, help="fewer held-out examples than this: nothing is trained"
    )
    gate_min_lift: float = _setting(
        0.0,
        help="relative rise in characters saved per completion an adapter needs to be "
        "published (its paired 95% interval must exclude zero too)",
    )
    gate_enforced: bool = _setting(
        True,
        help="false publishes an adapter the gate refused, its decision stored beside it: for "
        "measuring a candidate (ghostloop replay --ungated), never for a team's server",
    )
    keep_adapters: int = _setting(5, help="adapter versions kept in the registry")
    sft: SftConfig = field(default_factory=SftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rrhf: RrhfConfig = field(default_factory=RrhfConfig)

    def __post_init__(self) -> None:
        self._one_of("method", TRAIN_METHODS)
        self._at_least(
            lora_rank=1,
            lora_alpha=1,
            context_tokens=0,
            epochs=1,
            batch_size=1,
            processes=1,
            min_train_examples=1,
            min_eval_examples=1,
            keep_adapters=1,
        )
        self._within("eval_share", 0.0, 1.0, closed="(]")
        self._within("max_user_share", 0.0, 1.0, closed="(]")
        if not self.lora_target_modules:
            raise SettingsError("lora_targets is empty; name modules such as 'q_proj,v_proj'")

    @property
    def lora_target_modules(self) -> list[str]:
        return [part.strip() for part in self.lora_targets.split(",") if part.strip()]

    def config_for(self, method: str) -> MethodConfig:
        """The config of ``method`` (sft, dpo or rrhf)."""
        if method not in TRAIN_METHODS:
            raise SettingsError(f"method {method!r} is not one of {', '.join(TRAIN_METHODS)}")
        config: MethodConfig = getattr(self, method)
        return config


@dataclass(frozen=True)
class Settings(_Group):
    """Everything a Ghostloop process can be told, in groups. Each leaf is also
    ``GHOSTLOOP_<KEY>`` and a TOML key, flat: the groups are how the code reads them."""

    inference: InferenceSettings = field(default_factory=InferenceSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    team: TeamSettings = field(default_factory=TeamSettings)
    canary: CanarySettings = field(default_factory=CanarySettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    config: Path | None = _setting(None, help="path of the TOML settings file (env var only)")
    log_level: str = _setting(
        "INFO",
        help="DEBUG | INFO | WARNING | ERROR (logs go to stderr, and on stdio to the editor as "
        "window/logMessage once a session is initialized; DEBUG adds every LSP message)",
    )
    seed: int = _setting(0, help="seed for training, sampling and intervals")

    def __post_init__(self) -> None:
        self._one_of("log_level", LOG_LEVELS)

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings with ``values`` by their flat keys (``Settings.of(device="cpu")``),
        the rest defaults; checked as the environment's would be."""
        return cls().replaced(**values)

    def replaced(self, **values: Any) -> Settings:
        """A copy with ``values`` by their flat keys, checked."""
        return self.with_overrides(values, source="the code")

    @property
    def canary_plan(self) -> dict[str, Any]:
        """How a canary is tested: the keyword arguments of ``feedback.canary.check``."""
        return {
            "min_completions": self.canary.min_completions,
            "max_completions": self.canary.max_completions,
            "confidence": self.canary.confidence,
            "seed": self.seed,
        }

    def value(self, key: str) -> Any:
        """A setting by its flat key (``device``, ``canary_share``)."""
        if key not in _KEYS:
            raise SettingsError(f"unknown setting {key!r}; known settings: {_known()}")
        node: Any = self
        for part in _KEYS[key][0]:
            node = getattr(node, part)
        return node

    def with_overrides(self, values: Mapping[str, Any], *, source: str) -> Settings:
        """A copy with ``values`` (flat keys, snake_case or camelCase) applied; unknown
        names and bad values raise SettingsError, and nothing changes."""
        changes: dict[tuple[str, ...], Any] = {}
        for name, value in values.items():
            key = _CAMEL.get(name, name)
            if key not in _KEYS:
                raise SettingsError(
                    f"unknown setting {name!r} in {source}; known settings: {_known()}"
                )
            coerced = _coerce(key, value, source)
            for path in _KEYS[key]:
                changes[path] = coerced
        return _replaced(self, changes)


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, field) of every leaf setting under ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, _Group):
            found.extend(_leaves(kind, (*prefix, f.name)))
        else:
            found.append(((*prefix, f.name), f))
    return found


def _replaced(node: Any, changes: Mapping[tuple[str, ...], Any]) -> Any:
    """``node`` with the leaf at each path replaced; each changed group made anew, so it
    validates itself."""
    direct = {path[0]: value for path, value in changes.items() if len(path) == 1}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in changes.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        direct[name] = _replaced(getattr(node, name), inner)
    return dataclasses.replace(node, **direct) if direct else node


_LEAVES = _leaves(Settings)
# flat key -> the paths it sets (learning_rate and nll_weight are shared by two methods)
_KEYS: dict[str, list[tuple[str, ...]]] = {}
_FIELDS: dict[str, Any] = {}
for _path, _field in _LEAVES:
    _key = str(_field.metadata.get("key") or _field.name)
    _KEYS.setdefault(_key, []).append(_path)
    _FIELDS.setdefault(_key, _field)
_CAMEL = {"".join(p.capitalize() if i else p for i, p in enumerate(n.split("_"))): n for n in _KEYS}


def _known() -> str:
    return ", ".join(sorted(_KEYS))


def _field_type(name: str) -> str:
    return str(_FIELDS[name].type)


def _coerce(name: str, value: Any, source: str) -> Any:
    canonical = _CAMEL.get(name, name)
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
            if value is None or not str(value):
                if kind == "Path":
                    raise ValueError(value)
                return None
            return Path(str(value)).expanduser()
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {canonical}={value!r} in {source} is not a valid {kind}"
        ) from None


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
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in _KEYS
    }
    from_env["config"] = str(config_path) if config_path.is_file() else ""
    settings = settings.with_overrides(from_env, source="the environment")
    if overrides:
        settings = settings.with_overrides(overrides, source="the command line")
    return settings


def settings_reference() -> list[tuple[str, str, str]]:
    """(env var, default, help) for each setting, group by group: docs/settings.md is made
    from it."""
    return [row for _, rows in _reference_by_group() for row in rows]


def _reference_by_group() -> list[tuple[str, list[tuple[str, str, str]]]]:
    defaults = Settings()
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for key, paths in _KEYS.items():
        default = defaults.value(key)
        if key == "data_dir":
            shown = "platform user data dir"
        elif key == "user":
            shown = "OS user"
        elif default is None or isinstance(default, bool):
            shown = str(default).lower()  # as the TOML file and the environment spell them
        else:
            shown = repr(default)
        group = paths[0][0] if len(paths[0]) > 1 else ""
        help_text = str(_FIELDS[key].metadata.get("help", ""))
        groups.setdefault(group, []).append((f"{ENV_PREFIX}{key.upper()}", shown, help_text))
    return list(groups.items())


SETTINGS_DOC_INTRO = """\
# Settings

One settings object, read once. Sources, later ones win: defaults, the TOML file
(`GHOSTLOOP_CONFIG`, or `~/.config/ghostloop/config.toml`; keys as below in snake_case,
optionally under a `[ghostloop]` table), `GHOSTLOOP_*` environment variables, the
client's `initializationOptions` (snake_case or camelCase). An unknown name or a bad value
is an error that names the setting. `ghostloop config` prints the effective values.

Names are flat; the code reads them in groups (`settings.serving.context_tokens`,
`settings.training.dpo.beta`), each group checked on its own. `learning_rate` sets both
sft's and dpo's, `nll_weight` both dpo's and rrhf's.

This page is generated from the settings' own help (`python -m ghostloop.settings >
docs/settings.md`); a test fails when it is out of date.
"""


def settings_markdown() -> str:
    """docs/settings.md: the introduction and a table per group, a row per setting."""
    parts = [SETTINGS_DOC_INTRO]
    for group, rows in _reference_by_group():
        title = group or "general"
        kind = type(getattr(Settings(), group)) if group else None
        about = (kind.__doc__ or "") if kind else "The settings file, logging, and the seed"
        about = about.split("\n\n")[0].split(". ")[0].strip().rstrip(".")
        lines = [f"## {title}", "", f"{' '.join(about.split())}.", ""]
        lines += ["| variable | default | meaning |", "|---|---|---|"]
        for name, default, text in rows:
            lines.append(f"| `{name}` | {default} | {text.replace('|', chr(92) + '|')} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(settings_markdown(), end="")
