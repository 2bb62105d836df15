// comigs-demo: the collaborative-training demo (the README's main job). Pretrains a tiny GPT-2 style
// host on the embedded corpus's base source (or reuses the saved one), then trains every method on
// the same users, data, steps and batch, and writes results.json, curves.svg and routing.html.
// See run.hpp for the methods and the protocols.
#include "demo_main.hpp"

int main(int argc, char** argv) { return comigs::demo::demo_main(argc, argv); }
