#pragma once
// Host models comigs fine-tunes (namespace comigs::models): include this one header.
//   models/causal_lm.hpp     CausalLm: the interface every host offers (programs and the demo use it)
//   models/layers.hpp        transformer layer forward/backward functions (llm.c style)
//   models/attention.hpp     causal grouped-query attention with a KV-cache offset
//   models/rope.hpp          rotary position embedding (rotate-half, llama3 scaling)
//   models/mlp_block.hpp     MlpBlock, the pluggable MLP interface; DenseMlp, FrozenMlpBlock
//   models/mixture_mlp.hpp   MixtureMlp: comigs' MixtureOfLoraMlp plugged in as a block's MLP
//   models/tensor_source.hpp TensorSource (named tensors), WeightStore (frozen views and copies)
//   models/gpt2.hpp          Gpt2Config, Gpt2 (trainable or over frozen Gpt2Weights)
//   models/llama.hpp         LlamaConfig, Llama (Llama, SmolLM2, Qwen2) over frozen LlamaWeights
//   models/hf_gpt2.hpp       GPT-2 weights in the Hugging Face safetensors layout
//   models/hf_model.hpp      Hugging Face model folders: config.json + (sharded) safetensors, mapped
//   models/gguf_model.hpp    GGUF model files (llama.cpp) into the Llama host, their tokenizer; load_model
//   models/generate.hpp      KV-cached generation, sampling
//   models/adapter_file.hpp  one user's adapters (attention LoRA, mixtures) in safetensors, PEFT-style keys
#include "models/adapter_file.hpp"
#include "models/attention.hpp"
#include "models/causal_lm.hpp"
#include "models/generate.hpp"
#include "models/gguf_model.hpp"
#include "models/gpt2.hpp"
#include "models/hf_gpt2.hpp"
#include "models/hf_model.hpp"
#include "models/layers.hpp"
#include "models/lm_head.hpp"
#include "models/llama.hpp"
#include "models/mixture_mlp.hpp"
#include "models/mlp_block.hpp"
#include "models/rope.hpp"
#include "models/tensor_source.hpp"
