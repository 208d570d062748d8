"""The adapters: LoRA trained with loramux's own trainable path, all in one mixed batch, exported for PEFT.

Each training example is a docstring cut at a random word: the words before the cut are the prompt, in plain
text; the rest is the continuation, in the adapter's style (uppercase, ROT13, words reversed). Only the
continuation is learned. That is exactly the serving situation: a plain prompt, continued in style.

Every step runs one batch whose rows belong to different adapters (``manager.routing`` with one name per
row), so the three adapters train together over one pass of the frozen base, and each gets the gradients
of its own rows only.
"""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from loramux.core import AdapterManager
from loramux.core.adapters.adapter import LoadedAdapter
from loramux.core.adapters.export import export_adapter, lora_config, write_initial_adapter
from loramux.demo.corpus import TRANSFORMS

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of tokens that are not learned (prompt, padding)


@dataclass(frozen=True)
class AdapterRecipe:
    r: int = 8
    alpha: int = 16
    steps: int = 240
    # Rows of each adapter in every step's batch. Reversed word order is new to the base (uppercase and ROT13
    # are only new as a reply to a plain prompt), so it gets more of the batch.
    rows: tuple[tuple[str, int], ...] = (("upper", 6), ("rot13", 6), ("reverse", 12))
    max_tokens: int = 96
    max_prompt_words: int = 12
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # <s> prompt continuation [</s>]
    prompt_len: int  # tokens not learned, <s> included


def split_at_word(doc: str, words: int) -> tuple[str, str]:
    """(the first ``words`` words, the rest with its leading whitespace)."""
    if words == 0:
        return "", doc
    gaps = [m.start() for m in re.finditer(r"\s+", doc)]
    cut = gaps[words - 1] if words <= len(gaps) else len(doc)
    return doc[:cut], doc[cut:]


def styled(rest: str, transform: Callable[[str], str]) -> str:
    """The continuation in style, keeping the whitespace that joins it to the prompt."""
    body = rest.lstrip()
    return rest[: len(rest) - len(body)] + transform(body)


def make_examples(
    docs: Sequence[str],
    transform: Callable[[str], str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    recipe: AdapterRecipe,
    rng: random.Random,
) -> list[Example]:
    prompts, continuations = [], []
    for doc in docs:
        n_words = len(doc.split())
        prompt, rest = split_at_word(doc, rng.randint(0, min(recipe.max_prompt_words, n_words - 1)))
        prompts.append(prompt)
        continuations.append(styled(rest, transform))
    prompt_ids = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    cont_ids = tokenizer(continuations, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for p, c in zip(prompt_ids, cont_ids, strict=True):
        ids = (*p, *c, eos)[: recipe.max_tokens]
        if len(ids) - len(p) >= 4:  # a few tokens to learn at least
            examples.append(Example(ids=ids, prompt_len=len(p)))
    return examples


def collate(examples: Sequence[Example], *, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (ids, attention_mask, labels); labels are IGNORE on prompt and padding."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, e.prompt_len : n] = ids[i, e.prompt_len : n]
    return ids, mask, labels


def train_adapters(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    *,
    out_dir: Path,
    recipe: AdapterRecipe,
    base_model_name_or_path: str,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
) -> dict[str, Path]:
    """Train one adapter per name of recipe.rows (a key of TRANSFORMS) and write each to out_dir/<name>.

    ``model`` is the base as shipped (loaded back from its saved weights), so the adapters fit it exactly.
    """
    model.requires_grad_(False)  # the base stays frozen; only LoRA tensors get gradients
    names = [name for name, _ in recipe.rows]
    rng = random.Random(recipe.seed)
    examples = {n: make_examples(docs, TRANSFORMS[n][0], tokenizer, recipe=recipe, rng=rng) for n in names}
    config = lora_config(
        r=recipe.r, lora_alpha=recipe.alpha, target_modules=PROJECTIONS, base_model_name_or_path=base_model_name_or_path
    )
    with tempfile.TemporaryDirectory(prefix="loramux-initial-") as scratch:  # never left in out_dir
        manager = AdapterManager(model)
        for i, name in enumerate(names):
            folder = write_initial_adapter(model, Path(scratch) / name, config=config, seed=recipe.seed + i)
            manager.load_adapter(str(folder), name, is_trainable=True)
        _train(model, manager, examples, pad_id=tokenizer.pad_token_id, recipe=recipe, rng=rng, on_step=on_step)
        return {name: export_adapter(_acquire(manager, name), out_dir / name) for name in names}


def _train(
    model: nn.Module,
    manager: AdapterManager,
    examples: Mapping[str, Sequence[Example]],
    *,
    pad_id: int,
    recipe: AdapterRecipe,
    rng: random.Random,
    on_step: Callable[[int, Mapping[str, float]], None] | None,
) -> None:
    params = [p for name, _ in recipe.rows for p in _acquire(manager, name).parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    row_names = [name for name, count in recipe.rows for _ in range(count)]
    model.train()
    for step in range(recipe.steps):
        batch = [e for name, count in recipe.rows for e in rng.sample(examples[name], count)]
        ids, mask, labels = collate(batch, pad_id=pad_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, recipe)
        with manager.routing(row_names):  # row i is trained through adapter row_names[i]
            logits = model(input_ids=ids, attention_mask=mask).logits
        token_loss, counts = _token_losses(logits, labels)
        loss = token_loss.sum() / counts.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, _per_adapter(token_loss.detach(), counts, row_names))
    model.eval()


def _token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token losses (N, T-1), zero where not learned, and the learned-token count of each row (N,)."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return losses, (targets != IGNORE).sum(dim=1)


def _per_adapter(token_loss: Tensor, counts: Tensor, row_names: Sequence[str]) -> dict[str, float]:
    sums, tokens = token_loss.sum(dim=1).tolist(), counts.tolist()
    out = {}
    for name in dict.fromkeys(row_names):
        rows = [i for i, n in enumerate(row_names) if n == name]
        out[name] = sum(sums[i] for i in rows) / max(1, sum(tokens[i] for i in rows))
    return out


def _acquire(manager: AdapterManager, name: str) -> LoadedAdapter:
    adapter = manager.acquire(name)
    assert adapter is not None
    return adapter


def _lr(step: int, recipe: AdapterRecipe) -> float:
    """Linear warm-up, then linear decay to a tenth."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    return recipe.lr * (1 - 0.9 * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
