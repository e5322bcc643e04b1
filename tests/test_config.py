"""Config: validation errors name the key and the file; overrides; dump/reload round trip."""

from pathlib import Path

import pytest

from diffmis.config import ConfigError, Config, apply_overrides, dump_config, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.diffusion.timesteps == 1000
    assert cfg.data.image_size == (64, 64)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1e-3\n  learning_rat: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.learning_rat" in msg and str(p) in msg and "unknown key" in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path, "trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: eight\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.batch_size" in str(e.value) and "eight" in str(e.value)


def test_bad_literal(tmp_path):
    p = write(tmp_path, "diffusion:\n  schedule: quadratic\n")
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides_parse_yaml_scalars(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1e-3\n")
    cfg = load_config(p, overrides=["train.lr=5e-4", "train.max_steps=7", "data.image_size=[32, 48]",
                                    "train.precision=bf16", "model.params.width=16"])
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.max_steps == 7
    assert cfg.data.image_size == (32, 48)
    assert cfg.train.precision == "bf16"
    assert cfg.model.params == {"width": 16}


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(overrides=["train.nope=1"])


def test_bernoulli_linear_small_T_rejected():
    with pytest.raises(ConfigError, match="linear.*invalid for timesteps=10"):
        load_config(overrides=["diffusion.kind=bernoulli", "diffusion.timesteps=10", "diffusion.schedule=linear"])


def test_dump_reload_identical(tmp_path):
    cfg = load_config(overrides=["experiment.name=x", "data.image_size=48", "model.params.depth=3",
                                 "train.loss_weights.anchor=0.5"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert dump_config(again) == out.read_text()


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train.lr = 3.0  # type: ignore[misc]


def test_shipped_configs_load_by_name(tmp_path, monkeypatch):
    from diffmis.config import builtin_configs, load_config

    names = builtin_configs()
    assert {"hidiff_kvasir", "medsegdiff_mni", "pd_ddpm_drive", "segmentor_kvasir"} <= set(names)
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the package's own files
    assert load_config("hidiff_kvasir").experiment.recipe == "hidiff"
    assert load_config("medsegdiff_v2_mni.yaml", ["train.max_steps=7"]).train.max_steps == 7
    with pytest.raises(ConfigError, match="config file not found: nope.*hidiff_kvasir"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing" / "hidiff_kvasir.yaml")  # a path is a path, never a name


def test_bases_compose_in_order_and_rename_replaces_params(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text(
        "train:\n  lr: 0.1\n  max_steps: 5\nmodel:\n  name: unet\n  params: {features: [1, 2, 3, 4, 5, 6]}\n")
    (tmp_path / "parts" / "b.yaml").write_text("base: a\ntrain:\n  lr: 0.2\nmodel:\n  params: {dropout: 0.1}\n")
    (tmp_path / "run.yaml").write_text("base: [parts/b]\ntrain:\n  batch_size: 3\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (0.2, 5, 3)  # later files win, per key
    assert cfg.model.params == {"features": [1, 2, 3, 4, 5, 6], "dropout": 0.1}  # same name: params merge
    (tmp_path / "other.yaml").write_text("base: parts/b\nmodel:\n  name: segresnet\n  params: {init_filters: 8}\n")
    assert load_config(tmp_path / "other.yaml").model.params == {"init_filters": 8}  # renamed: params replaced


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "x.yaml").write_text("base: y\n")
    (tmp_path / "y.yaml").write_text("base: x\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: missing\n")
    with pytest.raises(ConfigError, match=r"z\.yaml: its base 'missing' does not exist"):
        load_config(tmp_path / "z.yaml")
    (tmp_path / "w.yaml").write_text("base: {a: 1}\n")
    with pytest.raises(ConfigError, match="'base' must name a file"):
        load_config(tmp_path / "w.yaml")


def test_empty_and_duplicate_key_files_are_errors(tmp_path):
    empty = write(tmp_path, "# nothing but a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.1\ndata:\n  image_size: 32\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*key 'train' is written twice \(first on line 1\)"):
        load_config(dup)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is written twice \(first on line 2\)"):
        load_config(nested)
