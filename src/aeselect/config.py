"""The one typed config: `params.yaml` loaded once, validated once, passed to every module.

Every rule about which values and combinations are allowed lives in this file, so a bad
`dvc exp run -S key=value` fails here with the key named, before any work starts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and the fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_group_norm_width(value: int, key: str) -> None:
    _check(value % 8 == 0, key, f"must be a multiple of 8 (GroupNorm groups), got {value}")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "folder"] = "synthetic"
    root: str = "data/raw/images"
    mask_root: str = "data/raw/masks"
    image_size: int = 64
    num_images: int = 320  # synthetic: scenes generated; folder: at most this many (0 = all)
    val_fraction: float = 0.2
    num_classes: int = 5
    on_bad_file: Literal["skip", "fail"] = "skip"

    def validate(self) -> None:
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        if self.source == "folder":
            _check(
                self.num_images == 0 or self.num_images >= 2,
                "data.num_images",
                f"must be 0 (every image under data.root) or >= 2 (at most that many), "
                f"got {self.num_images}",
            )
        else:
            _check(
                self.num_images >= 2,
                "data.num_images",
                f"must be >= 2 (synthetic scenes to generate), got {self.num_images}",
            )
        _check(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            f"must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _check(
            2 <= self.num_classes <= 255,
            "data.num_classes",
            f"must be in [2, 255] (class ids are stored as uint8), got {self.num_classes}",
        )


@dataclass(frozen=True)
class ModelConfig:
    base_channels: int = 16
    latent_channels: int = 4
    downsampling_steps: int = 3
    num_res_blocks: int = 1
    max_channel_mult: int = 4
    variational: bool = False
    aux_hidden_channels: int = 32
    pca_shortcut: bool = False  # a linear block code beside the networks, fitted before training

    def channel_schedule(self) -> list[int]:
        """Channels per level: doubling per downsampling step, capped (SD's is 1,2,4,4)."""
        return [
            self.base_channels * min(2**level, self.max_channel_mult)
            for level in range(self.downsampling_steps + 1)
        ]

    def validate(self) -> None:
        for key in ("base_channels", "latent_channels", "aux_hidden_channels"):
            value = getattr(self, key)
            _check(value >= 1, f"model.{key}", f"must be >= 1, got {value}")
        _check_group_norm_width(self.base_channels, "model.base_channels")
        _check(
            1 <= self.downsampling_steps <= 6,
            "model.downsampling_steps",
            f"must be in [1, 6], got {self.downsampling_steps}",
        )
        _check(
            self.num_res_blocks >= 1,
            "model.num_res_blocks",
            f"must be >= 1, got {self.num_res_blocks}",
        )
        _check(
            self.max_channel_mult >= 1 and self.max_channel_mult & (self.max_channel_mult - 1) == 0,
            "model.max_channel_mult",
            f"must be a power of two >= 1, got {self.max_channel_mult}",
        )


@dataclass(frozen=True)
class LossConfig:
    mse_weight: float = 1.0
    l1_weight: float = 0.0
    kl_weight: float = 0.0
    aux_weight: float = 0.1

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value >= 0, f"loss.{f.name}", f"must be >= 0 (a weight), got {value}")
        _check(
            self.mse_weight + self.l1_weight > 0,
            "loss.mse_weight",
            "mse_weight and l1_weight are both 0: nothing trains the reconstruction",
        )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    num_workers: int = 0
    num_threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    # Training-only randomness (init, batch order, VAE sampling); the top-level `seed` draws the
    # data and the split, so a phase's `repeats` vary this alone and compare the same val images.
    seed: int = 0

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "eval_every", "log_every"):
            value = getattr(self, key)
            _check(value >= 1, f"train.{key}", f"must be >= 1, got {value}")
        for key in ("warmup_steps", "num_workers", "num_threads", "seed"):
            value = getattr(self, key)
            _check(value >= 0, f"train.{key}", f"must be >= 0, got {value}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(
            self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}"
        )
        _check(
            0 <= self.min_lr_fraction <= 1,
            "train.min_lr_fraction",
            f"must be in [0, 1], got {self.min_lr_fraction}",
        )
        _check(
            self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}"
        )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 32
    num_sample_images: int = 8
    max_mse: float = 0.01
    min_psnr: float = 30.0
    min_compression_ratio: float = 24.0
    max_spike_ratio: float = 3.0

    def validate(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            self.num_sample_images >= 1,
            "evaluate.num_sample_images",
            f"must be >= 1, got {self.num_sample_images}",
        )
        # Gates on images in [0, 1]: MSE lies in [0, 1], so PSNR (data range 1) is >= 0 dB.
        _check(
            0 < self.max_mse <= 1,
            "evaluate.max_mse",
            f"must be in (0, 1] (images are in [0, 1], so 1 passes every model), "
            f"got {self.max_mse}",
        )
        _check(
            0 <= self.min_psnr <= 100,
            "evaluate.min_psnr",
            f"must be in [0, 100] dB (0 passes every model; 100 dB is an MSE of 1e-10), "
            f"got {self.min_psnr}",
        )
        _check(
            self.min_compression_ratio > 0,
            "evaluate.min_compression_ratio",
            f"must be > 0, got {self.min_compression_ratio}",
        )
        _check(
            self.max_spike_ratio >= 1,
            "evaluate.max_spike_ratio",
            f"must be >= 1, got {self.max_spike_ratio}",
        )


