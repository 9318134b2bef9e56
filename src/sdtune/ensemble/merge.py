"""Merging models of one architecture into one: `sdtune merge A B ... --out M`.

- **Weight averages** ("model soups", Wortsman et al. 2022): the weighted mean of the members'
  weights, every component (a member's LoRA is baked into it first). Uniform by default,
  `weights` normalised to sum to 1, or greedy: members sorted by validation loss, each added to
  the soup only where the soup's validation loss improves.
- **LoRA sums**: members that are LoRAs on one base (the same base weights) merge as
  base + sum_i w_i * delta_i with the weights as given (each LoRA's strength, as kohya-ss's
  merge ratios are; default 1/N each, which is their average). `lora_rank` writes that sum as
  one LoRA of rank r instead of a full model: per adapted layer the truncated SVD of the summed
  delta (Eckart-Young: the best rank-r approximation in Frobenius norm), with the share of the
  delta's norm it keeps reported.

Members load one at a time and their weights are summed as they come, so a merge of N models
holds about two (three for a greedy soup) in memory, not N.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune.ensemble.members import Member, load_member, named_twice
from sdtune.errors import UserError
from sdtune.models.bundle import ModelBundle

SOUPS = ("uniform", "greedy")


@dataclass
class MergeResult:
    out: Path
    mode: str  # "average", "lora-sum", "lora"
    weights: list[float]
    record: dict = field(default_factory=dict)


def _plain_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """component.name -> tensor of every weight and buffer, under plain (adapter-free) names."""
    return {
        f"{c}.{k}": v for c, m in bundle.components().items() for k, v in m.state_dict().items()
    }


def _floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}


def effective_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The weights the member predicts with: any LoRA baked in, learned tokens folded in."""
    from sdtune.checkpoint.adapters import adapted, merged_copy

    if not adapted(bundle) and not bundle.extra_tokens:
        return {k: v.clone() for k, v in _floats(_plain_state(bundle)).items()}
    return _floats(_plain_state(merged_copy(bundle)))


def base_copy(bundle: ModelBundle) -> ModelBundle | None:
    """The member without its adapters (unmerged), or None when it has none."""
    from sdtune.checkpoint.adapters import adapted
    from sdtune.models.lora import remove_adapters

    if not adapted(bundle):
        return None
    base = copy.deepcopy(bundle)
    remove_adapters(base)
    return base


