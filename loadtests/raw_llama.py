"""Baselines without Lockgate: raw llama.cpp batched decoding, and llama-cpp-python serially.

Run by ``bench_engine.py`` in a subprocess (one model load per arm, nothing
shared with the server under test); prints one JSON object on stdout.

    python loadtests/raw_llama.py batched --model M.gguf --prompt "..." --sequences 8
    python loadtests/raw_llama.py serial  --model M.gguf --prompt "..." --requests 4
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import llama_cpp as C

# Gemma's <eos> and <end_of_turn>: banned so every sequence decodes exactly --tokens.
BANNED = (1, 106)


def _quiet() -> object:
    callback = C.llama_log_callback(lambda level, text, data: None)
    C.llama_log_set(callback, ctypes.c_void_p(0))
    return callback  # must outlive every llama.cpp call


def batched(
    model_path: str, prompt: str, sequences: int, tokens: int, threads: int, top_k: int
) -> dict[str, float]:
    """Prefill ``sequences`` copies of the prompt in one batch, then decode them in lockstep."""
    keep = _quiet()
    C.llama_backend_init()
    model = C.llama_model_load_from_file(model_path.encode(), C.llama_model_default_params())
    vocab = C.llama_model_get_vocab(model)
    params = C.llama_context_default_params()
    params.n_ctx = 512 * sequences
    params.n_batch = params.n_ubatch = 2048
    params.n_seq_max = sequences
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx = C.llama_init_from_model(model, params)
    raw = prompt.encode()
    ids = (C.llama_token * (len(raw) + 8))()
    n_prompt = C.llama_tokenize(vocab, raw, len(raw), ids, len(ids), True, True)
    assert n_prompt * sequences <= 2048, "prompt x sequences must fit one batch"
    batch = C.llama_batch_init(2048, 0, sequences)
    samplers = []
    for s in range(sequences):
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        bias = (C.llama_logit_bias * len(BANNED))(*[C.llama_logit_bias(t, -100.0) for t in BANNED])
        n_vocab = C.llama_vocab_n_tokens(vocab)
        C.llama_sampler_chain_add(
            chain, C.llama_sampler_init_logit_bias(n_vocab, len(BANNED), bias)
        )
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(top_k))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(1.0))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(s))
        samplers.append(chain)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    started = time.perf_counter()
    n = 0
    for s in range(sequences):
        for p in range(n_prompt):
            put(n, ids[p], p, s, p == n_prompt - 1)
            n += 1
    batch.n_tokens = n
    assert C.llama_decode(ctx, batch) == 0
    last = [
        C.llama_sampler_sample(samplers[s], ctx, (s + 1) * n_prompt - 1) for s in range(sequences)
    ]
    first_token = time.perf_counter()
    for step in range(tokens - 1):
        for s in range(sequences):
            put(s, last[s], n_prompt + step, s, True)
        batch.n_tokens = sequences
        assert C.llama_decode(ctx, batch) == 0
        last = [C.llama_sampler_sample(samplers[s], ctx, s) for s in range(sequences)]
    finished = time.perf_counter()
    del keep
    return {
        "decode_tok_s": sequences * (tokens - 1) / (finished - first_token),
        "e2e_tok_s": sequences * tokens / (finished - started),
        "ttft_s": first_token - started,
        "prompt_tokens": n_prompt,
    }


def serial(
    model_path: str, prompt: str, requests: int, tokens: int, threads: int, top_k: int
) -> dict[str, float]:
    """llama-cpp-python's high-level API, one request after another."""
    llm = C.Llama(model_path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    bias = {t: -100.0 for t in BANNED}
    llm.create_completion(prompt, max_tokens=4, logit_bias=bias)  # warm-up
    started = time.perf_counter()
    produced = 0
    ttfts = []
    for _ in range(requests):
        t0 = time.perf_counter()
        for i, chunk in enumerate(
            llm.create_completion(
                prompt,
                max_tokens=tokens,
                logit_bias=bias,
                stream=True,
                temperature=1.0,
                top_k=top_k,
                top_p=1.0,
                min_p=0.0,
            )
        ):
            if i == 0:
                ttfts.append(time.perf_counter() - t0)
            produced += 1 if chunk["choices"][0]["text"] is not None else 0
    elapsed = time.perf_counter() - started
    return {"e2e_tok_s": requests * tokens / elapsed, "ttft_s": sorted(ttfts)[len(ttfts) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["batched", "serial"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=40)
    args = parser.parse_args()
    if args.mode == "batched":
        result = batched(
            args.model, args.prompt, args.sequences, args.tokens, args.threads, args.top_k
        )
    else:
        result = serial(
            args.model, args.prompt, args.requests, args.tokens, args.threads, args.top_k
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
