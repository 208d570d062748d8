"""The base model: a small Llama trained from scratch on the docstring corpus, saved like any Hub model."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from loramux.demo.corpus import TRANSFORMS


@dataclass(frozen=True)
class BaseRecipe:
    hidden: int = 160
    layers: int = 4
    heads: int = 5
    intermediate: int = 448
    vocab: int = 4096
    context: int = 256
    steps: int = 700
    batch: int = 8  # windows of `context` tokens per step
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    # Share of documents that also appear uppercased and in ROT13. Byte-level BPE spells those alphabets
    # almost letter by letter unless the tokenizer and the model have seen them; the adapters then teach
    # *when* to write them (a plain prompt, continued in the adapter's style). Reversed word order uses the
    # plain vocabulary, so the base never sees reversed text at all.
    styled_share: float = 0.4
    seed: int = 0


def llama_config(recipe: BaseRecipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=recipe.vocab,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def base_texts(docs: Sequence[str], *, recipe: BaseRecipe) -> list[str]:
    """The base model's (and the tokenizer's) training documents: every docstring, plus an uppercase and a
    ROT13 copy of a seeded share of them. Each document is in one style throughout."""
    rng = random.Random(recipe.seed)
    texts = list(docs)
    for name in ("upper", "rot13"):
        transform = TRANSFORMS[name][0]
        texts += [transform(d) for d in docs if rng.random() < recipe.styled_share]
    rng.shuffle(texts)
    return texts


def token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """All documents as one stream: <s> doc </s> <s> doc </s> ... (1-D, int64)."""
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def lr_at(step: int, *, recipe: BaseRecipe, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, total - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_base(
    stream: Tensor,
    *,
    config: LlamaConfig,
    recipe: BaseRecipe,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
) -> LlamaForCausalLM:
    """Next-token training on random windows of the stream (seeded: same stream, same windows)."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them only hurts
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        starts = torch.randint(0, len(stream) - recipe.context, (recipe.batch,), generator=generator)
        batch = torch.stack([stream[s : s + recipe.context] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe=recipe, total=recipe.steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, {"loss": float(loss.detach())})
    return model.eval()


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, stream: Tensor, *, context: int, max_windows: int = 64) -> float:
    """Average next-token loss over consecutive windows of a held-out stream."""
    windows = stream[: (len(stream) // context) * context].view(-1, context)[:max_windows]
    return float(model(input_ids=windows, labels=windows).loss)


def save_base(model: LlamaForCausalLM, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Weights in fp16 (half the bytes); config.json keeps dtype float32 so that a plain
    ``AutoModelForCausalLM.from_pretrained(folder)`` gives an fp32 model (fp16 -> fp32 is exact)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.half().save_pretrained(folder, safe_serialization=True)
    model.float()
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