def adapted_weights(bundle: ModelBundle) -> list[str]:
    """component.module.weight of every layer an adapter changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for c, module in bundle.components().items():
        for n, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                names.append(f"{c}.{n}.weight")
    return names


def _check_same_shape(state, reference, name: str, first: str) -> None:
    if state.keys() != reference.keys():
        extra = sorted(state.keys() ^ reference.keys())[0]
        raise UserError(
            f"{name}: its weights are not {first}'s architecture (e.g. {extra} is in one only); "
            "merge models of one architecture"
        )
    for k, v in state.items():
        if v.shape != reference[k].shape:
            raise UserError(
                f"{name}: {k} is {tuple(v.shape)} where {first} has {tuple(reference[k].shape)}; "
                "merge models of one architecture"
            )


def _load_into(bundle: ModelBundle, state: dict[str, torch.Tensor]) -> None:
    for c, module in bundle.components().items():
        prefix = f"{c}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        with torch.no_grad():
            current = module.state_dict()
            for k, v in own.items():
                current[k].copy_(v.to(current[k].dtype))


@dataclass
class _Sum:
    """The running sum of members' weights (float32), with what is needed to finish it."""

    total: dict[str, torch.Tensor] | None = None
    template: ModelBundle | None = None  # member 0 merged: the modules the result goes into
    first: Member | None = None
    base: dict[str, torch.Tensor] | None = None  # member 0's base weights (LoRA members)
    base_bundle: ModelBundle | None = None
    lora: bool = True  # every member so far is a LoRA on member 0's base
    adapted: set[str] = field(default_factory=set)
    names: list[str] = field(default_factory=list)

    def add(self, member: Member, weight: float) -> None:
        from sdtune.checkpoint.adapters import merged_copy

        bundle = member.bundle
        state = effective_state(bundle)
        base = base_copy(bundle)
        if self.first is None:
            from sdtune.ensemble.predict import check_compatible

            self.first, self.template = member, merged_copy(bundle)
            self.total = {k: v * weight if v.is_floating_point() else v for k, v in state.items()}
            self.base_bundle = base
            self.base = None if base is None else _floats(_plain_state(base))
            self.lora = base is not None
            check_compatible([bundle], [member.name])
        else:
            if bundle.family != self.first.bundle.family:
                raise UserError(
                    f"{member.name} is {bundle.arch.label}, but {self.first.name} is "
                    f"{self.first.bundle.arch.label}; merge models of one family"
                )
            _check_same_shape(state, self.total, member.name, self.first.name)
            for k, v in state.items():
                if v.is_floating_point():
                    self.total[k].add_(v, alpha=weight)
            if self.lora:
                self.lora = base is not None and _equal(_floats(_plain_state(base)), self.base)
        if base is not None:
            self.adapted.update(adapted_weights(bundle))
        self.names.append(member.name)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def merge(
    specs: list[str],
    out: Path,
    *,
    weights: list[float] | None = None,
    soup: str = "uniform",
    lora_rank: int | None = None,
    config: Path | None = None,
    overwrite: bool = False,
    say=print,
) -> MergeResult:
    """Merge the models `specs` name into `out` (see the module docstring)."""
    from sdtune.checkpoint.export import check_export_target

    if len(specs) < 2:
        raise UserError("sdtune merge: name at least two models to merge")
    twice = named_twice(specs)
    if twice:
        raise UserError(f"sdtune merge: {twice} named twice; to weight a model, use --weights")
    if soup not in SOUPS:
        raise UserError(f"--soup {soup}: choose one of {', '.join(SOUPS)}")
    if soup == "greedy" and weights is not None:
        raise UserError("--soup greedy chooses its members itself: it takes no --weights")
    if soup == "greedy" and lora_rank is not None:
        raise UserError("--soup greedy averages whole models; --lora-rank merges LoRAs: choose one")
    if weights is not None:
        if len(weights) != len(specs):
            raise UserError(
                f"--weights: {len(weights)} weight(s) for {len(specs)} model(s); give one each"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"--weights: each weight must be >= 0, not all 0 (got {weights})")
        if max(weights) > 1e6:
            raise UserError(
                f"--weights: {max(weights):g} is out of range; weights are ratios (for LoRAs "
                "each one's strength, usually 0 to 2), at most 1e6"
            )
    if lora_rank is not None:
        if not 1 <= lora_rank <= 1024:
            raise UserError(
                f"--lora-rank {lora_rank}: at least 1 and at most 1024 (a LoRA's rank, not its size)"
            )
        if out.suffix == ".safetensors":
            raise UserError(
                f"--out {out}: --lora-rank writes a LoRA folder (the diffusers and kohya files "
                "and sdtune_model.json, as RUN/model); name a folder"
            )
    if out.suffix and out.suffix != ".safetensors" and not out.is_dir():
        raise UserError(f"--out {out}: a merge writes a folder or a .safetensors file")
    if overwrite and out.exists() and not _is_merge(out):
        raise UserError(
            f"--out {out}: --overwrite replaces only what sdtune merge wrote, and {out} is "
            "not a merge; choose another --out"
        )
    fmt = check_export_target("merged", out, overwrite)
    if soup == "greedy":
        return _greedy(specs, out, fmt, config, say)
    raw = weights if weights is not None else [1.0 / len(specs)] * len(specs)
    acc = _Sum()
    for spec, w in zip(specs, raw):
        member = load_member(spec, say)
        say(f"merge: {spec} ({member.bundle.arch.label}), weight {w:g}")
        acc.add(member, w)
        del member
    if lora_rank is not None and not acc.lora:
        raise UserError(
            "--lora-rank: the members are not all LoRAs on one base (their base weights "
            "differ, or one is a full model); without --lora-rank they merge as full models"
        )
    if acc.lora:  # base + sum w_i delta_i, the weights as given
        spent = sum(raw)
        if spent != 1.0:
            for k, v in acc.base.items():
                if v.is_floating_point():
                    acc.total[k].add_(v, alpha=1.0 - spent)
        mode, used = ("lora" if lora_rank is not None else "lora-sum"), list(raw)
        say(
            "merge: LoRAs on one base: base + "
            + " + ".join(f"{w:g} x delta({n})" for w, n in zip(raw, acc.names))
        )
    else:  # an average: the weights normalised
        total_w = sum(raw)
        used = [w / total_w for w in raw]
        if total_w != 1.0:
            for v in acc.total.values():
                if v.is_floating_point():
                    v.div_(total_w)
        mode = "average"
        say(
            "merge: weight average " + " + ".join(f"{w:.4g} x {n}" for w, n in zip(used, acc.names))
        )
    record = {"mode": mode, "members": acc.names, "weights": used}
    if mode == "lora":
        record.update(_write_lora(acc, out, lora_rank, say))
    else:
        _load_into(acc.template, acc.total)
        if config is not None:
            record["val_loss"] = _validator(config, acc.template, say)(acc.template)
            say(f"merge: the merged model's validation loss {record['val_loss']:.5f}")
        _write_model(acc.template, out, fmt, record, acc.first.config_source)
    say(f"merge: wrote {out}")
    return MergeResult(out, mode, used, record)


