"""What a member of an ensemble or a merge may be, and how it loads.

- a run directory: its final model (RUN/model), as `sdtune sample RUN` reads it;
- a checkpoint (RUN/checkpoints/step-NNNNNNN): verified, its EMA weights where it has them;
- anything `model.base` accepts: a diffusers or sdtune model folder, a LoRA/embedding folder
  (RUN/model of an adapter run: its base with the adapters applied), a single file, a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.checkpoint.store import MANIFEST
from sdtune.errors import UserError
from sdtune.models.bundle import ModelBundle
from sdtune.rundir import MARKER


@dataclass
class Member:
    name: str
    """As the user gave it (for messages)."""
    bundle: ModelBundle
    config: Path | None
    """The run's config.toml where the member came from a run (its data for validation)."""
    base: str | None = None
    """The base model its adapters were trained on (a LoRA member), as model.base names it."""
    config_source: str | None = None


def load_member(spec: str, say=print, config_source: str | None = None) -> Member:
    """The model `spec` names, on the CPU in float32 (see the module docstring)."""
    from sdtune.config import DiffusionConfig, ModelConfig
    from sdtune.models.loading import HUB_ID, read_model_info

    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():  # a checkpoint
        from sdtune.checkpoint.export import load_checkpoint_run, resolve_checkpoint

        ckpt = resolve_checkpoint(path, say)
        try:
            bundle, _, cfg = load_checkpoint_run(ckpt)
        except UserError as exc:  # its model.base, as its config.toml names it
            exc.args = (f"{spec}: {exc}{_base_hint(ckpt / 'config.toml')}",)
            raise exc from None
        base = Path(cfg.model.base).expanduser()
        base = str(base.resolve()) if base.exists() else cfg.model.base
        return Member(spec, bundle, ckpt / "config.toml", base, cfg.model.config_source)
    config = None
    if (path / MARKER).is_file():  # a run directory: its final model
        if not (path / "model").is_dir():
            raise UserError(
                f"{spec}: a run directory without a final model (RUN/model); name one of its "
                "checkpoints (RUN/checkpoints/step-NNNNNNN) or let the run finish"
            )
        config = path / "config.toml"
        path = path / "model"
    elif path.name == "model" and (path.parent / MARKER).is_file():
        config = path.parent / "config.toml"
    if not path.exists() and not (spec.startswith("preset:") or HUB_ID.match(spec)):
        raise UserError(f"{spec}: no such run, checkpoint, model folder or file")
    model = ModelConfig(base=str(path) if path.exists() else spec, config_source=config_source)
    bundle = load_named(model, DiffusionConfig(), 0)
    for module in bundle.components().values():
        module.eval()
    info = read_model_info(path) if path.is_dir() else {}
    base, source = (
        (info.get("base"), info.get("config_source")) if info.get("kind") else (None, None)
    )
    config = config if config is not None and config.is_file() else None
    return Member(spec, bundle, config, base, source)


def named_twice(specs: list[str]) -> str | None:
    """A model `specs` names twice however it is spelled (./a, a/ and an absolute path are one
    folder), or None."""
    seen: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        key = str(path.resolve()) if path.exists() else spec
        if key in seen:
            return spec if spec == seen[key] else f"{seen[key]} and {spec}"
        seen[key] = spec
    return None


def _base_hint(config: Path) -> str:
    """A hint when the model.base a checkpoint's config names is a relative path missing here."""
    import tomllib

    try:
        base = tomllib.loads(config.read_text())["model"]["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    path = Path(str(base)).expanduser()
    if str(base).startswith("preset:") or path.is_absolute() or path.exists():
        return ""
    return (
        f" ({config} names model.base {base}, which counts from the folder sdtune runs in: "
        "run from where the run was trained)"
    )


def load_named(model, diffusion, seed: int) -> ModelBundle:
    """`load_model`, for a model the command line names: its errors name it as given, not as
    the config key model.base."""
    from sdtune.models import load_model

    try:
        return load_model(model, diffusion, seed)
    except UserError as exc:
        text = str(exc)
        if not text.startswith("model.base: "):
            raise
        text = text.removeprefix("model.base: ").replace(
            "set model.config_source", "pass --config-source"
        )
        exc.args = (text,)
        raise exc from None
