"""Tiny, offline components (a 2-level UNet, a 1-layer BERT, a tokenizer from a small vocabulary that really maps
words to ids), the `needs_data` marker, and the script folders on `sys.path`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from transformers import BertConfig, BertModel, BertTokenizer

from ambiseg_diffusers import AmbiguityEncoder, AmbiSegImageProcessor, AmbiSegPipeline, AmbiSegUNet
from ambiseg_diffusers.lidc import resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "training"), str(ROOT / "scripts"), str(ROOT / "examples" / "research_projects")]

try:
    resolve_data_dir(None, "lidc64")
    HAVE_DATA = True
except FileNotFoundError:
    # CI sets AMBISEG_REQUIRE_DATA=1: there a missing data folder is a failure, never a silent skip.
    if os.environ.get("AMBISEG_REQUIRE_DATA") == "1":
        raise
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data/lidc64 not present (set AMBISEG_DATA_DIR)")

# Tiny models run fastest on one thread, and the suite must not fight a training run for the cores.
torch.set_num_threads(1)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "the", "nodule", "is", "with", "and", "no",
         "solid", "round", "sharp", "margin", "spiculation", "marked", "ground", "glass", "lobulation", "poorly",
         "defined", "subtlety", "1", "2", "3", "4", "5", "large", "small"]
TEXT_DIM = 16
LATENT_DIM = 3
SIZE = 16


def make_tokenizer() -> BertTokenizer:
    # transformers 5 ignores `vocab_file` here (a 5-token vocabulary); the vocabulary is passed as a dict.
    return BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}, model_max_length=512)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_text_encoder() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    return BertModel(config).eval()


def tiny_unet(latent_dim: int = LATENT_DIM) -> AmbiSegUNet:
    torch.manual_seed(0)
    return AmbiSegUNet.from_preset(
        "cpu", sample_size=SIZE, text_embed_dim=TEXT_DIM, latent_dim=latent_dim, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4,
    )


def tiny_encoder(in_channels: int) -> AmbiguityEncoder:
    torch.manual_seed(1)
    encoder = AmbiguityEncoder(in_channels=in_channels, latent_dim=LATENT_DIM, text_embed_dim=TEXT_DIM,
                               block_out_channels=(8, 8), norm_num_groups=4)
    # A trained-looking head: the zero-initialised one gives N(0, I) whatever the input, and a test could not tell a
    # prior fed the wrong image (or none) from the right one.
    torch.nn.init.normal_(encoder.head[-1].weight, std=0.5)
    return encoder


def make_pipeline(tokenizer, scheduler=None, prediction_type: str = "sample", size: int = SIZE) -> AmbiSegPipeline:
    """The tiny pipeline; `size`: its image processor's (64 to run it on the lidc64 crops as they are)."""
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=True)
    pipe = AmbiSegPipeline(unet=tiny_unet(), scheduler=scheduler, text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                           prior=tiny_encoder(1), posterior=tiny_encoder(2),
                           image_processor=AmbiSegImageProcessor(size=size), autocast="no")  # golden values in float32, whatever the test machine's CPU
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tokenizer) -> AmbiSegPipeline:
    return make_pipeline(tokenizer)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(SIZE, SIZE)).astype(np.float32) * 200 - 600  # HU-like range


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test's scripts start from a clean one (precision, device)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

# diffusers' vendored test helpers are imported by tests, never collected on their own (their unittest classes would
# try the Hub).
collect_ignore = ["diffusers_suite"]
