"""The run configuration: one frozen, plain-data description of one ablation cell and seed.

A config is read from YAML, overridden with dotted ``key=value`` pairs, validated (messages name
the field), and hashed into a stable id. Everything downstream (grids, launching, tracking,
reports) works on these objects or their flattened dict.

``runtime`` settings (workers, logging cadence, compile, device) change how a run executes but
not what it computes, so they are left out of the ids: changing them never re-runs a cell.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from harness.core.errors import ConfigError, did_you_mean
from harness.core.frozen import FrozenModel
from harness.evaluate.protocols import DEFAULT_PROTOCOLS, PROTOCOLS
from harness.milan.switches import DecoderKind, Masking, Target


class ModelConfig(FrozenModel):
    size: str = "vit_base_patch16"  # a preset of harness.milan.presets
    img_size: int = Field(224, gt=0)
    target: Target = "clip"
    decoder: DecoderKind = "prompting"
    masking: Masking = "semantic"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True  # pixel target only
    decoder_width: int | None = Field(None, gt=0)  # None: the preset's decoder shape
    decoder_depth: int | None = Field(None, gt=0)
    decoder_heads: int | None = Field(None, gt=0)


class TeacherConfig(FrozenModel):
    model: str = "ViT-B-16-quickgelu"  # open_clip name, or a model-config JSON path
    pretrained: str | None = "openai"  # open_clip tag, a checkpoint file, or null (random init)
    normalize: Literal["imagenet", "clip"] = "imagenet"  # the authors pass ImageNet-normalised input


class DataConfig(FrozenModel):
    root: str = "data/imagenet"  # ImageFolder tree with train/ and val/
    train_split: str = "train"
    val_split: str = "val"
    # where the pretraining images are decoded: the loader's CPU workers (MAE's transform), or the
    # training device (JPEG only; harness.data.gpu_decode) when the node's cores cannot keep up
    decode: Literal["cpu", "gpu"] = "cpu"


class PretrainConfig(FrozenModel):
    # 0: no pretraining; the run evaluates the untrained encoder (a grid's random-init reference)
    epochs: float = Field(400, ge=0)
    warmup_epochs: float = Field(40, ge=0)
    batch_size: int = Field(64, gt=0)  # per device, per step
    accum_steps: int = Field(1, gt=0)
    base_lr: float = Field(1.5e-4, gt=0)  # lr = base_lr * effective batch / 256
    lr: float | None = Field(None, gt=0)  # absolute lr; overrides base_lr when set
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's, each in [0, 1)
    clip_grad: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # A finished run's folder (relative to the runs dir: <grid>/<cell folder>, as a grid with `evaluates`
    # writes it): this run evaluates that run's final encoder instead of pretraining its own.
    weights_from: str | None = Field(None, min_length=1)


def _eval_config() -> type[FrozenModel]:
    """The ``eval`` section from the protocol registry: which encoder and protocols run, the frozen
    features' batch, and one section per protocol (``eval.linear``, ``eval.knn``, ...) with its settings.

    ``encoder: teacher`` evaluates the frozen teacher's image tower instead of the student (a grid's
    "teacher" reference: with ``pretrain.epochs`` 0, nothing is trained)."""
    protocol_name = Literal[tuple(PROTOCOLS)]  # type: ignore[valid-type]
    sections = {name: (protocol.settings, protocol.settings()) for name, protocol in PROTOCOLS.items()}
    return create_model("EvalConfig", __base__=FrozenModel,
                        encoder=(Literal["student", "teacher"], "student"),
                        protocols=(tuple[protocol_name, ...], DEFAULT_PROTOCOLS),
                        feature_batch_size=(int, Field(256, gt=0)),  # frozen-feature extraction
                        **sections)


EvalConfig = _eval_config()


class RuntimeConfig(FrozenModel):
    """How a run executes; not part of its identity."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(8, ge=0)
    compile: bool = False  # torch.compile the students and the teacher (bench.py speed measures what it buys)
    log_every: int = Field(20, gt=0)  # steps between logged metrics
    checkpoint_every: int = Field(500, gt=0)  # steps between checkpoints (one is written at the end)
    # every collective's limit, in minutes (torch.distributed's process-group timeout); ranks
    # other than 0 wait in one while rank 0 evaluates
    dist_timeout_min: float = Field(60, gt=0)


