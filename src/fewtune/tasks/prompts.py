"""Prompt patterns and verbalizers.

A pattern turns an example's text fields into a query that ends right before the answer; the
verbalizer gives, per label, the answer word that follows (with its leading space, " Yes").
Demonstrations are ``query + verbalizer word``. We deliberately end queries *without* a trailing
space and put the space in the verbalizer word, so that the scored token is the one the tokenizer
produces in running text (llmft ends the query in "? " and then scores "ĠYes", a token that never
follows a space in training text).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from fewtune.errors import ConfigError


@dataclass(frozen=True)
class Pattern:
    """A prompt template plus the verbalizer words, one per label id."""

    name: str
    template: str
    target_prefix: str
    verbalizer: tuple[str, ...]
    source: str = "llmft (Mosbach et al. 2023)"

    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def query(self, fields: dict[str, str]) -> str:
        """The text the model continues with the answer word."""
        try:
            body = self.template.format(**fields)
        except KeyError as e:
            raise ConfigError(
                f"pattern '{self.name}' needs field {e} but the example has {sorted(fields)}",
                "use a pattern whose {placeholders} match the task's text fields",
            ) from None
        return body + self.target_prefix

    def demonstration(self, fields: dict[str, str], label: int) -> str:
        return self.query(fields) + self.verbalizer[label]


@dataclass(frozen=True)
class VerbalizerTokens:
    """Token ids of the verbalizer words, in label order."""

    words: tuple[str, ...]
    token_ids: tuple[int, ...] = field(default=())
    tokens: tuple[str, ...] = field(default=())


def verbalizer_token_ids(tokenizer, words: tuple[str, ...] | list[str]) -> VerbalizerTokens:
    """Resolve each verbalizer word to exactly one token id, or fail clearly.

    Tokenizers mark a leading space differently (GPT-2/Llama-3 BPE "Ġ", SentencePiece "▁"); we
    let the tokenizer itself encode the word as it appears in running text after a word, so the
    convention is handled by the tokenizer rather than by string surgery. A word that becomes
    several tokens would make "the answer's probability" ill-defined, so it is an error.
    """
    ids: list[int] = []
    toks: list[str] = []
    for word in words:
        probe = "x" + word  # word as it follows other text, so SentencePiece adds no extra "▁"
        base = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=False)["input_ids"]
        piece = full[len(base):] if full[: len(base)] == base else tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(piece) != 1:
            shown = tokenizer.convert_ids_to_tokens(piece)
            raise ConfigError(
                f"verbalizer word {word!r} is {len(piece)} tokens for this tokenizer ({shown}), not one",
                "choose verbalizer words that are a single token (e.g. ' Yes'/' No'), or another pattern",
            )
        ids.append(piece[0])
        toks.append(tokenizer.convert_ids_to_tokens(piece)[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"verbalizer words {list(words)} map to the same token", "use distinct words")
    return VerbalizerTokens(tuple(words), tuple(ids), tuple(toks))
