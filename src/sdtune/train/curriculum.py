"""Curriculum learning (Bengio et al. 2009): `[[curriculum.stages]]`, each lasting until its
`until_step`, with its own resolution, timestep range, data subset and learning-rate scale;
after the last stage the run trains as the rest of the config says.

Built for exact resume like the rest of the loop. The stage of a step is a function of the
step; the data position counts inside the current stage's subset (a stage starts at its first
example, with an order of its own: the shuffle is seeded by the stage), and the checkpoint
holds which stage the position belongs to, so a run killed anywhere, a stage boundary
included, continues with the same batches. A stage's "easiest" subset is scored once, at the
stage's first step, with the weights of that step (per-example loss at fixed noise and
timesteps, as validation measures it); the chosen examples are kept in the checkpoint (and
the scores in RUN/curriculum/), so a resume never rescores. The learning-rate scale is applied
to the schedule's base rates at the stage change, as rollbacks scale them, so the scheduler's
own state carries it through a checkpoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import torch

from sdtune.data.dataset import ImageTextDataset
from sdtune.data.order import BucketIds, DataPosition, derive_seed, generator
from sdtune.errors import ConfigError
from sdtune.train.dreambooth import is_class_image

SCORE_SEED = 20261201  # the fixed noise the easiest-first scores are measured with


class Curriculum:
    def __init__(self, cfg, data, bundle, group: int = 1) -> None:
        self.cfg = cfg
        self.group = group  # the global batch: a bucket's batches are of one size
        self.stages = list(cfg.curriculum.stages)
        self.train = data.train
        self.multiple = bundle.arch.resolution_multiple(bundle)
        self.bucket_step = lambda resolution: bundle.arch.bucket_step(bundle, resolution)
        self._views: dict[int, ImageTextDataset] = {}
        for i, stage in enumerate(self.stages):
            if stage.resolution is not None and stage.resolution % self.multiple:
                raise ConfigError(
                    f"curriculum.stages[{i}].resolution: {stage.resolution} is not a multiple "
                    f"of {self.multiple} (this model downsamples by {self.multiple})"
                )
            if stage.difficulty is not None:
                unscored = [  # DreamBooth's class images have no score: left out
                    r
                    for r in self.train.records
                    if r.difficulty is None and not is_class_image(r.name)
                ]
                if unscored:
                    raise ConfigError(
                        f"curriculum.stages[{i}].difficulty: {len(unscored)} training "
                        f"image(s) have no difficulty score (e.g. {unscored[0].name}); give "
                        "each a number in the 'difficulty' column of the folder's "
                        "metadata.jsonl / metadata.csv"
                    )
            if self._candidates(i) == []:
                raise ConfigError(
                    f"curriculum.stages[{i}]: no training example matches its labels / "
                    "caption_contains / difficulty; widen them"
                )

    @property
    def active(self) -> bool:
        return bool(self.stages)

    def stage_of(self, step: int) -> int:
        """The stage optimizer step `step` + 1 is taken in (len(stages): after the last)."""
        return next((i for i, s in enumerate(self.stages) if step < s.until_step), len(self.stages))

    def _stage(self, index: int):
        return self.stages[index] if index < len(self.stages) else None

    def describe(self, index: int) -> str:
        stage = self._stage(index)
        if stage is None:
            return "after the last stage: the whole data, the config's resolution and timesteps"
        parts = [f"stage {index + 1} of {len(self.stages)} (until step {stage.until_step})"]
        if stage.resolution is not None:
            parts.append(f"{stage.resolution} px")
        if stage.timesteps is not None:
            parts.append(f"timesteps {stage.timesteps[0]:g}-{stage.timesteps[1]:g} of the schedule")
        if stage.labels is not None:
            parts.append(f"labels {', '.join(map(str, stage.labels))}")
        if stage.caption_contains is not None:
            parts.append(f"captions holding {stage.caption_contains!r}")
        if stage.difficulty is not None:
            low, high = stage.difficulty
            parts.append(f"difficulty {low:g}-{high:g}")
        if stage.easiest is not None:
            parts.append(f"the easiest {stage.easiest:.0%}")
        if stage.lr_scale != 1.0:
            parts.append(f"lr x{stage.lr_scale:g}")
        return ", ".join(parts)

    def _candidates(self, index: int) -> list[int] | None:
        """Indices into the training set a stage draws from (None: all of them)."""
        stage = self._stage(index)
        if stage is None or (
            stage.labels is None and stage.caption_contains is None and stage.difficulty is None
        ):
            return None
        records = self.train.records
        keep = range(len(records))
        if stage.labels is not None:
            labels = set(stage.labels)
            keep = [i for i in keep if records[i].label in labels]
        if stage.caption_contains is not None:
            text = stage.caption_contains.lower()
            keep = [i for i in keep if text in records[i].caption.lower()]
        if stage.difficulty is not None:
            low, high = stage.difficulty
            keep = [
                i
                for i in keep
                if records[i].difficulty is not None and low <= records[i].difficulty <= high
            ]
        return list(keep)

    def view(self, index: int, subset: list[int] | None) -> ImageTextDataset:
        """The training set stage `index` reads (its subset, at its resolution)."""
        if index in self._views:
            return self._views[index]
        stage = self._stage(index)
        chosen = subset if subset is not None else self._candidates(index)
        base = self.train
        resized = stage is not None and stage.resolution not in (None, base.spec.resolution)
        if stage is None or (chosen is None and not resized):
            self._views[index] = base
            return base
        picked = range(len(base)) if chosen is None else chosen
        records = [base.records[i] for i in picked]
        spec = base.spec
        if resized:
            spec = replace(spec, resolution=stage.resolution)
            records = [copy.copy(r) for r in records]  # their own buckets at this resolution
        view = ImageTextDataset(records, spec, base.seed, base.caption_dropout, augment=True)
        view.tags = base.tags
        if resized and self.cfg.data.buckets is not False:
            view.set_buckets(self._buckets(records, spec.resolution))
        elif base.bucket_ids is not None:  # a subset keeps its images' buckets
            view.bucket_ids = BucketIds(base.bucket_ids[i] for i in picked)
        self._views[index] = view
        return view

    def known_views(self) -> list[ImageTextDataset]:
        """The views of the stages whose data is known before the run (all but "easiest"
        ones, chosen at their first step), in stage order."""
        return [
            self.view(i, None)
            for i, stage in enumerate(self.stages)
            if stage.easiest is None and self.view(i, None) is not self.train
        ]

    def _buckets(self, records, resolution: int) -> list[tuple[int, int]]:
        """Each record's aspect-ratio bucket at a stage's resolution (data.buckets)."""
        from sdtune.data.buckets import BucketSettings, assign_buckets

        data = self.cfg.data
        explicit = None if data.buckets is True else tuple(tuple(s) for s in data.buckets)
        step = data.bucket_step or self.bucket_step(resolution)
        settings = BucketSettings(
            resolution, step, data.max_aspect, data.bucket_no_upscale, explicit
        )
        sizes = [r.image_size() for r in records]
        chosen, _ = assign_buckets([r.name for r in records], sizes, settings, self.group)
        return chosen

    def order_seed(self, index: int) -> int:
        """The seed of stage `index`'s data order (the run's own after the last stage)."""
        return (
            self.cfg.seed
            if index >= len(self.stages)
            else derive_seed(self.cfg.seed, "stage", index)
        )

    def timestep_range(self, index: int) -> tuple[float, float]:
        stage = self._stage(index)
        return (0.0, 1.0) if stage is None or stage.timesteps is None else tuple(stage.timesteps)

    def lr_scale(self, index: int) -> float:
        stage = self._stage(index)
        return 1.0 if stage is None else stage.lr_scale

    # ------------------------------------------------------------ the run's side

    def apply(self, run) -> None:
        """Point the step at the stage the run's position belongs to (set-up, resume, rollback)."""
        if not self.active:
            return
        state = run.state
        index = max(state.curriculum_stage, 0)
        subset = state.curriculum_subsets.get(str(index))
        run.ctx.source.use(self.view(index, subset), self.order_seed(index))
        run.ctx.objective.timestep_range = self.timestep_range(index)

    def enter(self, run) -> None:
        """Before a step: move to the stage it belongs to when it starts a new one."""
        if not self.active:
            return
        state = run.state
        index = self.stage_of(state.step)
        if index == state.curriculum_stage:
            return
        before = self.lr_scale(state.curriculum_stage) if state.curriculum_stage >= 0 else 1.0
        stage = self._stage(index)
        if (
            stage is not None
            and stage.easiest is not None
            and str(index) not in state.curriculum_subsets
        ):
            state.curriculum_subsets[str(index)] = self._easiest(run, index)
            self._views.pop(index, None)  # its view is of the subset just chosen
        state.curriculum_stage = index
        state.position = DataPosition()
        self.apply(run)
        run.ctx.source.restart(state.position)
        _scale_lr(run, self.lr_scale(index) / before)
        message = f"curriculum: {self.describe(index)}"
        run.progress.write(f"step {state.step}: {message}")
        if run.log is not None:
            run.log.event(state.step, "curriculum", message)

    def _easiest(self, run, index: int) -> list[int]:
        """The easiest `easiest` share of the stage's candidates by the current model's loss."""
        stage = self._stage(index)
        candidates = self._candidates(index)
        pool = list(range(len(self.train))) if candidates is None else candidates
        losses = example_losses(run, pool, stage.resolution)
        count = max(
            run.cfg.train.batch_size * run.accelerator.num_processes,
            round(stage.easiest * len(pool)),
        )
        ranked = sorted(range(len(pool)), key=lambda i: (losses[i], i))
        chosen = sorted(pool[i] for i in ranked[: min(count, len(pool))])
        if run.main:
            folder = run.run_dir / "curriculum"
            folder.mkdir(exist_ok=True)
            records = self.train.records
            scores = {
                "stage": index + 1,
                "step": run.state.step,
                "kept": len(chosen),
                "of": len(pool),
                "scores": [
                    {"name": records[i].name, "loss": losses[k]} for k, i in enumerate(pool)
                ],
            }
            (folder / f"stage-{index + 1}-scores.json").write_text(
                json.dumps(scores, indent=1) + "\n"
            )
        return chosen