class RunConfig(FrozenModel):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    eval: EvalConfig = EvalConfig()  # type: ignore[valid-type]
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check_combination(self) -> "RunConfig":
        if not all(0 <= beta < 1 for beta in self.pretrain.betas):
            raise ValueError(f"pretrain.betas {list(self.pretrain.betas)}: AdamW's betas lie in [0, 1), e.g. [0.9, 0.95]")
        if self.eval.encoder == "teacher" and (self.pretrain.epochs or self.pretrain.weights_from):
            raise ValueError("eval.encoder is teacher, which trains nothing: set pretrain.epochs to 0 and leave "
                             "pretrain.weights_from unset")
        if self.pretrain.warmup_epochs > self.pretrain.epochs:
            raise ValueError("pretrain.warmup_epochs is longer than pretrain.epochs")
        return self

    # --- identity ------------------------------------------------------------------------
    def run_id(self) -> str:
        """Stable id of this run (cell + seed): a hash of everything but ``runtime``."""
        return _digest(_identity(self.model_dump(mode="json", exclude={"runtime"})))

    def cell_id(self) -> str:
        """Stable id of the cell: like :meth:`run_id` but shared by all seeds."""
        return _digest(_identity(self.model_dump(mode="json", exclude={"runtime", "seed"})))

    # --- conversions ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"model.target": "clip", ...}."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A new config with dotted-key overrides applied and validated."""
        data = self.to_dict()
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return parse_config(data)


# --- helpers ---------------------------------------------------------------------------------

# Fields added after ids were first issued: left out of an id while they hold their default, so that
# every run made before keeps its id (and its folder). The config sections of the evaluation protocols
# registered after the first three count as such fields.
_ADDED_FIELDS: tuple[tuple[str, str], ...] = (("data", "decode"), ("pretrain", "weights_from"), ("eval", "encoder"))
_FIRST_PROTOCOLS = ("linear", "knn", "finetune")


def _identity(data: dict[str, Any]) -> dict[str, Any]:
    added = _ADDED_FIELDS + tuple(("eval", name) for name in PROTOCOLS if name not in _FIRST_PROTOCOLS)
    for section, name in added:
        if data.get(section, {}).get(name, _MISSING) == _DEFAULTS[section][name]:
            del data[section][name]
    return data


def _digest(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_DEFAULTS: dict[str, Any] = RunConfig().model_dump(mode="json")
_MISSING = object()
FIELD_NAMES: frozenset[str] = frozenset(flatten(_DEFAULTS))


def check_field(key: str) -> None:
    """Raise a ConfigError with a suggestion unless ``key`` is a dotted config field."""
    if key not in FIELD_NAMES:
        hint = did_you_mean(key, FIELD_NAMES) or "see `bench.py run --help` for the config layout"
        raise ConfigError(f"unknown config key {key!r}: {hint}")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key "a.b"; unknown keys are errors."""
    check_field(key)
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def format_value(value: Any) -> str:
    """A config value as text, the inverse of :func:`parse_value`: strings as they are, everything
    else as JSON (True -> "true", None -> "null", (0.9, 0.95) -> "[0.9, 0.95]", nan -> "nan")."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no literal for them
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def parse_value(text: str) -> Any:
    """A value written as text (command line, MLflow param) as YAML: 0.5 -> float, true -> bool,
    null -> None, [a, b] -> list; also the numbers YAML 1.1 leaves as text ("1e-3", "nan", "inf")."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """["model.target=clip", ...] -> {"model.target": "clip", ...}."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not key=value: write e.g. --set model.mask_ratio=0.9")
        check_field(key.strip())
        overrides[key.strip()] = parse_value(value)
    return overrides


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig; the first problem becomes a one-line ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err)}") from None


def describe_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(field, FIELD_NAMES)
        return f"unknown config key {field!r}{': ' + hint if hint else ''}"
    message = first["msg"].removeprefix("Value error, ")
    got = f" (got {first['input']!r})" if first["type"] != "value_error" else ""
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return f"{field + ': ' if field else ''}{message}{got}{more}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}): "
                                "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's mapping: UTF-8 text, valid YAML, no key twice; else a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give the path of a run config YAML")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                          "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML ({problem}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated once at the end."""
    data = load_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return parse_config(data, source=str(path or "config"))
