import pytest

from fewtune.errors import ConfigError
from fewtune.tasks.prompts import Pattern, verbalizer_token_ids


def test_pattern_query_and_demonstration():
    p = Pattern("gpt-3", "{premise} question: {hypothesis} Yes or No?", " answer:", (" Yes", " No"))
    f = {"premise": "A man sleeps.", "hypothesis": "A man is awake."}
    assert p.query(f) == "A man sleeps. question: A man is awake. Yes or No? answer:"
    assert p.demonstration(f, 1).endswith("answer: No")
    assert p.fields() == ["premise", "hypothesis"]
    with pytest.raises(ConfigError, match="needs field"):
        p.query({"sentence": "x"})


def test_verbalizer_single_tokens_bpe(tokenizer):
    v = verbalizer_token_ids(tokenizer, (" Yes", " No"))
    assert v.tokens == ("ĠYes", "ĠNo")
    # The scored token is the one the tokenizer produces for the word in running text.
    ids = tokenizer("Is it ? Yes", add_special_tokens=False)["input_ids"]
    assert ids[-1] == v.token_ids[0]


def test_verbalizer_multi_token_word_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="not one"):
        verbalizer_token_ids(tokenizer, (" Yes", " Antidisestablishmentarianism"))


def test_verbalizer_duplicate_tokens_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="same token"):
        verbalizer_token_ids(tokenizer, (" Yes", " Yes"))
