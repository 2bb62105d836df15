#pragma once
// The minimal host transformer of the comigs demo: include this one header.
//   kernels.hpp   layer forward/backward functions (llm.c style)
//   mlp.hpp       MlpBlock, the pluggable MLP interface, and DenseMlp (GPT-2's MLP)
//   mixture_mlp.hpp  MixtureMlp: comigs' MixtureOfLoraMlp plugged in as a block's MLP
//   model.hpp     Config, TinyGpt (parameters, LoRA on attention, forward, backward)
//   generate.hpp  sampling bytes from the model
//   hf_gpt2.hpp   loading and saving GPT-2 weights in the Hugging Face safetensors layout
#include "generate.hpp"
#include "hf_gpt2.hpp"
#include "kernels.hpp"
#include "mixture_mlp.hpp"
#include "mlp.hpp"
#include "model.hpp"
