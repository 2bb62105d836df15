// comigs-tokenize: text on stdin -> token ids on stdout (separated by spaces), or with --decode, ids on
// stdin -> the bytes they stand for. PATH: a tokenizer.json, or a folder holding tokenizer.json, or
// encoder.json + vocab.bpe (vocab.json + merges.txt).
//
//   printf 'Hello world' | comigs-tokenize --tokenizer tokenizer.json
//   comigs-tokenize --tokenizer gpt2/ < text.txt | comigs-tokenize --tokenizer gpt2/ --decode
#include <comigs/text/bpe_tokenizer.hpp>

#include <CLI/CLI.hpp>

#include <charconv>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    CLI::App app{"comigs-tokenize: byte-level BPE encoding and decoding (GPT-2, Llama-3, Qwen2, SmolLM2 tokenizers)"};
    std::string path;
    bool decode = false, add_special = false;
    app.add_option("--tokenizer", path, "tokenizer.json, or a folder with tokenizer.json or encoder.json + vocab.bpe")->required();
    app.add_flag("--decode", decode, "read ids, write the bytes they stand for");
    app.add_flag("--add-special", add_special,
                 "match special tokens (e.g. <|endoftext|>) written in the text; without it their text is ordinary text");
    CLI11_PARSE(app, argc, argv);

    try {
        const auto tokenizer = comigs::text::BpeTokenizer::load(path);
        const std::string input{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
        if (decode) {
            std::vector<std::int32_t> ids;
            std::size_t i = 0;
            while (i < input.size()) {
                while (i < input.size() && std::isspace(static_cast<unsigned char>(input[i]))) ++i;
                if (i == input.size()) break;
                std::size_t j = i;
                while (j < input.size() && !std::isspace(static_cast<unsigned char>(input[j]))) ++j;
                std::int32_t id = 0;
                const auto [end, ec] = std::from_chars(input.data() + i, input.data() + j, id);
                if (ec != std::errc() || end != input.data() + j)
                    throw comigs::InvalidArgument("'" + input.substr(i, j - i) + "' (input word " + std::to_string(ids.size() + 1) +
                                                  ") is not a token id");
                ids.push_back(id);
                i = j;
            }
            const std::string bytes = tokenizer.decode(ids);
            std::fwrite(bytes.data(), 1, bytes.size(), stdout);
        } else {
            const auto ids = tokenizer.encode(input, add_special);
            std::string out;
            out.reserve(ids.size() * 6);
            for (std::size_t k = 0; k < ids.size(); ++k) {
                if (k) out += ' ';
                out += std::to_string(ids[k]);
            }
            out += '\n';
            std::fwrite(out.data(), 1, out.size(), stdout);
        }
    } catch (const comigs::Error& e) {
        std::fprintf(stderr, "comigs-tokenize: %s\n", e.what());
        return 1;
    }
    return 0;
}