@dataclass(frozen=True)
class ProbeConfig:
    """The diffusability probe (aeselect.probe): one small denoiser, the same for every candidate,
    trained on its train-split latents and scored on its val latents (README, "The probe")."""

    architecture: Literal["conv-resnet"] = "conv-resnet"  # named so a record says what ran
    width: int = 32
    blocks: int = 3
    schedule: Literal["cosine"] = "cosine"  # alpha-bar(t) of Nichol & Dhariwal 2021
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    train_images: int = 512  # train-split latents the denoiser sees (the first of the seeded split)
    noise_levels: int = 10  # the scoring grid: t = (k + 0.5) / noise_levels
    sample_images: int = 8
    sample_steps: int = 20  # DDIM steps per decoded sample
    seed: int = 0  # init, training draws, scoring noise and samples

    def validate(self) -> None:
        for key in (
            "width",
            "blocks",
            "batch_size",
            "train_images",
            "noise_levels",
            "sample_images",
        ):
            value = getattr(self, key)
            _check(value >= 1, f"probe.{key}", f"must be >= 1, got {value}")
        _check_group_norm_width(self.width, "probe.width")
        _check(
            self.steps >= 0,
            "probe.steps",
            f"must be >= 0 (0 = the Gaussian baseline), got {self.steps}",
        )
        _check(self.lr > 0, "probe.lr", f"must be > 0, got {self.lr}")
        _check(
            self.sample_steps >= 1, "probe.sample_steps", f"must be >= 1, got {self.sample_steps}"
        )
        _check(self.seed >= 0, "probe.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def latent_size(self) -> int:
        return self.data.image_size // 2**self.model.downsampling_steps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Latent (H, W, C) for one image at `data.image_size`."""
        return (self.latent_size, self.latent_size, self.model.latent_channels)

    @property
    def compression_ratio(self) -> float:
        """Image elements per latent element, as evaluate measures it on the real latents."""
        h, w, c = self.latent_shape
        return 3 * self.data.image_size**2 / (h * w * c)

    def validate(self) -> Config:
        """Per-field ranges, then the cross-section rules; returns self so loading can chain."""
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for section in (self.data, self.model, self.loss, self.train, self.evaluate, self.probe):
            section.validate()
        steps, size = self.model.downsampling_steps, self.data.image_size
        _check(
            size % 2**steps == 0,
            "model.downsampling_steps",
            f"data.image_size={size} is not divisible by 2^{steps}={2**steps}; "
            f"pick an image size that is a multiple of {2**steps} or fewer steps",
        )
        _check(
            self.latent_size >= 2,
            "model.downsampling_steps",
            f"{steps} steps turn {size}px into a {self.latent_size}x{self.latent_size} latent; "
            "the latent must be at least 2x2: use fewer steps or larger images",
        )
        _check(
            self.model.variational or self.loss.kl_weight == 0,
            "loss.kl_weight",
            f"is {self.loss.kl_weight} but model.variational is false: a deterministic "
            "autoencoder has no KL term; set loss.kl_weight=0 or model.variational=true",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trained_dict(self) -> dict[str, Any]:
        """The sections train and evaluate run on: every one but `probe`, which only the probe
        stage after them reads. A checkpoint records these, a resume key hashes them."""
        sections = {"data": self.data, "model": self.model, "loss": self.loss}
        sections |= {"train": self.train, "evaluate": self.evaluate}
        return {"seed": self.seed} | {k: dataclasses.asdict(v) for k, v in sections.items()}

    def flat(self) -> dict[str, Any]:
        """`{"model.latent_channels": 4, ...}`: the dotted keys that `dvc exp run -S` uses."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def valid_keys() -> list[str]:
    return list(Config().flat())


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check one YAML scalar against its field type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if annotation is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        # dvc.api and some YAML writers turn 8 into 8.0; accept integral floats, refuse 8.5.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}",
        )
        return value
    if annotation is float:
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; DVC's YAML 1.2 says float.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        # No knob means anything at inf or NaN; range checks alone would let inf through.
        _check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # pragma: no cover


def unknown_key(key: str, candidates: list[str], what: str = "key") -> ConfigError:
    """`key: unknown <what>`, naming the closest candidate (or all of them)."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"{key}: unknown {what}{hint}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "params"
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key(f"{prefix}{key}", [f"{prefix}{k}" for k in fields])
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def from_dict(raw: Any) -> Config:
    """Build and validate; keys missing from `raw` take the dataclass defaults."""
    return _build(Config, raw, "").validate()


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides set (as `dvc exp run -S` would)."""
    merged = copy.deepcopy(raw)
    known = valid_keys()
    for dotted, value in overrides.items():
        if dotted not in known:
            raise unknown_key(dotted, known)
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merged


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping, which PyYAML would resolve silently (the last wins)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, refusing duplicate keys: YAML requires unique keys, and a sweep
    with two experiments of one name, or a params file setting a key twice, must not lose one."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicates(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: checked where its anchor was
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, f"{prefix}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue  # `<<:` merges may override keys; complex keys stay SafeLoader's
                key = self.construct_object(key_node)
                dotted = f"{prefix}.{key}" if prefix else str(key)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(
                        f"{dotted}: given twice, at lines {first[key]} and {line}; YAML keys "
                        "are unique (PyYAML would keep the last silently): keep one"
                    )
                first[key] = line
                self._refuse_duplicates(value_node, dotted, seen)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping file (safe loader, duplicate keys refused); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found; run from the project root or pass --params"
        ) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # safe_load, plus unique keys
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return raw if raw is not None else {}


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Load and validate `params.yaml`; errors are prefixed with the file name."""
    raw = read_yaml(path)
    try:
        return from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_assignment(assignment: str) -> tuple[str, Any]:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"{assignment!r}: expected key=value, e.g. model.latent_channels=8")
    return key.strip(), yaml.safe_load(value)
