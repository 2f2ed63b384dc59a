"""Full-parameter fine-tune of an HF Llama directory (SmolLM2-135M) on one text, for the quality benchmark.

    python3 bench/quality/finetune.py --base BASE_DIR --text py_stdlib.txt --out FT_DIR [--device cuda]

The text is tokenized whole with the base's tokenizer.json (no special tokens, as `deltazip eval` does);
the first 85% of the tokens is training data, the next 5% validation (early stopping), the last 10% is held
out (the evaluation text, never used for a decision). With `--val-split interleaved` the validation is
evenly spaced blocks of `--val-block` tokens of the first 90% instead (as many as the validation measure
reads), and training has the rest of that 90%. Held-out perplexity is measured
exactly as `deltazip bench quality` measures it: the first `--eval-windows` non-overlapping windows of
`--eval-seq-len` tokens of the held-out part, mean NLL over every predicted position.

Training: f32 master weights, bf16 autocast, AdamW (betas 0.9/0.95, weight decay 0.01), linear warmup then
cosine decay over `--steps`, gradient clipping at 1.0, random training windows from a seeded generator.
Every `--eval-every` steps the validation perplexity is measured; training stops once it has dropped by
`--stop-drop` (default 30%), when it has not improved for `--patience` evaluations (overfitting: a short text
seen for many epochs gets worse, as kjv and py_stdlib did in the first H200 run), or at `--max-seconds`; the
weights of the best validation perplexity are the ones saved. Exit status 0 when the held-out drop is at least
`--target-drop` (default 25%, the quality issue's bar), 2 when it is not (the model is saved either way).

Output: FT_DIR/{model.safetensors (f32, the same tensor names as the base: no lm_head for tied
embeddings), config.json and tokenizer.json (copied from the base), finetune.json (settings, the
perplexities, the loss curve, timings)}. With `--train-text FILE` it also writes calibration text to FILE:
`--calib-slices` evenly spaced slices of `--calib-slice-chars` from the training part (never held-out text).

Needs torch, transformers (LlamaForCausalLM), safetensors, tokenizers. `--tiny` replaces the base's
weights by a 2-layer random model of the same vocabulary, to check the script on a CPU in seconds.
"""
import argparse, json, math, os, shutil, sys, time

import torch
import torch.nn.functional as F


