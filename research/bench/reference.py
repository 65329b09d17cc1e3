"""The reference side: Hugging Face transformers' PyTorch models, as a user would run them.

Same shapes, same dtype policy as ours (float32; on a GPU bfloat16 autocast over float32
weights), same step: next-token cross-entropy, backward, global-norm clipping at 1.0, then
``torch.optim.AdamW`` with weight decay 0.01 on matrices only (as ``research.train.optim``).

Imports no JAX (nor the project's models, which need it): what this side reads of a
benchmark ``Setup`` is a :class:`ReferenceSetup` of plain data, so a ``reference`` child
process measures PyTorch's memory alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import numpy as np
import torch
import transformers


@dataclasses.dataclass(frozen=True)
class ReferenceSetup:
    """The shapes and settings of a benchmark ``Setup`` (research/bench/common.py) that the
    reference reads, the models as their ``config.json`` dicts; JSON in, JSON out."""

    decoder: dict[str, Any]  # the decoder config's to_hf_dict()
    encoder: dict[str, Any]  # the encoder config's to_hf_dict()
    dtype: str
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    memory_steps: int

    @classmethod
    def of(cls, setup: Any) -> ReferenceSetup:
        return cls(
            setup.decoder.to_hf_dict(),
            setup.encoder.to_hf_dict(),
            setup.dtype,
            setup.batch,
            setup.seq,
            setup.prompt,
            setup.new_tokens,
            setup.memory_steps,
        )


def device_for(platform: str) -> str | None:
    """Where the reference runs when ours runs on a JAX ``platform``: the CPU next to the
    CPU, CUDA next to a GPU (None when this torch build has no CUDA: nothing to compare)."""
    if platform != "gpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def _autocast(setup: ReferenceSetup, device: str):
    if setup.dtype == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_model(setup: ReferenceSetup, seed: int = 0) -> transformers.PreTrainedModel:
    """transformers' causal LM of ``setup.decoder`` (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, ...) with Hugging Face's random initialisation."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**setup.decoder)
    return transformers.AutoModelForCausalLM.from_config(config)


def peft_lm(decoder: dict[str, Any], adapters: dict[str, Any]) -> torch.nn.Module:
    """PEFT's LoRA (``adapters``: ``peft.LoraConfig`` fields, ``r``, ``lora_alpha``,
    ``target_modules``, ...) on transformers' causal LM of ``decoder`` (its ``config.json``
    dict), the base created in bfloat16 (as ``from_pretrained`` with ``dtype=torch.bfloat16``
    loads one); ``get_peft_model`` keeps the adapters float32."""
    import peft

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**decoder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    settings = peft.LoraConfig(**adapters, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, settings)


def conditioned_model(setup: ReferenceSetup, seed: int = 0) -> transformers.EncoderDecoderModel:
    """``EncoderDecoderModel``: ``BertModel`` encoder + ``GPT2LMHeadModel`` decoder with
    ``add_cross_attention=True`` (Hugging Face projects the encoder states to the decoder's
    width once, then every block's cross-attention reads them)."""
    torch.manual_seed(seed)
    encoder = transformers.BertModel(transformers.AutoConfig.for_model(**setup.encoder))
    decoder_config = transformers.AutoConfig.for_model(
        **setup.decoder, add_cross_attention=True, is_decoder=True
    )
    decoder = transformers.GPT2LMHeadModel(decoder_config)
    return transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)


class TrainStep:
    """One training step of a transformers model; ``__call__`` returns the loss (a float)."""

    def __init__(
        self, model: torch.nn.Module, batch: dict[str, np.ndarray], setup: ReferenceSetup, device
    ):
        self.model = model.to(device).train()
        self.setup, self.device = setup, device
        trained = [p for p in model.parameters() if p.requires_grad]  # PEFT freezes the base
        decay = [p for p in trained if p.ndim >= 2]
        rest = [p for p in trained if p.ndim < 2]
        self.trained = trained
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
            lr=1e-4,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        tensor = lambda key: torch.as_tensor(batch[key], dtype=torch.long, device=device)  # noqa: E731
        ids = tensor("decoder_ids")
        self.targets = ids[:, 1:].reshape(-1)
        if "encoder_ids" in batch:
            self.inputs = {
                "input_ids": tensor("encoder_ids"),
                "attention_mask": tensor("encoder_mask"),
                "decoder_input_ids": ids,
                "decoder_attention_mask": tensor("decoder_mask"),
            }
        else:
            self.inputs = {"input_ids": ids, "attention_mask": tensor("decoder_mask")}

    def __call__(self) -> float:
        with _autocast(self.setup, self.device):
            logits = self.model(**self.inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), self.targets
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def with_weights_dtype(
    model: transformers.PreTrainedModel, weights_dtype: str
) -> transformers.PreTrainedModel:
    """``model`` itself for float32, else a copy whose weights are rounded to ``weights_dtype``
    (``sampling.weights_dtype``'s reference: PyTorch computing with those weights)."""
    if weights_dtype == "float32":
        return model
    return copy.deepcopy(model).to(getattr(torch, weights_dtype))


def greedy(
    model: transformers.PreTrainedModel,
    prompt_ids: np.ndarray,
    new_tokens: int,
    setup: ReferenceSetup,
    device: str,
):
    """A function running ``model.generate`` (greedy, its KV cache) -> new tokens
    ``[rows, new_tokens]`` as numpy; ``min_new_tokens`` makes every row produce all of them."""
    model = model.to(device).eval()
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run() -> np.ndarray:
        with torch.inference_mode(), _autocast(setup, device):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=setup.decoder["eos_token_id"],
            )
        return out[:, ids.shape[1] :].cpu().numpy()

    return run
