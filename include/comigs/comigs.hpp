#pragma once
// comigs: mixtures of generalist and specialist LoRA experts for collaborative on-device fine-tuning
// (CoMiGS, Fan, Messmer, Doikov, Jaggi, ICML 2025). Include this header for the whole library.
#include "aggregate.hpp"
#include "error.hpp"
#include "frozen.hpp"
#include "io/checkpoint.hpp"
#include "lora.hpp"
#include "mixture.hpp"
#include "mixture_linear.hpp"
#include "model.hpp"
#include "optim.hpp"
#include "params.hpp"
#include "random.hpp"
#include "router.hpp"
#include "train.hpp"
#include "upload.hpp"
#include "version.hpp"
#include "view.hpp"
