"""Tiny, offline components: a 2-level UNet, a 1-layer BERT and a tokenizer from a small vocab file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from transformers import BertConfig, BertModel, BertTokenizerFast

from ambiseg_diffusers import AmbiguityEncoder, AmbiSegPipeline, AmbiSegUNet

# Tiny models run fastest on one thread, and the suite must not fight a training run for the cores.
torch.set_num_threads(1)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "the", "nodule", "is", "with", "and", "no",
         "solid", "round", "sharp", "margin", "spiculation", "marked", "ground", "glass", "lobulation", "poorly",
         "defined", "subtlety", "1", "2", "3", "4", "5", "large", "small"]
TEXT_DIM = 16
LATENT_DIM = 3
SIZE = 16


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), model_max_length=32)


def tiny_text_encoder() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
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
    return AmbiguityEncoder(in_channels=in_channels, latent_dim=LATENT_DIM, text_embed_dim=TEXT_DIM,
                            block_out_channels=(8, 8), norm_num_groups=4)


def make_pipeline(tokenizer, scheduler=None, prediction_type: str = "sample") -> AmbiSegPipeline:
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=True)
    pipe = AmbiSegPipeline(unet=tiny_unet(), scheduler=scheduler, text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                           prior=tiny_encoder(1), posterior=tiny_encoder(2), default_num_inference_steps=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tokenizer) -> AmbiSegPipeline:
    return make_pipeline(tokenizer)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(SIZE, SIZE)).astype(np.float32) * 200 - 600  # HU-like range
