"""Small pieces the loop calls: batch iteration, evaluation, signals, the metrics log on resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

from sdtune.data import DataPosition, collate, digit_prompt, next_batch
from sdtune.evaluate.sampling import generate_as_configured, save_grid
from sdtune.evaluate.validation import validation_loss
from sdtune.files import atomic_output
from sdtune.models.bundle import ModelBundle
from sdtune.train.ema import maybe_ema

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving; resume to continue
EXIT_NO_SPACE = 74  # EX_IOERR: a checkpoint did not fit on the disk; free space, then resume


def batches(
    dataset,
    batch_size: int,
    seed: int,
    start: DataPosition,
    workers: int,
    pin: bool = False,
    shard: tuple[int, int] = (0, 1),
):
    """Collated batches in the exact order of `next_batch`, from `start`, forever: process
    `rank` of `world` (`shard`) takes its `batch_size` share of each global batch. With
    `workers`, loaded in worker processes kept across epochs, in page-locked memory if `pin`."""

    def keys():
        position = start
        while True:
            batch_keys, position = next_batch(
                position,
                batch_size,
                len(dataset),
                seed,
                shard,
                dataset.bucket_ids,
                dataset.paired,
            )
            yield batch_keys

    if workers == 0:
        for batch_keys in keys():
            yield collate([dataset[k] for k in batch_keys])
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=keys(),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin,
            persistent_workers=True,
        )
        yield from loader


def grid_prompts(cfg, captions: list[str]) -> list[str]:
    if cfg.evaluate.prompts:
        return list(cfg.evaluate.prompts)
    if cfg.data.source == "digits":
        return [digit_prompt(k) for k in range(10)]
    return sorted(set(captions))[:4] or [""]


def evaluate(
    cfg, bundle: ModelBundle, data, ema, prompts, run_dir: Path, step: int, device
) -> tuple[dict, Path]:
    """Validation loss (raw and EMA weights) and a sample grid from fixed prompts and seed."""
    row: dict[str, float] = {}
    with torch.no_grad():
        if data.val is not None and cfg.evaluate.val_batches > 0:
            args = (bundle, data.val, cfg.train.batch_size, cfg.evaluate.val_batches, device)
            row.update(validation_loss(*args))
            if ema is not None:
                with ema.swapped_in():
                    row.update({f"{k}_ema": v for k, v in validation_loss(*args).items()})
        every = cfg.evaluate.metrics_every
        if every and (step % every == 0 or step >= cfg.train.max_steps):
            from sdtune.evaluate.assess import assess

            with maybe_ema(ema):
                values, _ = assess(bundle, cfg, data, device, cfg.evaluate.metrics_images)
            row.update(values)
        with maybe_ema(ema):
            images = generate_as_configured(
                bundle,
                cfg,
                [p for p in prompts for _ in range(cfg.evaluate.num_per_prompt)],
                0,
                device,
                grid=True,
            )
    grid = save_grid(
        images, run_dir / "samples" / f"step-{step:07d}.png", nrow=cfg.evaluate.num_per_prompt
    )
    return row, grid


def truncate_metrics(path: Path, step: int, evaluated_at_step: bool) -> None:
    """Drop the metric rows written after the checkpoint at `step`: later steps, and an
    evaluation at `step` itself unless it came before the save (`evaluated_at_step`)."""
    if not path.is_file():
        return

    def keep(row: dict) -> bool:
        if row["step"] != step:
            return row["step"] < step
        return "loss" in row or evaluated_at_step

    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
        if keep(row):
            kept.append(line)
    with atomic_output(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the step, save and exit; a second Ctrl+C exits now."""

    def __init__(self, say) -> None:
        self.requested: str | None = None
        self.say = say
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        self.say(
            f"{name}: finishing this step, then saving a checkpoint (Ctrl+C again to quit at once)"
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
