"""Tokenizer safety: split prefix/query tokenization must equal the joint one (else prompts are
tokenized jointly, with a note), an appended EOS never becomes the scored position, and a
tokenizer without a pad token gets one or a clear error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from tokenizers.processors import TemplateProcessing

from fewtune.errors import ConfigError
from fewtune.models.adapter import ensure_pad_token
from fewtune.models.loading import load_model
from fewtune.scoring.batching import appended_suffix, encode_prompts
from fewtune.scoring.scorer import PATH_NAIVE, PATH_PREFIX_CACHE, score_prompts

PREFIX = "Sentence: the cat sat. Answer: Yes\n\nSentence: stone. Answer: No\n\n"
QUERIES = ["Sentence: dogs bark. Answer:", "Sentence: a red apple. Answer:"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random", seed=0)


@pytest.fixture()
def eos_tok(lm):
    """The embedded tokenizer made to append EOS to every text (as some tokenizers do)."""
    t = copy.deepcopy(lm.tokenizer)
    t.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {t.eos_token}",
                                                            special_tokens=[(t.eos_token, t.eos_token_id)])
    return t


def labels(tok) -> list[int]:
    return [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" No", " Yes")]


def test_an_appended_eos_is_not_scored(lm, eos_tok):
    assert eos_tok("a")["input_ids"][-1] == eos_tok.eos_token_id and appended_suffix(eos_tok) == [eos_tok.eos_token_id]
    assert appended_suffix(lm.tokenizer) == []
    for prefix in ("", PREFIX):
        assert encode_prompts(eos_tok, QUERIES, prefix) == encode_prompts(lm.tokenizer, QUERIES, prefix)
    want = score_prompts(lm.model, lm.tokenizer, QUERIES, labels(lm.tokenizer))
    got = score_prompts(lm.model, eos_tok, QUERIES, labels(lm.tokenizer))
    assert np.array_equal(got.label_logprobs, want.label_logprobs)


def test_split_tokenization_differing_from_joint_tokenizes_jointly(lm):
    tok = lm.tokenizer
    prefix, queries = "Sentence: Hel", ["lo world. Answer:", "p me. Answer:"]
    split = tok(prefix)["input_ids"] + tok(queries[0], add_special_tokens=False)["input_ids"]
    joint = tok(prefix + queries[0])["input_ids"]
    assert split != joint  # "Hel" + "lo" vs "Hello": the boundary merges
    enc = encode_prompts(tok, queries, prefix)
    assert enc.prefix_ids == [] and enc.query_ids[0] == joint and "jointly" in enc.note
    s = score_prompts(lm.model, tok, queries, labels(tok), prefix=prefix)
    assert s.path == PATH_NAIVE and "jointly" in s.note
    # real prompts (a pattern's separators) split cleanly: the prefix is shared, no note
    enc = encode_prompts(tok, [" " + q for q in QUERIES], PREFIX)
    assert enc.prefix_ids and enc.note is None
    assert score_prompts(lm.model, tok, [" " + q for q in QUERIES], labels(tok), prefix=PREFIX).path == PATH_PREFIX_CACHE


@pytest.mark.parametrize("keep,want", [("eos_token", "<|im_end|>"), ("unk_token", "<|endoftext|>"),
                                       ("bos_token", "<|im_start|>"), (None, None)])
def test_a_tokenizer_without_pad_gets_one_or_a_clear_error(lm, keep, want):
    t = copy.deepcopy(lm.tokenizer)
    kept = getattr(t, keep) if keep else None
    for name in ("pad_token", "eos_token", "unk_token", "bos_token"):
        setattr(t, name, None)
    if keep:
        setattr(t, keep, kept)
        ensure_pad_token(t)
        assert t.pad_token == want and t.pad_token_id is not None
    else:
        with pytest.raises(ConfigError, match="no pad, eos, unk or bos"):
            ensure_pad_token(t)


def test_training_reads_the_position_scoring_reads_with_an_eos_appending_tokenizer(eos_tok):
    """One tokenization path: a tokenizer that appends EOS trains exactly as one that does not
    (the loss is read at the text's last token, where prediction reads, never at the EOS)."""
    from test_methods_train import make, toy_examples

    examples = toy_examples(8)
    runs = []
    for with_eos in (False, True):
        m = make("pbft", lr=1e-3, max_steps=2, batch_size=4, warmup_ratio=0.0)
        if with_eos:
            m.ctx.lm.tokenizer = eos_tok
        texts = [m.input_text(e) for e in examples]
        seqs = m.encode_training(texts)
        assert seqs == encode_prompts(m.ctx.lm.tokenizer, texts).query_ids
        assert all(s[-1] != eos_tok.eos_token_id for s in seqs)
        runs.append(m.fit(examples)["loss_history"])
    assert runs[1] == pytest.approx(runs[0], abs=1e-6)
