"""Logit lens and EntRec against the model's own logits."""


import pytest
import torch

from interp.mechanisms.lens import entrec, logit_lens, named_position, position_label
from stand_ins import example as Ex




@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_lens_at_last_layer_equals_logits(model, request):
    hm = request.getfixturevalue(model)
    texts = ["The boss of Zorba lives in", "Hi"]
    lp = logit_lens(hm, texts)
    toks, lengths = hm.tokenize(texts)
    with torch.no_grad():
        ref = torch.log_softmax(hm.logits(toks).float(), -1)
    assert lp.shape == (hm.n_layers + 1, 2, toks.shape[1], hm.d_vocab)
    assert (lp[-1] - ref).abs().max().item() <= 1e-4
    assert (lp[0] - ref).abs().max().item() > 1e-2  # earlier layers differ


def test_entrec_rows_match_direct_computation(tiny_llama):
    hm = tiny_llama
    p = "The boss of Zorba lives in"
    s = p.index("Zorba")
    ex = Ex(p, "Paris", "Zorba", "Kelvo", "Paris", char_spans={"e1": (s, s + 5)})
    spans = [{"e1": (len(hm.encode(p[:s])), len(hm.encode(p[:s + 5])))}]
    df = entrec(hm, [ex], spans=spans)
    assert len(df) == (hm.n_layers + 1) * 2 * 2
    lp = logit_lens(hm, [p])
    e2 = hm.encode(" Kelvo")[0]
    fin = df[(df.position == "final") & (df.target == "e2") & (df.layer == hm.n_layers)].iloc[0]
    assert abs(fin.logprob - lp[-1, 0, -1, e2].item()) < 1e-4
    assert fin["rank"] == int((lp[-1, 0, -1] > lp[-1, 0, -1, e2]).sum())
    e1l = df[(df.position == "e1_last") & (df.target == "e3") & (df.layer == 2)].iloc[0]
    assert e1l.token_index == spans[0]["e1"][1] - 1
    assert abs(e1l.logprob - lp[2, 0, e1l.token_index, hm.encode(" Paris")[0]].item()) < 1e-4
    with pytest.raises(ValueError, match="position"):
        entrec(hm, [ex], positions=("bogus",), spans=spans)


def test_position_names():
    spans = {"e1": (2, 5)}
    assert [position_label(p, spans, 8) for p in range(9)] == [
        "other", "other", "e1_0", "e1_1", "e1_last", "other", "other", "final", "pad"]
    assert named_position("e1_last", spans, 8) == 4 and named_position("final", spans, 8) == 7
    with pytest.raises(ValueError, match="span"):
        named_position("r1_last", spans, 8)


def test_token_rank_counts_ties_in_the_targets_favour():
    """rank = number of tokens with a STRICTLY greater score (the docstrings of entrec and
    patchscope say so): a target tied for the top has rank 0, tied behind one token rank 1."""
    from interp.mechanisms.lens import token_rank

    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 3.0, 3.0, 3.0]])
    assert token_rank(scores, 2).tolist() == [0, 1]
    assert token_rank(scores, 3).tolist() == [3, 1]
    assert token_rank(scores[0], 1).item() == 0


def test_entity_token_skips_a_bare_space_token():
    """A byte-level tokenizer that splits the space off: the name's own first token is taken."""
    from interp.mechanisms.lens import entity_first_token

    class Tok:
        vocab = {" ": 5, "Zor": 7, "vath": 9, " Paris": 11}

        def decode(self, ids):
            inv = {v: k for k, v in self.vocab.items()}
            return "".join(inv[i] for i in ids)

    class HM:
        tokenizer = Tok()

        def encode(self, text):
            return [11] if text == " Paris" else [5, 7, 9]

    assert entity_first_token(HM(), "Zorvath") == 7
    assert entity_first_token(HM(), "Paris") == 11
