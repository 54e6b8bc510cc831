"""Experiment for real-router's next build: refit the down projections *sequentially* (GPTQ-style).

router-v2 (lm_eval_bh/real_router.py) fits every layer on the dense model's MLP inputs.  At evaluation a layer
sees the routed model's inputs, whose error compounds over 30 layers.  Here layer l is fitted on the inputs the
routed model itself produces at each k in FIT_KS (layers < l already refitted), against the dense MLP's output
at those same inputs; the rest (router, ridge, k's) is router-v2's.  ``dense`` mode is router-v2 (a control).

    PYTHONPATH=. python scripts/real_router_sequential.py {dense|seq} [tokens=12288] [ridge=0.01]

Appends one JSON line to results/real/real_router_sequential.jsonl: held-out (1,024 odd-chunk tokens)
perplexity x dense at top-2/4/8/16, and in-sample (first 1,024 calibration tokens) at 4/8/16.
Not part of the build yet: it costs 257 s of fitting on 2 CPU cores at 12,288 tokens (router-v2: 188 s).
"""
import sys, time, math, json, torch
from lm_eval_bh import real, real_router as rr
from lm_eval_bh.patch import BHRouting
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
MODE = sys.argv[1] if len(sys.argv) > 1 else "seq"
TOK = int(sys.argv[2]) if len(sys.argv) > 2 else 12288
RIDGE = float(sys.argv[3]) if len(sys.argv) > 3 else rr.RIDGE
t0 = time.time()
dense, tok = real.load_dense(real.find_gguf())
moe = AutoModelForCausalLM.from_pretrained(real.ensure_real(), dtype=torch.float32).eval()
rr.apply_routers(moe, rr.load_params())
chunks = real.calibration_chunks(tok, TOK)
layers = moe.model.layers
cap = {}
def pre(m, args, kwargs):
    cap["kw"] = kwargs; raise StopIteration
h = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
B = 16
try:
    moe.model(input_ids=chunks[:B], use_cache=False)
except StopIteration:
    pass
h.remove()
kw = {k: v for k, v in cap["kw"].items() if k in ("attention_mask", "position_ids", "position_embeddings")}
print("kw", {k: (type(v), getattr(v, "shape", None)) for k, v in kw.items()})

@torch.no_grad()
def attn_part(layer, h):
    out = []
    for hb in h.split(B):
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(hb), **kw)
        out.append(hb + a)
    return torch.cat(out)

@torch.no_grad()
def routed(block, x, k):
    a = rr.expert_activations(block, x)
    lg = block.gate(x); p = (lg[0] if isinstance(lg, tuple) else lg).float().softmax(-1)
    f = (p * rr.topk_mask(p, k))[:, :, None] * a
    y = torch.einsum("nei,ehi->nh", f, block.experts.down_proj)
    return y + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

KS = rr.FIT_KS
with torch.no_grad():
    emb = moe.model.embed_tokens(chunks)
    hs = {k: emb.clone() for k in KS}
    if MODE == "dense":
        hs = {"d": emb.clone()}
    for i, layer in enumerate(layers):
        block = layer.mlp
        E, H, I = block.experts.down_proj.shape
        xs, rs = {}, {}
        for key, hh in hs.items():
            r = attn_part(layer, hh)
            rs[key] = r
            xs[key] = layer.post_attention_layernorm(r).reshape(-1, H)
        gram, rhs = 0, 0
        for k in KS:
            x = xs[k] if MODE != "dense" else xs["d"]
            g, r = rr.down_normal_equations(block, x, dense.model.layers[i].mlp(x), (k,))
            gram, rhs = gram + g, rhs + r
        rr.solve_down(block, gram, rhs, RIDGE)
        for key in hs:
            x = xs[key]
            if MODE == "dense":
                y = dense.model.layers[i].mlp(x)
            else:
                y = routed(block, x, key)
            hs[key] = rs[key] + y.reshape(rs[key].shape)
        print(f"layer {i} {time.time()-t0:.0f}s", flush=True)
fit_s = time.time() - t0
held = real.calibration_chunks(tok, 1024, held_out=True)
dn = math.exp(real.heldout_nll(dense, held))
res = {"mode": MODE, "tokens": TOK, "ridge": RIDGE, "fit_s": round(fit_s), "dense": dn}
for k in (2, 4, 8, 16):
    with BHRouting(min_k=k, max_k=k).patch(moe):
        res[k] = round(math.exp(real.heldout_nll(moe, held)) / dn, 3)
calib = real.calibration_chunks(tok, 1024)
for k in (4, 8, 16):
    with BHRouting(min_k=k, max_k=k).patch(moe):
        res[f"in{k}"] = round(math.exp(real.heldout_nll(moe, calib)) / math.exp(real.heldout_nll(dense, calib)), 3)
print(json.dumps(res)); open("results/real/real_router_sequential.jsonl", "a").write(json.dumps(res) + "\n")