def log(msg):
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(base, device, tiny):
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import load_file

    with open(os.path.join(base, "config.json")) as fh:
        cfg_json = json.load(fh)
    cfg = LlamaConfig(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "torch_dtype", "dtype",
                                                                       "source_gguf", "note")})
    if tiny:
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    if not tiny:
        sd = load_file(os.path.join(base, "model.safetensors"))
        sd = {k: v.to(torch.float32) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise SystemExit(f"base weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    return model.to(device), cfg


def held_out_ppl(model, ids, seq_len, windows, device, batch=16):
    """Perplexity over the first `windows` non-overlapping windows of `seq_len` tokens of `ids`."""
    n = min(windows, len(ids) // seq_len)
    assert n >= 1, f"{len(ids)} held-out tokens make no window of {seq_len}"
    w = ids[: n * seq_len].view(n, seq_len)
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            x = w[i : i + batch].to(device)
            # f32 here (no autocast): the same arithmetic as deltazip's f32 evaluation, up to kernels.
            logits = model(input_ids=x).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=800, help="cosine schedule length (most steps run)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--target-drop", type=float, default=0.25)
    ap.add_argument("--stop-drop", type=float, default=0.30)
    ap.add_argument("--patience", type=int, default=2, help="evaluations without a better validation ppl")
    ap.add_argument("--max-seconds", type=float, default=150.0)
    ap.add_argument("--train-text", help="write calibration text from the training part here")
    ap.add_argument("--calib-slices", type=int, default=128)
    ap.add_argument("--calib-slice-chars", type=int, default=4096)
    ap.add_argument("--val-split", choices=["tail", "interleaved"], default="tail",
                    help="validation: the 5%% before the held-out part (tail), or evenly spaced blocks of the first 90%%")
    ap.add_argument("--val-block", type=int, default=1024, help="tokens per block of --val-split interleaved")
    ap.add_argument("--tiny", action="store_true", help="2-layer random model: a CPU smoke test of the script")
    a = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(a.base, "tokenizer.json"))
    with open(a.text, encoding="utf-8") as fh:
        text = fh.read()
    enc = tok.encode(text, add_special_tokens=False)
    ids = torch.tensor(enc.ids, dtype=torch.long)
    split = len(ids) - len(ids) // 10  # deltazip's held_out(): the last len/10 tokens
    if a.val_split == "tail":
        vsplit = split - len(ids) // 20  # validation: the 5% before the held-out part
        train, val, held = ids[:vsplit], ids[vsplit:split], ids[split:]
        train_end = vsplit
    else:
        # "interleaved": evenly spaced blocks of `val_block` tokens of the first 90%, as many as the
        # validation measure reads (eval_windows x eval_seq_len tokens), are validation; the rest is
        # training. Both then span the whole text before the held-out part, so the tokens nearest to it
        # (the KJV's Luke and Acts, just before the held-out epistles) are trained on, and the validation
        # curve follows the text as a whole rather than one book.
        b = a.val_block
        nb = split // b
        need = -(-a.eval_windows * a.eval_seq_len // b)
        stride = max(2, nb // max(1, need))
        is_val = [(i % stride) == stride // 2 for i in range(nb)]
        val = torch.cat([ids[i * b : (i + 1) * b] for i in range(nb) if is_val[i]])
        tr = [ids[i * b : (i + 1) * b] for i in range(nb) if not is_val[i]] + [ids[nb * b : split]]
        train, held = torch.cat(tr), ids[split:]
        train_end = split
    log(f"{a.text}: {len(ids)} tokens, {len(train)} for training, {len(val)} validation ({a.val_split}), "
        f"{len(held)} held out ({time.time() - t_start:.1f}s to tokenize)")
    if a.train_text:
        # Calibration text: `calib_slices` evenly spaced slices of the text before the held-out part (the
        # training part; with interleaved validation it has validation blocks in it, never held-out text),
        # each from a line start to a line end (deltazip cuts its calibration windows evenly from it; a small
        # file tokenizes fast).
        train_chars = text[: enc.offsets[train_end][0]]
        n, size = a.calib_slices, a.calib_slice_chars
        parts = []
        for i in range(n):
            start = train_chars.rfind("\n", 0, i * len(train_chars) // n) + 1
            end = train_chars.rfind("\n", start, start + size) + 1
            parts.append(train_chars[start:end] if end > start else train_chars[start : start + size])
        with open(a.train_text + ".tmp", "w", encoding="utf-8") as fh:
            fh.write("".join(parts) if n * size < len(train_chars) else train_chars)
        os.replace(a.train_text + ".tmp", a.train_text)

    model, cfg = load_model(a.base, device, a.tiny)
    ppl_before = held_out_ppl(model, held, a.eval_seq_len, a.eval_windows, device)
    val_before = held_out_ppl(model, val, a.eval_seq_len, a.eval_windows, device)
    log(f"perplexity before: held out {ppl_before:.3f}, validation {val_before:.3f} "
        f"({a.eval_windows} x {a.eval_seq_len} tokens)")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **kw)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(a.seed)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    losses, evals = [], [(0, val_before)]
    t_train = time.time()
    step, stop_reason = 0, "steps"
    best_val, best_step, best_state, stale = val_before, 0, None, 0
    model.train()
    while step < a.steps:
        starts = torch.randint(0, len(train) - a.seq_len - 1, (a.batch,), generator=gen)
        x = torch.stack([train[s : s + a.seq_len + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with amp:
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            losses.append((step, loss.item()))
        if step % a.eval_every == 0:
            v = held_out_ppl(model, val, a.eval_seq_len, a.eval_windows, device)
            evals.append((step, v))
            el = time.time() - t_train
            log(f"step {step}: loss {loss.item():.3f}, validation ppl {v:.3f} "
                f"({100 * (1 - v / val_before):.1f}% drop), {el:.0f}s, {el / step:.3f}s/step")
            if v < best_val:
                best_val, best_step, stale = v, step, 0
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
            else:
                stale += 1
            if 1 - v / val_before >= a.stop_drop:
                stop_reason = f"validation drop >= {a.stop_drop}"
                break
            if stale >= a.patience:
                stop_reason = f"validation ppl not better for {a.patience} evaluations"
                break
        if time.time() - t_train > a.max_seconds:
            stop_reason = f"{a.max_seconds}s"
            break
    train_s = time.time() - t_train
    if evals[-1][0] != step:
        v = held_out_ppl(model, val, a.eval_seq_len, a.eval_windows, device)
        evals.append((step, v))
        if v < best_val:
            best_val, best_step, best_state = v, step, None  # the current weights are the best
    if best_state is not None and best_step != step:
        model.load_state_dict(best_state)
        log(f"restored the weights of step {best_step} (best validation ppl {best_val:.3f})")
    ppl_now = held_out_ppl(model, held, a.eval_seq_len, a.eval_windows, device)
    drop = 1 - ppl_now / ppl_before
    ok = drop >= a.target_drop
    log(f"held-out perplexity after {step} steps, kept step {best_step} ({stop_reason}, {train_s:.0f}s): {ppl_before:.3f} -> "
        f"{ppl_now:.3f}, drop {100 * drop:.1f}% ({'>=' if ok else 'BELOW'} the {100 * a.target_drop:.0f}% target)")

    # Save: the base's tensor names exactly (a tied lm_head is the embedding: not stored), f32.
    from safetensors import safe_open
    from safetensors.torch import save_file
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if not a.tiny:
        with safe_open(os.path.join(a.base, "model.safetensors"), "pt") as f:
            names = set(f.keys())
        if set(sd) != names:
            raise SystemExit(f"tensor names differ from the base: {sorted(set(sd) ^ names)[:8]}")
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for n in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(a.base, n), os.path.join(tmp, n))
    info = {
        "base": a.base, "text": a.text, "tokens": len(ids), "train_tokens": len(train), "held_out_tokens": len(held),
        "steps": step, "kept_step": best_step, "stop": stop_reason, "val_tokens": len(val),
        "val_before": val_before, "val_best": best_val, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
        "min_lr_frac": a.min_lr_frac, "warmup": a.warmup, "schedule_steps": a.steps,
        "weight_decay": a.weight_decay, "seed": a.seed, "val_split": a.val_split, "eval_every": a.eval_every,
        "patience": a.patience, "stop_drop": a.stop_drop, "max_seconds": a.max_seconds, "precision": "f32 master weights, bf16 autocast",
        "eval_windows": a.eval_windows, "eval_seq_len": a.eval_seq_len,
        "ppl_before": ppl_before, "ppl_after": ppl_now, "drop": drop, "target_drop": a.target_drop, "ok": ok,
        "evals": evals, "evals_of": "validation perplexity", "losses": losses, "train_seconds": train_s, "total_seconds": time.time() - t_start,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "tiny": a.tiny,
    }
    with open(os.path.join(tmp, "finetune.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    log(f"wrote {a.out} ({time.time() - t_start:.0f}s in all)")
    sys.exit(0 if ok else 2)


if __name__ == "__main__":
    main()
