// The comigs_model_cli library: loading a model and its tokenizer (model_cli.hpp) compiled once for
// comigs-eval and comigs-generate, which see the declarations only.
#define COMIGS_MODEL_CLI_IMPLEMENTATION
#include "model_cli.hpp"
