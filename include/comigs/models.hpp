#pragma once
// Host models comigs fine-tunes (namespace comigs::models): include this one header.
//   models/layers.hpp       transformer layer forward/backward functions (llm.c style)
//   models/mlp_block.hpp    MlpBlock, the pluggable MLP interface, and DenseMlp (GPT-2's MLP)
//   models/mixture_mlp.hpp  MixtureMlp: comigs' MixtureOfLoraMlp plugged in as a block's MLP
//   models/gpt2.hpp         Gpt2Config, Gpt2 (parameters, LoRA on attention, forward, backward)
//   models/generate.hpp     sampling tokens from a model
//   models/hf_gpt2.hpp      loading and saving GPT-2 weights in the Hugging Face safetensors layout
#include "models/generate.hpp"
#include "models/gpt2.hpp"
#include "models/hf_gpt2.hpp"
#include "models/layers.hpp"
#include "models/mixture_mlp.hpp"
#include "models/mlp_block.hpp"
