"""One training step on a tiny preset, against the same computation written out by hand."""

import copy

import torch

from sdtune.config import load_config
from sdtune.data import collate, next_batch
from sdtune.data.order import generator
from sdtune.train.setup import setup
from sdtune.train.step import train_step

OVERRIDES = [
    "model.base=preset:tiny-digits",
    "data.source=digits",
    "data.resolution=16",
    "data.limit=16",
    "data.caption_dropout=0.5",
    "train.batch_size=4",
    "train.optimizer=sgd",
    "train.momentum=0",
    "train.weight_decay=0",
    "train.learning_rate=0.05",
    "train.max_grad_norm=null",
    "train.ema=false",
    "train.max_steps=3",
]


def _run(tmp_path, *extra):
    cfg = load_config(None, [*OVERRIDES, *extra])
    (tmp_path / "run").mkdir()
    return setup(cfg, tmp_path / "run", None, lambda *_: None)


def test_one_step_is_the_loss_and_update_written_out(tmp_path):
    run = _run(tmp_path)
    bundle, cfg = run.bundle, run.cfg
    unet, text_encoder = bundle.unet, bundle.text_encoder
    before = copy.deepcopy(unet)

    result = train_step(run.ctx, run.state, log_now=True)
    (report,) = run.ctx.guard.reports(all_steps=True)

    # the batch: this process's share of the first global batch, as the dataset gives it
    keys, position = next_batch(type(run.state.position)(), 4, len(run.data.train), cfg.seed)
    batch = collate([run.data.train[k] for k in keys])
    assert run.state.position == position and run.state.step == 1
    # the draws of step 0, micro-batch 0, process 0, in order: noise, then timesteps
    gen = generator(cfg.seed, "noise", 0, 0, 0)
    x0 = batch["pixel_values"]  # pixel space: the latents are the pixels
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    abar = bundle.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # Ho et al. 2020, eq. 4
    ids = bundle.tokenizer(
        batch["captions"], padding="max_length", max_length=12, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    pred = before(noisy, t, encoder_hidden_states=hidden).sample
    loss = (pred - noise).pow(2).flatten(1).mean(1).mean()  # epsilon target, unweighted
    loss.backward()

    assert abs(report.loss - loss.item()) < 1e-6 and not report.bad
    grads = [p.grad for p in before.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch.testing.assert_close(result.grad_norm, norm, rtol=1e-5, atol=1e-7)
    for (name, new), old in zip(unet.named_parameters(), before.parameters()):
        torch.testing.assert_close(new, old - 0.05 * old.grad, rtol=0, atol=1e-6, msg=name)
    # the text encoder did not train
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_a_poisoned_step_is_skipped_on_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_POISON_STEPS", "1")
    run = _run(tmp_path)
    before = [p.detach().clone() for p in run.bundle.unet.parameters()]
    train_step(run.ctx, run.state, log_now=False)
    (report,) = run.ctx.guard.reports(all_steps=True)
    assert report.bad and not report.finite
    assert all(torch.equal(a, b) for a, b in zip(before, run.bundle.unet.parameters()))
    assert run.state.step == 1  # the step is counted; its update is not applied


def test_a_step_with_the_objective_options_written_out(tmp_path):
    """diffusion.loss = pseudo_huber, a timestep bias and input perturbation, on v-prediction
    with a zero-terminal-SNR schedule: the step's loss is the same computation by hand."""
    run = _run(
        tmp_path,
        "diffusion.prediction_type=v_prediction",
        "diffusion.zero_terminal_snr=true",
        "diffusion.loss=pseudo_huber",
        "diffusion.huber_delta=0.2",
        "diffusion.timestep_bias=later",
        "diffusion.timestep_bias_multiplier=5",
        "diffusion.input_perturbation=0.1",
    )
    bundle, cfg = run.bundle, run.cfg
    before = copy.deepcopy(bundle.unet)
    train_step(run.ctx, run.state, log_now=True)
    (report,) = run.ctx.guard.reports(all_steps=True)

    keys, _ = next_batch(type(run.state.position)(), 4, len(run.data.train), cfg.seed)
    batch = collate([run.data.train[k] for k in keys])
    gen = generator(cfg.seed, "noise", 0, 0, 0)
    x0 = batch["pixel_values"]
    noise = torch.randn(x0.shape, generator=gen)
    # 'later': the noisiest quarter 5x as likely, drawn by the inverse of its CDF
    weights = torch.ones(1000, dtype=torch.float64)
    weights[750:] = 5.0
    cdf = torch.cumsum(weights / weights.sum(), 0)
    u = torch.rand(4, generator=gen, dtype=torch.float64)
    t = torch.searchsorted(cdf / cdf[-1], u, right=True).clamp(0, 999)
    xi = torch.randn(x0.shape, generator=gen)
    abar = bundle.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert bundle.noise_scheduler.alphas_cumprod[-1] < 1e-12  # zero terminal SNR
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + 0.1 * xi)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # the target keeps the unperturbed noise
    ids = bundle.tokenizer(
        batch["captions"], padding="max_length", max_length=12, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = bundle.text_encoder(ids)[0]
    pred = before(noisy, t, encoder_hidden_states=hidden).sample
    r = pred - v
    loss = (2 * 0.2 * (torch.sqrt(r**2 + 0.04) - 0.2)).flatten(1).mean(1).mean()
    assert abs(report.loss - loss.item()) < 1e-6


def test_dreambooth_prior_toward_the_base_is_zero_until_the_adapters_move(tmp_path):
    """dreambooth.prior_target = 'base': the class images' target is the frozen base's own
    prediction, so at the first step (LoRA's up-projections start at zero: adapted == base)
    their loss is exactly zero and the step's loss is the instance images' alone; with
    'noise' the class images add their own."""
    extra = [
        "lora.enabled=true",
        "model.trainable=[]",
        "dreambooth.instance_prompt=a photo of sks digit",
        'dreambooth.class_prompt=["a photo of a digit"]',
        "dreambooth.num_class_images=4",
        "dreambooth.class_sample_steps=1",
        "data.caption_dropout=0.0",
        "train.batch_size=8",
    ]
    losses = {}
    for target in ("base", "noise"):
        (tmp_path / target).mkdir()
        run = _run(tmp_path / target, *extra, f"dreambooth.prior_target={target}")
        ctx, state = run.ctx, run.state
        train = run.data.train
        keys, _ = next_batch(
            type(state.position)(), 8, len(train), run.cfg.seed, paired=train.paired
        )
        batch = collate([train[k] for k in keys])
        latents = batch["pixel_values"]  # pixel space
        rows = [i for i, n in enumerate(batch["names"]) if n.startswith("class:")]
        assert rows == [1, 3, 5, 7]  # paired: an instance image, then a class image, in turn
        noised = ctx.objective.draw(latents, generator(run.cfg.seed, "noise", 0, 0, 0))
        from sdtune.train.step import _conditioning

        with torch.no_grad():  # before the step: the weights it starts from
            cond = _conditioning(ctx, batch, None, False)
            pred = run.bundle.arch.predict(run.bundle, noised.noisy, noised.timesteps, cond)
        per = (pred - noised.target).pow(2).flatten(1).mean(1)
        train_step(ctx, state, log_now=True)
        (report,) = ctx.guard.reports(all_steps=True)
        losses[target] = report.loss
        if target == "base":  # class rows contribute zero
            per[rows] = 0.0
        assert abs(report.loss - per.mean().item()) < 1e-6
    assert losses["noise"] > losses["base"]


def test_dreambooth_with_preservation_keeps_the_instance_images_alone(tmp_path):
    """DreamBooth's batch is half class images; output preservation is taken on its instance
    rows only (the class rows are in neither the base's forward nor the preservation half),
    as a mean over them: the step's loss written out with the adapters moved off zero."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdtune.train.preserve import adapters_off

    extra = [
        "lora.enabled=true",
        "lora.text_encoder=false",
        "model.trainable=[]",
        "lora.preserve_prompts=['a handwritten digit one', 'a handwritten digit two']",
        "lora.preserve_weight=0.5",
        "dreambooth.instance_prompt=a photo of sks digit",
        'dreambooth.class_prompt=["a photo of a digit"]',
        "dreambooth.num_class_images=4",
        "dreambooth.class_sample_steps=1",
        "dreambooth.prior_loss_weight=0.3",
        "data.caption_dropout=0.0",
        "train.batch_size=8",
    ]
    run = _run(tmp_path, *extra)
    ctx, state, bundle, cfg = run.ctx, run.state, run.bundle, run.cfg
    unet = bundle.unet
    with torch.no_grad():  # adapters that have moved: the preservation loss is not zero
        gen = torch.Generator().manual_seed(3)
        for layer in unet.modules():
            if isinstance(layer, BaseTunerLayer):
                for w in layer.lora_B.values():
                    w.weight.copy_(0.1 * torch.randn(w.weight.shape, generator=gen))
    train = run.data.train
    keys, _ = next_batch(type(state.position)(), 8, len(train), cfg.seed, paired=train.paired)
    batch = collate([train[k] for k in keys])
    rows = [i for i, n in enumerate(batch["names"]) if not n.startswith("class:")]
    assert len(rows) == 4
    x0 = batch["pixel_values"]
    gen = generator(cfg.seed, "noise", 0, 0, 0)
    noised = ctx.objective.draw(x0, gen)
    pick = ctx.preserve.draw(8, gen)
    ids = bundle.tokenizer(
        batch["captions"], padding="max_length", max_length=12, truncation=True, return_tensors="pt"
    ).input_ids
    keep_ids = ctx.preserve.ids[pick[rows]]
    with torch.no_grad():
        hidden, kept_hidden = bundle.text_encoder(ids)[0], bundle.text_encoder(keep_ids)[0]
        pred = unet(noised.noisy, noised.timesteps, encoder_hidden_states=hidden).sample
        x, t = noised.noisy[rows], noised.timesteps[rows]
        adapted = unet(x, t, encoder_hidden_states=kept_hidden).sample
        with adapters_off(unet):
            base = unet(x, t, encoder_hidden_states=kept_hidden).sample
    weights = batch["weights"]
    assert torch.equal(weights[rows], torch.ones(4)) and torch.allclose(
        weights.sum(), torch.tensor(5.2)
    )
    per = (pred - noised.target).pow(2).flatten(1).mean(1)
    kept = (adapted - base).pow(2).flatten(1).mean(1).mean()
    loss = (per * weights).mean() + 0.5 * kept
    assert kept > 1e-4
    calls = []  # the batch size of each UNet call in the step
    hook = unet.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    train_step(ctx, state, log_now=True)
    hook.remove()
    (report,) = ctx.guard.reports(all_steps=True)
    assert abs(report.loss - loss.item()) < 1e-6
    assert abs(report.part - kept.item()) < 1e-6
    # the base's forward on the 4 instance rows, then one call: the batch and those 4 rows
    assert sorted(calls) == [4, 12]


def test_dreambooth_preservation_on_a_micro_batch_of_class_images_alone_is_zero(tmp_path):
    """Batches of one deal an instance image, then a class image: on the class image's step
    there is nothing to preserve, and the preservation part is zero, not a mean of nothing."""
    extra = [
        "lora.enabled=true",
        "lora.text_encoder=false",
        "model.trainable=[]",
        "lora.preserve_prompts=['a handwritten digit one']",
        "dreambooth.instance_prompt=a photo of sks digit",
        'dreambooth.class_prompt=["a photo of a digit"]',
        "dreambooth.num_class_images=4",
        "dreambooth.class_sample_steps=1",
        "train.batch_size=1",
    ]
    run = _run(tmp_path, *extra)
    train = run.data.train
    position = type(run.state.position)()
    kinds = []
    for _ in range(2):
        (key,), position = next_batch(position, 1, len(train), run.cfg.seed, paired=train.paired)
        kinds.append(train[key]["name"].startswith("class:"))
        train_step(run.ctx, run.state, log_now=True)
    assert kinds == [False, True]
    first, second = run.ctx.guard.reports(all_steps=True)
    assert first.part > 0 and second.part == 0.0
    assert torch.isfinite(torch.tensor(second.loss))
