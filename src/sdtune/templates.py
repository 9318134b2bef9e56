"""`sdtune config init TASK`: a commented starting config for a task (full fine-tune, LoRA,
DreamBooth, textual inversion), with the base model, image folder and resolution filled in.

Each template is what the tested examples do, written for a user to read and edit: every key
has a line saying what it is for and what to change. `sdtune config show FILE` then lists
every other key with its default and help text.
"""

from __future__ import annotations

import json

TASKS = ("full", "lora", "dreambooth", "textual-inversion")

_HEAD = """\
# sdtune config: {what}
# Written by `sdtune config init {task}`. Train with:  sdtune train {out}
# Every other key, with its default and what it does:   sdtune config show {out}
seed = 0
output_dir = {output}

[model]
base = {base}   # a diffusers folder, a cached hub id, a single .safetensors file, or a run's model/
"""

_DATA = """
[data]
path = {data}   # your images: img.png + img.txt (the caption), or a metadata.jsonl / .csv
resolution = {resolution}   # the base's own size: 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL
val_fraction = {val_fraction}   # held out for the validation loss (0 with a handful of images)
hflip = 0.5   # mirror half the images (drop it if left and right matter, e.g. text)
buckets = true   # each image at the size of its aspect ratio (false: centre squares)
# masks = true   # cat_mask.png beside cat.png: learn only its white part
"""

_WATCH = """
[checkpoint]
every_steps = {every}   # a resumable checkpoint (sdtune train ... --resume continues exactly)
keep_last = 2

[evaluate]
every_steps = {every}   # validation loss and a sample grid from the prompts below
prompts = {prompts}   # what you want to watch change
sample_steps = 30
guidance_scale = 7.5
"""

_TEMPLATES = {
    "full": (
        "a full fine-tune of the UNet on your captioned images (a GPU; SD 1.5 fits 24 GB)",
        """trainable = ["unet.*"]   # what trains; add "text_encoder.*" to train CLIP too
gradient_checkpointing = true   # less memory for a little more time
""",
        """
[diffusion]
min_snr_gamma = 5.0   # weights the timesteps for faster, steadier training

[train]
max_steps = 5000
batch_size = 4
learning_rate = 1e-5   # full fine-tunes want small rates; 1e-6 to 2e-5
lr_schedule = "cosine"
warmup_steps = 250
mixed_precision = "bf16"   # "fp16" on GPUs without bf16; ignored on a CPU
ema = true   # an average of the weights: the model that is saved and sampled
ema_decay = 0.9999
""",
        0.05,
        500,
        ["a photo of a cat", "a watercolor painting of a lighthouse"],
    ),
    "lora": (
        "a LoRA (low-rank adapters) on your captioned images; the base stays frozen",
        "",
        """
[lora]
enabled = true
variant = "lora"   # or "dora", "loha", "lokr" (peft's LoRA variants; see the README)
rank = 32   # adapter size; 16-64 for a subject or style
alpha = 32
# what must keep its meaning: the class your subject belongs to, and the empty prompt
# (guidance reads it); each step the base's predictions for these are kept
preserve_prompts = ["a photo of a dog", ""]

[diffusion]
min_snr_gamma = 5.0
timestep_sampling = "low_discrepancy"   # every batch covers low, mid and high noise

[train]
max_steps = 1500
batch_size = 4
learning_rate = 1e-4
lr_schedule = "cosine"
warmup_steps = 20
ema = true   # an average of the adapter: steadier results from few images
ema_decay = 0.99
mixed_precision = "bf16"
""",
        0.0,
        250,
        ["a photo of sks dog on a beach", "a photo of a dog"],
    ),
    "dreambooth": (
        "DreamBooth with prior preservation (and LoRA) for one subject from 5-20 photos",
        "",
        """
[dreambooth]
instance_prompt = "a photo of sks dog"   # replaces every caption: a rare token + the class
class_prompt = ["a photo of a dog"]   # the class, drawn by the base as regularisation images
num_class_images = 200   # generated once into RUN_DIR/class_images (reused on resume)
prior_loss_weight = 1.0

[lora]
enabled = true   # remove this section for a full DreamBooth fine-tune (much more memory)
rank = 32
alpha = 32

[train]
max_steps = 800
batch_size = 2
learning_rate = 1e-4
mixed_precision = "bf16"
""",
        0.0,
        200,
        ["a photo of sks dog on the beach", "a photo of a dog"],
    ),
    "textual-inversion": (
        "textual inversion: a new token learned from 5-20 images; nothing else changes",
        "",
        """
[textual_inversion]
token = "<my-cat>"   # the new word; use it in your captions ("a photo of <my-cat>")
init_word = "cat"   # a word close to it (one token: the class noun), to start from
num_vectors = 4   # embedding vectors behind the token

[train]
max_steps = 3000
batch_size = 4
learning_rate = 5e-3   # only the token's vectors train: a large rate is right
weight_decay = 0.0
mixed_precision = "bf16"
""",
        0.0,
        500,
        ["a photo of <my-cat> in a garden", "an oil painting of <my-cat>"],
    ),
}


def _toml(value) -> str:
    return json.dumps(value)  # a TOML basic string or array of them, as JSON writes them


def render(
    task: str, base: str, data: str, resolution: int, out: str, output_dir: str | None = None
) -> str:
    """The commented config of `task` for this base model, image folder and resolution."""
    what, model_extra, body, val_fraction, every, prompts = _TEMPLATES[task]
    output = output_dir or f"runs/{task}"
    text = (
        _HEAD.format(what=what, task=task, out=out, output=_toml(output), base=_toml(base))
        + model_extra
    )
    text += _DATA.format(data=_toml(data), resolution=resolution, val_fraction=val_fraction)
    text += body
    text += _WATCH.format(every=every, prompts=_toml(prompts))
    return text
