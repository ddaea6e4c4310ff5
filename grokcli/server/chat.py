"""Chat templates: how a list of chat messages becomes the text a base model continues.

Grok-1 is a base model with no chat format of its own, so a chat request is rendered as a
document and the model writes the next turn. Each template is named; the response says which
one was used.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..repl import CHAT_BOT, CHAT_USER


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A named way of rendering messages, and the stop strings that end the model's turn."""

    name: str
    description: str
    user: str  # prefix of a user turn
    assistant: str  # prefix of an assistant turn (the prompt ends with it)
    stop: tuple[str, ...]  # added to the request's own stop strings

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for (role, text) messages: system text first, then the turns, then the
        assistant prefix the model continues. Roles are "system", "developer", "user", "assistant"."""
        parts: list[str] = []
        for role, text in messages:
            if role in ("system", "developer"):
                parts.append(f"{text.strip()}\n\n")
            elif role == "user":
                parts.append(f"{self.user} {text.strip()}\n\n")
            else:
                parts.append(f"{self.assistant} {text.strip()}\n\n")
        return "".join(parts) + self.assistant


# The REPL's chat format (`grok repl --template chat`), so a server and a REPL session agree.
HUMAN_ASSISTANT = ChatTemplate(
    name="human-assistant",
    description=f"'{CHAT_USER} ...' / '{CHAT_BOT} ...' turns separated by blank lines (the REPL's chat template)",
    user=CHAT_USER, assistant=CHAT_BOT, stop=("\n" + CHAT_USER, CHAT_USER))

# The same layout with the words "User:" and "Assistant:", which some base-model prompts use.
USER_ASSISTANT = ChatTemplate(
    name="user-assistant",
    description="'User: ...' / 'Assistant: ...' turns separated by blank lines",
    user="User:", assistant="Assistant:", stop=("\nUser:", "User:"))

TEMPLATES = {t.name: t for t in (HUMAN_ASSISTANT, USER_ASSISTANT)}
DEFAULT_TEMPLATE = HUMAN_ASSISTANT.name


def get_template(name: str) -> ChatTemplate:
    """The template called `name`; ValueError listing the choices otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATES)}") from None
