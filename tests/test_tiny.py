"""The tiny test models: their tokenizer must really split text, or every test trains on <unk>."""

from transformers import AutoTokenizer

from dualtune import synthetic
from dualtune.tiny import words


def test_tiny_tokenizer_splits_words_and_round_trips(tiny_t5):
    tok = AutoTokenizer.from_pretrained(tiny_t5)  # as saved and reloaded, like every run does
    sentence = synthetic.generate(rows=1, seed=3)[0]["sentence"]
    ids = tok(sentence)["input_ids"]
    assert len(ids) == len(words(sentence)) + 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(words(sentence))
    assert tok("the unheardof company")["input_ids"].count(tok.unk_token_id) == 1