def _is_merge(path: Path) -> bool:
    """Whether `path` is what sdtune merge wrote (a folder or single file saying so)."""
    if path.is_dir():
        try:
            info = json.loads((path / "sdtune_model.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and "merge" in info
    if path.suffix == ".safetensors":
        from sdtune.checkpoint.export import single_file_metadata

        return "sdtune.merge" in single_file_metadata(path)
    return False


def _write_model(
    bundle: ModelBundle, out: Path, fmt: str, record: dict, config_source: str | None = None
) -> None:
    from safetensors.torch import save_file

    from sdtune.checkpoint.convert import bundle_to_single_file
    from sdtune.files import atomic_output
    from sdtune.models.bundle import save_bundle

    meta = {"merge": record, "base_model": bundle.source}
    with atomic_output(out, folder=fmt == "diffusers") as tmp:
        if fmt == "diffusers":
            save_bundle(bundle, tmp, meta)
        else:
            bundle.arch.check_export(bundle, fmt, bundle.source)
            metadata = {"sdtune.merge": json.dumps(record), "sdtune.family": bundle.family}
            configs = config_source or _configs_of(bundle)
            if configs:  # where its configs are: it loads without --config-source
                metadata["sdtune.base_model"] = configs
            save_file(bundle_to_single_file(bundle), str(tmp), metadata=metadata)


def _configs_of(bundle: ModelBundle) -> str:
    """Where a merged single file's component configs come from, as an export names its base:
    the members' folder (absolute), preset or hub id, or the base a single-file member names."""
    from sdtune.models.loading import exported_base

    path = Path(bundle.source).expanduser()
    if path.is_file():
        return exported_base(path) or ""
    return str(path.resolve()) if path.exists() else bundle.source


def _relative_hint(paths, config: Path) -> str:
    """A hint for an error about a path a run's config names, when that path is relative and
    missing from here (it counted from the folder the run was trained in)."""
    lost = [str(p) for p in paths if p is not None and not Path(p).expanduser().is_absolute()]
    lost = [p for p in lost if not Path(p).exists()]
    if not lost:
        return ""
    return (
        f" ({config} names {lost[0]}, which counts from the folder sdtune runs in: run from "
        "where the run was trained, or pass --config with absolute paths)"
    )


def _write_lora(acc: _Sum, out: Path, rank: int, say) -> dict:
    """The summed deltas of the adapted layers as one LoRA of `rank` (truncated SVD)."""
    from sdtune.checkpoint.adapters import write_adapter_folder
    from sdtune.files import atomic_output

    bundle = acc.base_bundle
    modules = dict(bundle.components())
    kept_sq = total_sq = 0.0
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(acc.adapted):
        delta = acc.total[key] - acc.base[key]
        flat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()
        up = torch.zeros(flat.shape[0], rank)
        down = torch.zeros(rank, flat.shape[1])
        up[:, :r] = u[:, :r] * root
        down[:r] = root[:, None] * vh[:r]
        factors[key] = (up, down.reshape(rank, *delta.shape[1:]))
        kept_sq += float(s[:r].pow(2).sum())
        total_sq += float(s.pow(2).sum())
    kept = math.sqrt(kept_sq / total_sq) if total_sq > 0 else 1.0
    by_component: dict[str, list[str]] = {}
    for key in factors:
        component, _, rest = key.partition(".")
        by_component.setdefault(component, []).append(rest.removesuffix(".weight"))
    for component, names in by_component.items():
        _inject_exact(bundle, component, modules[component], names, rank)
    with torch.no_grad():
        for key, (up, down) in factors.items():
            component, _, rest = key.partition(".")
            layer = modules[component].get_submodule(rest.removesuffix(".weight"))
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(down.reshape(a.shape))
            b.copy_(up.reshape(b.shape))
    say(
        f"merge: one LoRA of rank {rank} over {len(factors)} layers keeps {kept:.1%} of the "
        "summed deltas' norm"
    )
    first = acc.first
    record = {"rank": rank, "layers": len(factors), "kept_norm_fraction": kept}
    meta = {"merge": json.dumps({"members": acc.names, **record}), "base_model": first.base or ""}
    with atomic_output(out, folder=True) as tmp:
        write_adapter_folder(
            bundle, tmp, first.base or bundle.source, first.config_source, 0, None, meta
        )
    return record


def _inject_exact(bundle: ModelBundle, component: str, module, names: list[str], rank: int):
    """A plain LoRA (alpha = rank: scale 1) on exactly the layers `names`."""
    import re

    import peft

    from sdtune.models.lora import ADAPTER, inject

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=float(rank),
        target_modules="|".join(re.escape(n) for n in names),
        init_lora_weights=True,
    )
    if component == bundle.arch.denoiser:
        module.add_adapter(config)
    else:
        inject(module, config, ADAPTER)


def _data_paths(cfg) -> list:
    data = cfg.data
    return [data.path, data.val_path, *(d.path for d in data.datasets)]


def _validator(config: Path, bundle: ModelBundle, say):
    """A function model -> validation loss on the held-out images of the run `config` names."""
    from sdtune.config import load_config
    from sdtune.data import build_datasets
    from sdtune.evaluate.validation import validation_loss

    if not config.is_file():
        raise UserError(f"--config {config}: no such file")
    cfg = load_config(config)  # TOML or YAML; a bad one is a one-line error naming it
    try:
        data = build_datasets(cfg.data, bundle.image_channels, cfg.seed, lambda *_: None)
    except UserError as exc:  # a run's relative data.path counts from where it was trained
        exc.args = (f"--config {config}: {exc}{_relative_hint(_data_paths(cfg), config)}",)
        raise exc from None
    if data.val is None:
        raise UserError(
            f"--config {config}: its data has no held-out images (data.val_fraction = 0), "
            "so there is no validation loss to choose by"
        )
    batches = cfg.evaluate.val_batches or 4
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def measure(model) -> float:
        model.to(device)
        return validation_loss(model, data.val, cfg.train.batch_size, batches, device)["val_loss"]

    return measure


def _greedy(specs: list[str], out: Path, fmt: str, config: Path | None, say) -> MergeResult:
    """Greedy soup: members by validation loss, best first; each joins the (uniform) soup only
    where the soup's validation loss falls."""
    losses: list[float] = []
    measure = None
    first_name = None
    reference = None
    for spec in specs:
        member = load_member(spec, say)
        if config is None:
            config = member.config
        if config is None:
            raise UserError(
                "--soup greedy chooses members by validation loss: pass --config with the "
                f"training config whose held-out images to use ({spec} is not from a run)"
            )
        if measure is None:
            measure = _validator(config, member.bundle, say)
            first_name, reference = spec, member.bundle
        elif member.bundle.family != reference.family:
            raise UserError(
                f"{spec} is {member.bundle.arch.label}, but {first_name} is "
                f"{reference.arch.label}; merge models of one family"
            )
        losses.append(measure(member.bundle))
        say(f"merge: {spec}: validation loss {losses[-1]:.5f}")
        del member
    order = sorted(range(len(specs)), key=lambda i: losses[i])
    best = load_member(specs[order[0]], say)
    soup_state = effective_state(best.bundle)
    from sdtune.checkpoint.adapters import merged_copy

    template = merged_copy(best.bundle)
    configs = best.config_source
    del best
    chosen, best_loss = [order[0]], losses[order[0]]
    for i in order[1:]:
        state = effective_state(load_member(specs[i], say).bundle)
        _check_same_shape(state, soup_state, specs[i], specs[order[0]])
        k = len(chosen)
        candidate = {
            key: (v * k + state[key]) / (k + 1) if v.is_floating_point() else v
            for key, v in soup_state.items()
        }
        _load_into(template, candidate)
        loss = measure(template)
        if loss < best_loss:
            chosen.append(i)
            soup_state, best_loss = candidate, loss
            say(f"merge: + {specs[i]}: the soup's validation loss falls to {loss:.5f}")
        else:
            say(f"merge: - {specs[i]}: the soup's validation loss would be {loss:.5f}; left out")
    _load_into(template, soup_state)
    names = [specs[i] for i in chosen]
    used = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(len(specs))]
    record = {
        "mode": "greedy",
        "members": list(specs),
        "member_val_loss": losses,
        "chosen": names,
        "weights": used,
        "val_loss": best_loss,
    }
    _write_model(template, out, fmt, record, configs)
    say(f"merge: greedy soup of {len(chosen)} of {len(specs)}: {', '.join(names)}; wrote {out}")
    return MergeResult(out, "greedy", used, record)
