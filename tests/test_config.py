from pathlib import Path

import pytest

from sdtune.config import RunConfig, all_keys, load_config, parse_override, to_toml
from sdtune.errors import ConfigError

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.toml")) + sorted(
    Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml")
)


def test_required_keys_exist():
    keys = {".".join(k) for k in all_keys()}
    for key in [
        "seed",
        "model.base",
        "data.path",
        "data.source",
        "train.max_steps",
        "train.batch_size",
        "train.learning_rate",
        "checkpoint.every_steps",
        "evaluate.every_steps",
    ]:
        assert key in keys


def test_every_key_has_help_text():
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, RunConfig.__mro__[1]):
                walk(ann)
            else:
                assert field.description, f"{model.__name__}.{name} has no docstring"

    walk(RunConfig)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_load(path):
    cfg = load_config(path)
    assert cfg.train.max_steps > 0


def test_toml_and_yaml_and_overrides(tmp_path):
    (tmp_path / "a.toml").write_text(
        'seed = 3\n[train]\nmax_steps = 7\n[data]\nsource = "digits"\n'
    )
    (tmp_path / "a.yaml").write_text("seed: 3\ntrain:\n  max_steps: 7\n")
    a = load_config(tmp_path / "a.toml")
    b = load_config(tmp_path / "a.yaml")
    assert a == b and a.seed == 3 and a.train.max_steps == 7
    c = load_config(
        tmp_path / "a.toml", ["train.max_steps=9", "model.trainable=[unet.*, text_encoder.*]"]
    )
    assert c.train.max_steps == 9
    assert c.model.trainable == ["unet.*", "text_encoder.*"]


def test_data_path_implies_folder(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}"])
    assert cfg.data.source == "folder"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_stepz=3", "unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
        ("max_steps=3", "unknown key 'max_steps' (did you mean 'train.max_steps'?)"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
        ("train.learning_rate=fast", "train.learning_rate: Input should be a valid number"),
        ("data.source=folder", "data.path is required when data.source = 'folder'"),
        (
            "train.optimizer=lamb",
            "train.optimizer: Input should be 'adamw', 'adam', 'rmsprop', 'sgd', 'adamw8bit', "
            "'adafactor', 'prodigy', 'lion' or 'adamw_schedulefree'",
        ),
        (
            "train.optimizer=prodigy",
            "train.learning_rate = 0.0001 with Prodigy, which estimates its own step size and "
            "multiplies it by this: set train.learning_rate = 1.0",
        ),
        ("data.val_fraction=1.5", "data.val_fraction: Input should be less than 1"),
        ("lora.preserve_prompts=['a dog']", "lora.preserve_prompts needs lora.enabled = true"),
        ("lora.preserve_weight=inf", "lora.preserve_weight: Input should be a finite number"),
        ("lora.preserve_weight=0", "lora.preserve_weight: Input should be greater than 0"),
        ("dreambooth.prior_loss_weight=nan", "dreambooth.prior_loss_weight: Input should be a"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_schedule_free_keeps_a_flat_schedule():
    with pytest.raises(ConfigError, match="train.lr_schedule = 'cosine' with schedule-free AdamW"):
        load_config(None, ["train.optimizer=adamw_schedulefree", "train.lr_schedule=cosine"])
    load_config(None, ["train.optimizer=adamw_schedulefree", "train.warmup_steps=10"])


def test_steps_or_epochs_not_both():
    with pytest.raises(ConfigError, match="train.max_steps and train.max_epochs are both set"):
        load_config(None, ["train.max_epochs=2", "train.max_steps=5"])
    with pytest.raises(ConfigError, match="checkpoint.every_steps and checkpoint.every_epochs"):
        load_config(None, ["checkpoint.every_epochs=1", "checkpoint.every_steps=5"])
    cfg = load_config(None, ["train.max_epochs=2.5", "evaluate.every_epochs=1"])
    assert cfg.train.max_epochs == 2.5 and cfg.evaluate.every_epochs == 1


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[train\nmax_steps = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="must end in .toml"):
        load_config(tmp_path / "x.json")
    (tmp_path / "typo.toml").write_text("[trian]\nmax_steps = 1\n")
    with pytest.raises(
        ConfigError, match="typo.toml: unknown key 'trian' \\(did you mean 'train'\\?\\)"
    ):
        load_config(tmp_path / "typo.toml")


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("novalue")


def test_toml_round_trip_with_help(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "seed=5"])
    text = to_toml(cfg, with_help=True)
    assert "# Number of optimizer steps to train." in text
    (tmp_path / "round.toml").write_text(text)
    assert load_config(tmp_path / "round.toml") == cfg
