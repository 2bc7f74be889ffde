"""params.yaml validation: every refusal names the key and says what to do."""

from pathlib import Path

import pytest
import yaml

from aeselect.config import (
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_assignment,
    read_yaml,
    valid_keys,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_demo_sized():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "synthetic"
    assert cfg.latent_shape == (8, 8, 4)
    assert cfg.data.image_size <= 64


def test_shipped_params_set_every_key():
    """params.yaml is the source of truth: no knob may exist only as a code default."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(flatten(raw)) == sorted(valid_keys())


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(
        ConfigError,
        match=r"model\.latent_chanels: unknown key; did you mean 'model\.latent_channels'",
    ):
        from_dict({"model": {"latent_chanels": 8}})


def test_unknown_override_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"did you mean 'train\.max_steps'"):
        apply_overrides({}, {"train.max_step": 10})


def test_unknown_section():
    with pytest.raises(ConfigError, match="modle: unknown key; did you mean 'model'"):
        from_dict({"modle": {}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"latent_channels": "eight"}},
            r"model\.latent_channels: must be an integer, got 'eight'",
        ),
        ({"model": {"latent_channels": 8.5}}, r"model\.latent_channels: must be an integer"),
        ({"model": {"variational": "yes"}}, r"model\.variational: must be true or false"),
        ({"data": {"source": "s3"}}, r"data\.source: must be one of \['synthetic', 'folder'\]"),
        ({"train": {"lr": "fast"}}, r"train\.lr: must be a number"),
        ({"model": {"base_channels": 12}}, r"model\.base_channels: must be a multiple of 8"),
        ({"data": {"val_fraction": 1.0}}, r"data\.val_fraction: must be between 0 and 1"),
        ({"loss": {"aux_weight": -0.1}}, r"loss\.aux_weight: must be >= 0"),
        ({"data": {"num_classes": 300}}, r"data\.num_classes: must be in \[2, 255\]"),
        ({"model": "wide"}, r"model: must be a mapping"),
        ({"train": {"lr": float("inf")}}, r"train\.lr: must be a finite number, got inf"),
        ({"train": {"lr": "inf"}}, r"train\.lr: must be a finite number"),
        ({"loss": {"mse_weight": float("inf")}}, r"loss\.mse_weight: must be a finite number"),
        ({"loss": {"kl_weight": "-inf"}}, r"loss\.kl_weight: must be a finite number"),
        ({"loss": {"aux_weight": float("nan")}}, r"loss\.aux_weight: must be a finite number"),
        ({"evaluate": {"min_psnr": float("inf")}}, r"evaluate\.min_psnr: must be a finite"),
        ({"evaluate": {"min_psnr": -1}}, r"evaluate\.min_psnr: must be in \[0, 100\] dB"),
        ({"evaluate": {"min_psnr": 120}}, r"evaluate\.min_psnr: must be in \[0, 100\] dB"),
        ({"evaluate": {"max_mse": 1.5}}, r"evaluate\.max_mse: must be in \(0, 1\]"),
        ({"evaluate": {"max_mse": 0}}, r"evaluate\.max_mse: must be in \(0, 1\]"),
        (
            {"evaluate": {"min_compression_ratio": float("inf")}},
            r"evaluate\.min_compression_ratio: must be a finite number",
        ),
        ({"evaluate": {"max_spike_ratio": 0.5}}, r"evaluate\.max_spike_ratio: must be >= 1"),
        ({"data": {"num_images": 0}}, r"data\.num_images: must be >= 2 \(synthetic scenes"),
        (
            {"data": {"source": "folder", "num_images": 1}},
            r"data\.num_images: must be 0 \(every image under data\.root\) or >= 2",
        ),
        ({"train": {"seed": -1}}, r"train\.seed: must be >= 0"),
    ],
)
def test_wrong_types_and_ranges(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_image_size_must_divide_by_downsampling():
    with pytest.raises(ConfigError, match=r"image_size=48 is not divisible by 2\^5=32"):
        from_dict({"data": {"image_size": 48}, "model": {"downsampling_steps": 5}})


def test_latent_must_be_at_least_2x2():
    with pytest.raises(ConfigError, match=r"1x1 latent; the latent must be at least 2x2"):
        from_dict({"data": {"image_size": 32}, "model": {"downsampling_steps": 5}})


def test_kl_weight_needs_a_variational_model():
    with pytest.raises(
        ConfigError, match=r"loss\.kl_weight: is 0\.001 but model\.variational is false"
    ):
        from_dict({"loss": {"kl_weight": 0.001}})
    assert from_dict(
        {"loss": {"kl_weight": 0.001}, "model": {"variational": True}}
    ).model.variational


def test_integral_floats_are_ints():
    """dvc.api returns integer params as floats; 8.0 must still be a valid channel count."""
    cfg = from_dict({"model": {"latent_channels": 8.0}})
    assert cfg.model.latent_channels == 8
    assert isinstance(cfg.model.latent_channels, int)


def test_channel_schedule_is_derived_from_downsampling_steps():
    for steps, expected in [
        (3, [32, 64, 128, 128]),
        (5, [32, 64, 128, 128, 128, 128]),
        (1, [32, 64]),
    ]:
        cfg = from_dict({"model": {"downsampling_steps": steps, "base_channels": 32}})
        assert cfg.model.channel_schedule() == expected


def test_load_config_prefixes_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  latent_channels: 0\n")
    with pytest.raises(ConfigError, match=rf"{path}: model\.latent_channels: must be >= 1"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  latent_channels: 4\n  base_channels: 8\n  latent_channels: 8\n")
    with pytest.raises(
        ConfigError, match=rf"{path}: model\.latent_channels: given twice, at lines 2 and 4"
    ):
        load_config(path)
    # Anchors, aliases and merge keys stay valid YAML: a merge may override what it merges.
    path.write_text("base: &b {x: 1}\nsame: *b\nmerged:\n  <<: *b\n  x: 2\n")
    assert read_yaml(path) == {"base": {"x": 1}, "same": {"x": 1}, "merged": {"x": 2}}


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("model.variational=true") == ("model.variational", True)
    assert (
        from_dict(apply_overrides({}, dict([parse_assignment("train.lr=1e-3")]))).train.lr == 1e-3
    )
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignment("model.variational")
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number, got inf"):
        from_dict(apply_overrides({}, dict([parse_assignment("train.lr=.inf")])))
