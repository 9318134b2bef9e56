"""sdtune: train and fine-tune Stable Diffusion models."""

import logging

__version__ = "0.1.0"

# diffusers imports bitsandbytes whenever it is installed (the 'bnb' extra), and bitsandbytes
# then warns on stderr about 4-bit CPU kernels that sdtune never uses: keep one-line errors clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
