"""Prompt handling of `AmbiSegPipeline`: the accepted prompt forms, their encoding (each distinct prompt once, one
row per sample) and given embeddings brought to the same rows."""

from __future__ import annotations

from typing import Union

import torch

from ..text import encode_prompts, sentence_encoded

PromptInput = Union[str, list[str], list[list[str]], None]


def normalize_prompts(prompt: PromptInput, batch_size: int) -> list[list[str]]:
    """`prompt` as documented in `AmbiSegPipeline.__call__` -> one non-empty list of prompts per image."""
    if prompt is None:
        return [[""] for _ in range(batch_size)]
    if isinstance(prompt, str):
        return [[prompt] for _ in range(batch_size)]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"`prompt` must be a string, a non-empty list of strings or a list of lists, got {prompt!r}.")
    if len(prompt) != batch_size:
        several = (" For several prompts of one image (one per rater, spread over its samples), wrap them in a list: "
                   "`prompt=[prompts]`.") if batch_size == 1 and all(isinstance(p, str) for p in prompt) else ""
        raise ValueError(f"`prompt` has {len(prompt)} entries but `image` has {batch_size} images; give one per image."
                         + several)
    per_image = []
    for i, item in enumerate(prompt):
        item = [item] if isinstance(item, str) else item
        if not isinstance(item, (list, tuple)) or len(item) == 0 or not all(isinstance(p, str) for p in item):
            raise ValueError(f"`prompt[{i}]` must be a string or a non-empty list of strings, got {item!r}.")
        per_image.append(list(item))
    return per_image


def pad_tokens(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads `(R, L, D)` states and their `(R, L)` mask to `length` tokens (padding is masked out)."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    return torch.nn.functional.pad(states, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


def rows_of(tensor: torch.Tensor | None, name: str, batch: int, num_samples: int,
            round_robin: bool = False) -> torch.Tensor | None:
    """A per-image `(batch, ...)` tensor repeated for each sample, or a per-row `(batch * num_samples, ...)` one.
    `round_robin` (prompt embeddings): `k` rows per image are spread over its samples as a prompt list per image
    is (sample `s` takes row `s % k`), so `encode_prompt` run with another `num_samples` is accepted too."""
    if tensor is None or tensor.shape[0] == batch * num_samples:
        return tensor
    if tensor.shape[0] == batch:
        return tensor.repeat_interleave(num_samples, dim=0)
    if round_robin and tensor.shape[0] % batch == 0:
        k = tensor.shape[0] // batch
        index = [b * k + s % k for b in range(batch) for s in range(num_samples)]
        return tensor[torch.tensor(index, device=tensor.device)]
    raise ValueError(f"`{name}` has {tensor.shape[0]} rows; expected one per image ({batch}) or one per sample "
                     f"({batch * num_samples})" + (", or the same number for each image" if round_robin else "")
                     + ".")


class PromptEncodingMixin:
    """`encode_prompt` and the embeddings of a call, for a pipeline with `text_encoder`, `tokenizer` and a
    `prompt_style` in its configuration."""

    def encode_prompt(
        self,
        prompt: PromptInput,
        device: torch.device | None = None,
        num_samples: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encodes the prompt of every sample row, each distinct prompt once.

        `prompt` as in `__call__` (a string, one per image, or a list per image spread round-robin over the samples).
        Returns `prompt_embeds` `(batch * num_samples, L, D)`, `prompt_attention_mask` `(batch * num_samples, L)` (1 =
        token, 0 = padding) and, with guidance, the negative prompt's (default: the empty prompt, what the model saw
        on prompt dropout) of the same shape, else `None` twice: exactly what `__call__` accepts.
        """
        device = device or self._execution_device
        if batch_size is None:
            batch_size = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        per_image = normalize_prompts(prompt, batch_size)
        row_prompts = [p[s % len(p)] for p in per_image for s in range(num_samples)]
        prompt_embeds, prompt_attention_mask = self._encode_rows(row_prompts, device)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        negative = normalize_prompts(negative_prompt if negative_prompt is not None else "", batch_size)
        negative_prompt_embeds, negative_prompt_attention_mask = self._encode_rows(
            [p[0] for p in negative for _ in range(num_samples)], device)
        length = max(prompt_embeds.shape[1], negative_prompt_embeds.shape[1])
        prompt_embeds, prompt_attention_mask = pad_tokens(prompt_embeds, prompt_attention_mask, length)
        negative_prompt_embeds, negative_prompt_attention_mask = pad_tokens(
            negative_prompt_embeds, negative_prompt_attention_mask, length)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode_rows(self, row_prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no `text_encoder`/`tokenizer`; pass `prompt_embeds` instead of `prompt`.")
        unique = sorted(set(row_prompts))
        states, mask = encode_prompts(self.tokenizer, self.text_encoder, unique, device=device,
                                      by_sentence=sentence_encoded(self.config.get("prompt_style")))
        index = torch.tensor([unique.index(p) for p in row_prompts], device=states.device)
        return states[index], mask[index]

    def prepare_prompt_embeds(
        self, prompt: PromptInput, negative_prompt, prompt_embeds: torch.Tensor | None, prompt_attention_mask,
        negative_prompt_embeds: torch.Tensor | None, negative_prompt_attention_mask, batch: int, num_samples: int,
        device, dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The text states of every sample row: `prompt` encoded, or the given embeddings (one row per image or per
        sample) repeated to the rows; with guidance, the negative prompt's padded to the same length (else None).
        Returns `(rows, L, D)` states in `dtype` and `(rows, L)` masks, on `device`."""
        guided = self.do_classifier_free_guidance
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                prompt, device, num_samples, guided, negative_prompt, batch_size=batch
            )
        else:
            prompt_embeds = rows_of(prompt_embeds, "prompt_embeds", batch, num_samples, round_robin=True)
            prompt_attention_mask = rows_of(prompt_attention_mask, "prompt_attention_mask", batch, num_samples,
                                            round_robin=True)
            if guided and negative_prompt_embeds is None:
                _, _, negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                    None, device, num_samples, True, negative_prompt, batch_size=batch
                )
            negative_prompt_embeds = rows_of(negative_prompt_embeds, "negative_prompt_embeds", batch, num_samples)
            negative_prompt_attention_mask = rows_of(
                negative_prompt_attention_mask, "negative_prompt_attention_mask", batch, num_samples
            )
            if negative_prompt_embeds is not None:
                length = max(prompt_embeds.shape[1], negative_prompt_embeds.shape[1])
                prompt_embeds, prompt_attention_mask = pad_tokens(prompt_embeds, prompt_attention_mask, length)
                negative_prompt_embeds, negative_prompt_attention_mask = pad_tokens(
                    negative_prompt_embeds, negative_prompt_attention_mask, length
                )
        if not guided or negative_prompt_embeds is None:
            return prompt_embeds.to(device=device, dtype=dtype), prompt_attention_mask.to(device), None, None
        return (prompt_embeds.to(device=device, dtype=dtype), prompt_attention_mask.to(device),
                negative_prompt_embeds.to(device=device, dtype=dtype), negative_prompt_attention_mask.to(device))
