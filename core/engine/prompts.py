"""What a prompt becomes: token ids, the same way for Generate and Tokenize.

Text is tokenized with the tokenizer's special tokens (or, with ``apply_chat_template``, rendered first as one
user message); a conversation (ChatPrompt) is rendered with the tokenizer's chat template, the assistant's
generation prompt appended, exactly as ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
does; token ids are used as given, each checked against the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from loramux.core.engine.requests import ChatMessage, ChatPrompt, Prompt
from loramux.core.errors import InvalidArgumentError

ROLES: Final = ("system", "user", "assistant", "tool")


def prompt_ids(tokenizer: Any, prompt: Prompt, *, apply_chat_template: bool, vocab_size: int) -> list[int]:
    if isinstance(prompt, ChatPrompt):
        if apply_chat_template:
            raise InvalidArgumentError(
                "apply_chat_template is for a text prompt; messages always are rendered", field="apply_chat_template"
            )
        return render_chat(tokenizer, prompt.messages, field="messages")
    if isinstance(prompt, str):
        if apply_chat_template:
            return render_chat(tokenizer, (ChatMessage("user", prompt),), field="apply_chat_template")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if apply_chat_template:
        raise InvalidArgumentError("apply_chat_template needs a text prompt", field="apply_chat_template")
    return checked_ids(prompt, vocab_size=vocab_size)


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], *, field: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError("this model's tokenizer has no chat template", field=field)
    if not messages:
        raise InvalidArgumentError("a conversation needs at least one message", field=field)
    unknown = sorted({m.role for m in messages} - set(ROLES))
    if unknown:
        raise InvalidArgumentError(f"unknown message roles {unknown}; use one of {', '.join(ROLES)}", field=field)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    except Exception as exc:  # a template that refuses the conversation (raise_exception in Jinja, ...)
        raise InvalidArgumentError(f"the chat template refused these messages: {exc}", field=field) from exc
    if hasattr(ids, "keys"):  # a BatchEncoding (transformers 5's default) or a dict
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def checked_ids(ids: Sequence[int], *, vocab_size: int) -> list[int]:
    ids = list(ids)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", field="token_ids"
        )
    return ids
