// Prints llama.cpp's logits for every position of a token sequence, as JSON:
// {"n_vocab": V, "logits": [[...V values...], ...]} (one row per token).
// Used to record the reference logits of the small synthetic GGUF files in
// tests/data/synthetic/ (see models/bench/synthetic_models.py).
//
// Build against a llama.cpp build tree:
//   c++ -O2 -std=c++17 llama_logits.cpp -I$LLAMA/include -I$LLAMA/ggml/include \
//       -L$LLAMA/build/bin -lllama -lggml -lggml-base -Wl,-rpath,$LLAMA/build/bin -o llama_logits
// Usage: llama_logits MODEL.gguf 1,2,3,...
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf TOKEN,TOKEN,...\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> tokens;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) {
        tokens.push_back(std::atoi(t.c_str()));
    }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch batch = llama_batch_init((int) tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = true;
    }
    batch.n_tokens = (int) tokens.size();
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "decode failed\n");
        return 1;
    }
    std::printf("{\"n_vocab\": %d, \"logits\": [", n_vocab);
    for (size_t i = 0; i < tokens.size(); i++) {
        const float * l = llama_get_logits_ith(ctx, (int) i);
        std::printf("%s[", i ? "," : "");
        for (int v = 0; v < n_vocab; v++) {
            std::printf("%s%.6g", v ? "," : "", l[v]);
        }
        std::printf("]");
    }
    std::printf("]}\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
