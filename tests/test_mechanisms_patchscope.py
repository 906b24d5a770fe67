"""Patchscope decoding equals a direct full forward with the state hooked into the target."""


import torch

from interp.mechanisms.lens import offsets_token_spans

from interp.mechanisms.patchscope import IDENTITY_PROMPT, patchscope
from stand_ins import example as Ex




def test_patchscope_matches_hooked_forward(tiny_llama):
    hm = tiny_llama
    exs = [Ex("The boss of Zorba is", e1="Zorba", e2="Kelvo", char_spans={"e1": (12, 17)}, tier="H", kind="hop1"),
           Ex("Quinn works for", e1="Quinn", e2="Mirta", char_spans={"e1": (0, 5)}, tier="H", kind="hop1")]
    spans = [offsets_token_spans(e, hm) for e in exs]
    df = patchscope(hm, exs, "e1_last", "identity", spans=spans, n_generate=2, max_batch=3,
                    progress=False)
    assert len(df) == 2 * hm.n_layers
    l, b = 2, 1
    row = df[(df.source_layer == l) & (df.example_id == b)].iloc[0]
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(hm.tokenize([exs[b].prompt])[0])
        h = cache[f"blocks.{l}.hook_resid_pre"][0, spans[b]["e1"][1] - 1]
        tt, _ = hm.tokenize([IDENTITY_PROMPT])

        def hook(x, hook):
            x = x.clone()
            x[0, -1] = h
            return x
        name = f"blocks.{l}.hook_resid_pre"
        logits = hm.bridge.run_with_hooks(tt, fwd_hooks=[(name, hook)])
        lp = torch.log_softmax(logits[0, -1], -1)
        # greedy continuation, patch re-applied at the placeholder each step
        seq = tt.clone()
        for _ in range(2):
            def hk(x, hook):
                x = x.clone()
                x[0, tt.shape[1] - 1] = h
                return x
            nxt = hm.bridge.run_with_hooks(seq, fwd_hooks=[(name, hk)])[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    tid = hm.encode(" Kelvo" if b == 0 else " Mirta")[0]
    assert abs(row.logprob - lp[tid].item()) < 1e-4
    assert row.top_token == hm.tokenizer.decode([int(lp.argmax())])
    assert row.top1 == (int(lp.argmax()) == tid)
    assert row.generated == hm.tokenizer.decode(seq[0, tt.shape[1]:].tolist())
    # a fixed target layer reads the same state into another layer
    df2 = patchscope(hm, exs[:1], "final", "description", source_layers=[0, 3], target_layer=1,
                     spans=spans[:1], progress=False)
    assert set(df2.target_layer) == {1} and len(df2) == 2