def _scale_lr(run, ratio: float) -> None:
    if ratio == 1.0:
        return
    optimizer, scheduler = run.objects.optimizer, run.objects.lr_scheduler
    scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * ratio
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@torch.no_grad()
def example_losses(run, indices: list[int], resolution: int | None) -> list[float]:
    """Each example's loss under the current weights, at fixed noise and three fixed noise
    levels (low, mid, high), on the un-augmented image: what the model finds easy."""
    from sdtune.data.dataset import collate
    from sdtune.evaluate.validation import bucket_offsets
    from sdtune.models.modes import evaluating

    bundle, device, objective = run.bundle, run.device, run.ctx.objective
    arch = bundle.arch
    base = run.data.train
    spec = base.spec if resolution is None else replace(base.spec, resolution=resolution)
    plain = ImageTextDataset(
        [base.records[i] for i in indices], spec, base.seed, 0.0, augment=False
    )
    size = run.cfg.train.batch_size
    out: list[float] = []
    with evaluating(*arch.components(bundle).values()):
        for start in range(0, len(plain), size):
            idx = list(range(start, min(start + size, len(plain))))
            batch = collate([plain[(0, i)] for i in idx])
            pixels = batch["pixel_values"].to(device)
            latents = bundle.encode_images(
                pixels, generator(SCORE_SEED, "vae", start, device=device)
            )
            cond = arch.condition(
                bundle, arch.conditioning(bundle, batch["captions"], device), batch
            )
            total = torch.zeros(len(idx), dtype=torch.float64)
            for level in range(3):
                noise = torch.stack(
                    [
                        torch.randn(
                            latents.shape[1:],
                            generator=generator(SCORE_SEED, "noise", indices[i], level),
                        )
                        for i in idx
                    ]
                ).to(device)
                timesteps = torch.stack(
                    [objective.validation_timesteps(bucket_offsets(indices[i]))[level] for i in idx]
                ).to(device)
                noisy, target = objective.at(latents, noise, timesteps)
                pred = arch.predict(bundle, noisy, timesteps, cond)
                total += (pred.float() - target.float()).pow(2).flatten(1).mean(1).double().cpu()
            out += (total / 3).tolist()
    return out
