"""The API's requests, with OpenAI's field names and pydantic's validation, and the sampling settings they ask
for. Sampling fields left out take inference.py's defaults for the model (top-k 50, top-p 0.95, temperature
1.0, one paragraph; top-k and top-p as the run that trained it sampled, where it records them), so the same
request and seed give the same text as inference.py with the same flags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from austen_gpt.settings import SamplingSettings

DEFAULTS = SamplingSettings()
DEFAULT_MAX_TOKENS = 200  # new tokens where a request asks for none (fewer where fewer fit)
MAX_STOP_CHARACTERS = 256  # per stop string: the stop check runs on the one thread that samples for all

# fields OpenAI's API has and this server does not implement: accepted only at their neutral values
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. Unknown fields are refused (as OpenAI's API refuses them), and those
    in NEUTRAL are refused unless neutral."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULTS.temperature, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions, as inference.py's flags
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float = Field(DEFAULTS.repetition_penalty, gt=0)
    paragraphs: int | None = Field(DEFAULTS.paragraphs, ge=1)
    # each sample kept of `rerank` candidates by the model's judge, as inference.py --rerank N --rerank-choice
    rerank: int = Field(1, ge=1, le=16)
    rerank_choice: Literal["sample", "best"] = "sample"
    # not implemented: refused unless neutral
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if isinstance(stop, list) and (len(stop) > 4 or not all(stop)):
            raise ValueError("give up to 4 non-empty stop strings")
        if any(len(one) > MAX_STOP_CHARACTERS for one in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARACTERS} characters; shorten it")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) and self.stop else tuple(self.stop or ())

    def asked_tokens(self) -> int | None:
        """The new tokens the request asks for, None where it leaves that to the server."""
        return self.max_tokens

    def settings(self, defaults: SamplingSettings) -> SamplingSettings:
        """The sampling settings asked for, `defaults`' top-k and top-p where it gives none; temperature 0 is
        greedy (top-k 1), as OpenAI's API reads it."""
        greedy = self.temperature == 0
        return SamplingSettings(
            max_new_tokens=self.asked_tokens() or DEFAULT_MAX_TOKENS,
            top_k=1 if greedy else defaults.top_k if self.top_k is None else self.top_k,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            temperature=1.0 if greedy else self.temperature,
            repetition_penalty=self.repetition_penalty,
            paragraphs=self.paragraphs,
        )

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do."""
        for name, neutral in NEUTRAL.items():
            if name in self.model_fields_set and getattr(self, name, None) not in neutral:
                return name
        return None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not 1 <= len(prompt) <= 16:
            raise ValueError("give 1 to 16 prompts")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def prose_prompt(self) -> str:
        """The text the model continues: the last user message's content (the model writes prose; it does not
        follow instructions, so system and earlier messages are left out)."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""

    def asked_tokens(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens


PROMPT_RULE = "the content of the last user message, continued as prose; other messages are not read"
